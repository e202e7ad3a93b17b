"""The Llama-style GPT: same logits as transformers, strict checkpoint loading, Colab switch."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json

import pytest
import torch

from lora_lab.data import TASKS
from lora_lab.model import (
    CHECKPOINT_DIR,
    GPT,
    SHIPPED_MODEL,
    GPTConfig,
    export_transformers,
    from_transformers,
    load_model,
    load_pretrained,
    save_checkpoint,
    to_transformers,
)
from lora_lab.tokenizer import CharTokenizer, HFTokenizer
from lora_lab.training import evaluate, generate

TOL = 1e-5  # float32 logits of the two implementations may differ only by rounding


def tiny_config(**overrides):
    kw = dict(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=32, intermediate_size=64)
    return GPTConfig(**{**kw, **overrides})


@pytest.fixture(scope="module")
def shipped():
    return load_pretrained(device="cpu")


def test_state_dict_names_match_llama():
    from transformers import LlamaForCausalLM

    from lora_lab.model import llama_config

    model = GPT(tiny_config())
    hf = LlamaForCausalLM(llama_config(model.config))
    ours, theirs = model.state_dict(), hf.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(n.endswith(name) for n, _ in model.named_modules())


@pytest.mark.parametrize("rope_theta", [10000.0, 500.0])
def test_same_logits_as_transformers(rope_theta):
    torch.manual_seed(0)
    model = GPT(tiny_config(rope_theta=rope_theta, norm_eps=1e-6)).eval()
    with torch.no_grad():  # make the norms' gains non-trivial so they are really compared
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    hf = to_transformers(model)
    idx = torch.randint(0, 96, (3, 32))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ours.abs().max() > 0.1  # not trivially zero
    torch.testing.assert_close(ours, theirs, rtol=0, atol=TOL)
    back = from_transformers(hf)
    assert back.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(back(idx), ours, rtol=0, atol=TOL)


def test_shipped_model_same_logits_as_transformers(shipped):
    idx = torch.tensor([CharTokenizer().encode("q: where does the fox live?\na: the fox")])
    with torch.no_grad():
        torch.testing.assert_close(
            shipped(idx), to_transformers(shipped)(idx).logits, rtol=0, atol=TOL
        )


def test_from_transformers_refuses_what_gpt_cannot_hold():
    from transformers import LlamaForCausalLM

    from lora_lab.model import llama_config

    hf_config = llama_config(tiny_config())
    hf_config.num_key_value_heads = 1
    with pytest.raises(ValueError, match="num_key_value_heads"):
        from_transformers(LlamaForCausalLM(hf_config))
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        from_transformers(torch.nn.Linear(2, 2))


def test_forward_checks_its_input():
    model = GPT(tiny_config())
    assert model(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 96)
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="exceeds block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_config_checks_its_fields():
    with pytest.raises(ValueError, match="n_layer must be a positive int"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="heads of even size"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="rope_theta"):
        GPTConfig(rope_theta=-1.0)
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT({"n_layer": 2})


def test_shipped_checkpoint_is_small_and_loads_in_eval_mode(shipped):
    size = (CHECKPOINT_DIR / "tiny_gpt.safetensors").stat().st_size
    assert size <= 10 * 2**20
    assert not shipped.training
    n_params = sum(p.numel() for p in shipped.parameters())
    assert size >= 4 * n_params  # float32 weights, all of them
    log = json.loads((CHECKPOINT_DIR / "pretrain_log.json").read_text())
    assert log["params"] == n_params
    assert log["val_loss"] < 0.25 * log["random_init_val_loss"]


def test_shipped_model_is_pretrained_and_near_the_floor_on_tasks(shipped):
    """Its greedy answers are the corpus's plain ones; no task's target style comes out."""
    answer = generate(shipped, "q: where does the fox live?\na:", max_new_tokens=40)
    from lora_lab.data import plain_answer

    assert answer == plain_answer("fox", "home")
    for name in TASKS:
        assert evaluate(shipped, name) <= 0.05


def test_load_pretrained_is_strict(tmp_path):
    model = GPT(tiny_config())
    save_checkpoint(model, tmp_path)
    loaded = load_pretrained(device="cpu", directory=tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)

    from safetensors.torch import load_file, save_file

    weights = tmp_path / "tiny_gpt.safetensors"
    # copies: safetensors 0.4 maps the file, and rewriting a mapped file is a bus error
    state = {k: v.clone() for k, v in load_file(weights).items()}
    missing = {k: v for k, v in state.items() if k != "lm_head.weight"}
    save_file(missing, weights)
    with pytest.raises(RuntimeError, match="lm_head.weight"):
        load_pretrained(device="cpu", directory=tmp_path)
    save_file({**state, "extra.weight": torch.zeros(1)}, weights)
    with pytest.raises(RuntimeError, match="extra.weight"):
        load_pretrained(device="cpu", directory=tmp_path)
    save_file(state, weights)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "dropout": 0.1}))
    with pytest.raises(ValueError, match="dropout"):
        load_pretrained(device="cpu", directory=tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere/tiny_gpt.safetensors is missing"):
        load_pretrained(device="cpu", directory=tmp_path / "nowhere")


def test_load_model_switch_shipped_and_local_transformers_dir(shipped, tmp_path):
    model, tok = load_model(None, device="cpu")
    assert isinstance(model, GPT) and isinstance(tok, CharTokenizer)
    model2, _ = load_model(SHIPPED_MODEL, device="cpu")
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True)
    )
    with pytest.raises(ValueError, match="hf_kwargs"):
        load_model(None, torch_dtype=torch.float16)

    path = export_transformers(shipped, tmp_path / "tiny-llama")
    hf_model, hf_tok = load_model(str(path), device="cpu")
    assert type(hf_model).__name__ == "LlamaForCausalLM" and isinstance(hf_tok, HFTokenizer)
    prompt = "q: what does the owl eat?\na:"
    idx = torch.tensor([hf_tok.encode(prompt)])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(idx).logits, shipped(idx), rtol=0, atol=TOL)
    assert generate(hf_model, prompt, tokenizer=hf_tok) == generate(shipped, prompt)
    assert evaluate(hf_model, "pirate", n=8, tokenizer=hf_tok) == evaluate(shipped, "pirate", n=8)

    with pytest.raises(FileExistsError, match="not an empty directory"):
        export_transformers(shipped, path)
    with pytest.raises(TypeError, match="name must be"):
        load_model(3)
