"""Chapter 1's exercise checkers: right answers pass, slips are named, None is unanswered.

Every expected value here comes from somewhere other than lora_lab.estimate, which the checkers
use: parameters counted on transformers' LlamaForCausalLM built on the meta device from the
published config numbers, AdamW's states as torch's AdamW allocates them (a step on the meta
device), trainable shares from PEFT, NF4 bytes from bitsandbytes' own quantizer. A bug in the
estimator or in a checker shows as a disagreement.
"""

import bitsandbytes.functional as bnb_f
import peft
import pytest
import torch
import transformers

from lora_lab.checks import ch01 as check

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA2 = {  # config.json of meta-llama/Llama-2-7b-hf and -13b-hf (the rest are LlamaConfig's defaults)
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40),
}  # fmt: skip


def meta_llama(name, dtype=torch.float32):
    """transformers' LlamaForCausalLM of ``name``'s shape on the meta device (no bytes)."""
    config = transformers.LlamaConfig(
        **LLAMA2[name], vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False
    )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config).to(dtype)


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def adamw_bytes(model):
    """Bytes of the weights, their gradients and torch AdamW's states after one step, all
    tensors on the meta device at the model's dtype (the lesson's convention)."""
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(params)
    optimizer.step()
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return nbytes(params) + nbytes(p.grad for p in params) + nbytes(states)


@pytest.fixture(scope="module")
def llama13b_fp16_bytes():
    return adamw_bytes(meta_llama("llama-2-13b", torch.float16))


def test_full_finetune_gb(llama13b_fp16_bytes):
    expected = llama13b_fp16_bytes / 1e9
    assert check.full_finetune_gb(expected).correct
    assert check.full_finetune_gb(round(expected, 1)).correct  # rounding to 0.1 GB is fine
    assert not check.full_finetune_gb(expected * 1.01).correct
    fp32 = adamw_bytes(meta_llama("llama-2-13b", torch.float32)) / 1e9
    assert check.full_finetune_gb(fp32, precision="fp32").correct
    assert not check.full_finetune_gb(fp32).correct  # the exercise asks fp16


def test_full_finetune_gb_names_the_slips():
    n = sum(p.numel() for p in meta_llama("llama-2-13b").parameters())
    for answer, says in [
        (8 * 13e9 / 1e9, "not 13,000,000,000"),  # the name's round count
        (8 * n / 2**30, "GiB"),
        (16 * n / 1e9, "mixed precision"),  # fp32 bytes per parameter
        (4 * n / 1e9, "states"),  # fp16 weight and gradient only
    ]:
        result = check.full_finetune_gb(answer)
        assert not result.correct and says in result.message, (answer, result)


def peft_counts(rank, target_modules=QKVO):
    """(trainable, all) parameters of PEFT's LoRA on Llama-2-7B, as print_trainable_parameters."""
    model = peft.get_peft_model(
        meta_llama("llama-2-7b"), peft.LoraConfig(r=rank, target_modules=target_modules)
    )
    return model.get_nb_trainable_parameters()


def test_lora_share_is_peft_trainable_share():
    trainable, total = peft_counts(16)
    share = 100 * trainable / total
    assert check.lora_share(share).correct
    assert check.lora_share(round(share, 3)).correct
    assert not check.lora_share(share * 1.01).correct
    trainable8, total8 = peft_counts(8)
    assert check.lora_share(100 * trainable8 / total8, rank=8).correct
    base = total - trainable
    qv, qv_total = peft_counts(16, ["q_proj", "v_proj"])
    for answer, says in [
        (trainable / total, "percentage"),
        (100 * trainable / base, "base model's parameters alone"),
        (100 * trainable8 / total8, "rank 8"),
        (100 * qv / qv_total, "q_proj and v_proj"),  # as many adapters as rank 8 on all four
    ]:
        result = check.lora_share(answer)
        assert not result.correct and says in result.message, (answer, result)


def bnb_nf4_bytes(shape, double_quant=True):
    """Bytes bitsandbytes stores for one NF4 weight of ``shape``: codes and quantization state."""
    packed, state = bnb_f.quantize_4bit(
        torch.zeros(shape, dtype=torch.bfloat16),
        blocksize=64,
        compress_statistics=double_quant,
        quant_type="nf4",
    )
    parts = [packed, state.absmax, state.code]
    if double_quant:
        parts += [state.offset, state.state2.absmax, state.state2.code]
    return nbytes(parts)


def qlora_bytes(double_quant=True):
    """(bytes, NF4 weights, all weights): Llama-2-7B's blocks' linear weights as bitsandbytes
    stores them in NF4, every other parameter in bf16."""
    model = meta_llama("llama-2-7b")
    linear = [m.weight for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")]  # fmt: skip
    shapes = {tuple(w.shape) for w in linear}  # Llama-2-7B: d x d and the MLP's two
    sizes = {shape: bnb_nf4_bytes(shape, double_quant) for shape in shapes}
    quantized = {id(w) for w in linear}
    rest = [p for p in model.parameters() if id(p) not in quantized]
    total = sum(sizes[tuple(w.shape)] for w in linear) + 2 * sum(p.numel() for p in rest)
    return total, sum(w.numel() for w in linear), sum(p.numel() for p in model.parameters())


def test_qlora_weight_gb():
    total, linear, n = qlora_bytes()
    expected = total / 1e9
    assert check.qlora_weight_gb(expected).correct
    assert check.qlora_weight_gb(round(expected, 2)).correct
    assert check.qlora_weight_gb(expected, precision="fp16").correct  # as many bytes as bf16
    assert not check.qlora_weight_gb(expected * 1.01).correct
    per_weight = (total - 2 * (n - linear)) / linear  # NF4 bytes per linear weight
    for answer, says in [
        ((linear / 2 + 2 * (n - linear)) / 1e9, "block constants"),
        (qlora_bytes(double_quant=False)[0] / 1e9, "without double quantization"),
        (total / 2**30, "GiB"),
        (n * per_weight / 1e9, "embeddings, norms and lm_head"),  # every weight in NF4
    ]:
        result = check.qlora_weight_gb(answer)
        assert not result.correct and says in result.message, (answer, result)


def learner_state_bytes(numels, precision, optimizer, convention):
    """A right answer to the code exercise, written from torch's and the conventions' rules."""
    b = {"fp32": 4, "bf16": 2, "fp16": 2}[precision]
    n, mixed = sum(numels), convention == "mixed"
    state = 4 if mixed else b
    master = 4 * n if mixed and b == 2 else 0
    states = {"adamw": 2 * state * n + 4 * len(numels), "sgd_momentum": state * n, "sgd": 0}
    return 2 * b * n + master + states[optimizer]


def test_full_state_bytes_right_answer_passes():
    result = check.full_state_bytes(learner_state_bytes)
    assert result.correct and "all 8 cases" in result.message, result


def test_full_state_bytes_agrees_with_torch_adamw_on_a_counted_model():
    model = meta_llama("llama-2-7b", torch.bfloat16)
    numels = [p.numel() for p in model.parameters()]
    measured = adamw_bytes(model)  # bf16 weights, gradients and AdamW states
    assert learner_state_bytes(numels, "bf16", "adamw", "lesson") == measured


def test_full_state_bytes_names_the_first_wrong_case():
    def no_step_counter(numels, precision, optimizer, convention):
        extra = 4 * len(numels) if optimizer == "adamw" else 0
        return learner_state_bytes(numels, precision, optimizer, convention) - extra

    def no_master_copy(numels, precision, optimizer, convention):
        full = learner_state_bytes(numels, precision, optimizer, convention)
        return full - (4 * sum(numels) if convention == "mixed" and precision != "fp32" else 0)

    def states_at_precision(numels, precision, optimizer, convention):
        return learner_state_bytes(numels, precision, optimizer, "lesson") + (
            4 * sum(numels) if convention == "mixed" and precision != "fp32" else 0
        )

    for fn, case in [
        (no_step_counter, "case 1 of 8 (two tensors, fp32, adamw, lesson; numels=[1000, 10]"),
        (no_master_copy, "case 3 of 8 (two tensors, bf16, adamw, mixed"),
        (states_at_precision, "case 3 of 8 (two tensors, bf16, adamw, mixed"),
    ]:
        result = check.full_state_bytes(fn)
        assert not result.correct and case in result.message, (fn.__name__, result)
        assert "Expected " in result.message and ", got " in result.message


def test_full_state_bytes_placeholder_and_a_crash():
    def todo(numels, precision, optimizer, convention):
        raise NotImplementedError

    assert check.full_state_bytes(todo).message.startswith("No answer yet")

    def crashes(numels, precision, optimizer, convention):  # right for fp32 only
        return learner_state_bytes(numels, {"fp32": "fp32"}[precision], optimizer, convention)

    result = check.full_state_bytes(crashes)
    assert not result.correct and "case 2 of 8" in result.message and "KeyError" in result.message


@pytest.mark.parametrize("fn", [check.full_finetune_gb, check.lora_share, check.qlora_weight_gb])
def test_unanswered_and_not_a_number(fn):
    result = fn(None)
    assert not result.correct and result.message.startswith("No answer yet")
    for bad in ["3.9", True, [1.0]]:
        result = fn(bad)
        assert not result.correct and "should be a number" in result.message


def test_bad_arguments():
    with pytest.raises(ValueError, match="model must be one of"):
        check.full_finetune_gb(1.0, model="llama-3")
    with pytest.raises(ValueError, match="rank must be a positive int"):
        check.lora_share(1.0, rank=0)
