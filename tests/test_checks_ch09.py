"""Chapter 9's exercise checkers: right answers pass, named slips and wrong answers fail.

Expected counts are made independently of the checkers (which use ModelSpec and apply_lora):
by adding up the shapes of a real model's linear layers, module by module.
"""

import pytest
import torch

from lora_lab import load_model
from lora_lab.checks import ch09 as check


def per_rank_by_hand(model, keep):
    """Trainable parameters per unit of rank: r (in + out) summed over the kept linear layers."""
    from transformers.pytorch_utils import Conv1D

    total = 0
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, Conv1D)) and keep(name):
            fin, fout = m.weight.shape[::-1] if isinstance(m, torch.nn.Linear) else m.weight.shape
            total += fin + fout
    return total


def test_rank_for_budget():
    model, _ = load_model(None)
    all_linear = per_rank_by_hand(model, lambda n: n.startswith("model.layers."))  # not lm_head
    budget = 8 * per_rank_by_hand(model, lambda n: n.endswith(check.ATTENTION))  # the reference
    right = budget // all_linear
    result = check.rank_for_budget(right, budget=budget)
    assert result.correct and f"{all_linear:,}" in result.message
    assert check.rank_for_budget(right, budget=budget, model=model).correct
    q_only = per_rank_by_hand(model, lambda n: n.endswith("q_proj"))
    assert check.rank_for_budget(budget // q_only, budget=budget, targets=["q_proj"]).correct
    assert not check.rank_for_budget(right - 1, budget=budget).correct
    assert "round down" in check.rank_for_budget(right + 1, budget=budget).message
    assert not check.rank_for_budget(float(right), budget=budget).correct
    assert not check.rank_for_budget(None, budget=budget).correct


def test_rank_for_budget_of_another_model():
    import transformers

    config = transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config)  # Conv1D layers
    attention = ("attn.c_attn", "attn.c_proj")
    per_rank = per_rank_by_hand(model, lambda n: n.startswith("transformer.h."))
    budget = 8 * per_rank_by_hand(model, lambda n: n.endswith(attention))
    right = budget // per_rank
    result = check.rank_for_budget(right, budget=budget, model=model)
    assert result.correct and f"{per_rank:,}" in result.message
    assert not check.rank_for_budget(right - 1, budget=budget, model=model).correct
    mlp = ["mlp.c_fc", "mlp.c_proj"]
    per_mlp = per_rank_by_hand(model, lambda n: n.endswith(tuple(mlp)))
    assert check.rank_for_budget(budget // per_mlp, budget=budget, targets=mlp, model=model).correct


def test_rslora_ratio():
    assert check.rslora_ratio(8).correct
    assert check.rslora_ratio(8.0).correct
    assert check.rslora_ratio(4, rank=16).correct
    assert not check.rslora_ratio(64).correct
    assert "turn it round" in check.rslora_ratio(1 / 8).message
    assert not check.rslora_ratio(None).correct


def test_llama_qv_params():
    """Counted on Llama-2-7B itself, built on the meta device (no memory, no download)."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, vocab_size=32000)  # fmt: skip
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    right = 16 * per_rank_by_hand(model, lambda n: n.endswith(("q_proj", "v_proj")))
    assert check.llama_qv_params(right).correct
    assert check.llama_qv_params(right // 2, rank=8).correct
    assert not check.llama_qv_params(right + 1).correct
    assert "one block" in check.llama_qv_params(right // 32).message
    assert not check.llama_qv_params(None).correct
    share = right / sum(p.numel() for p in model.parameters())
    assert f"{share:.2%}" in check.llama_qv_params(right).message


# ----------------------------------------------------------------------------- exercise 4

STEPS, BATCH, TASK = 2, 4, "pirate"


@pytest.fixture(scope="module")
def shipped():
    return load_model(None)


def right_experiment(base, tok):
    from lora_lab.experiments import finetune

    def test_loss_at(lr, seed):
        run = finetune(base, TASK, STEPS, lr, lora=check.reference_lora(base), batch_size=BATCH,
                       seed=seed, tokenizer=tok)  # fmt: skip
        return run.scores["loss"]

    return test_loss_at


def test_experiment_passes_the_right_run(shipped):
    base, tok = shipped
    result = check.experiment(right_experiment(base, tok), base, tok, TASK, STEPS, BATCH)
    assert result.correct and "2 cases" in result.message


@pytest.mark.slow  # a subprocess or a training run: make test, not make unit
def test_experiment_names_the_case_a_wrong_run_misses(shipped):
    from lora_lab.experiments import finetune

    base, tok = shipped
    right = right_experiment(base, tok)

    def fixed_rate(lr, seed):  # ignores lr
        return right(3e-3, seed)

    def fixed_seed(lr, seed):  # ignores seed
        return right(lr, 0)

    def train_loss(lr, seed):  # the training loss, not the test loss
        run = finetune(base, TASK, STEPS, lr, lora=check.reference_lora(base), batch_size=BATCH,
                       seed=seed, tokenizer=tok)  # fmt: skip
        return run.final_train_loss()

    for fn, says in ((fixed_rate, "case 1 of 2 (learning rate 0.001, seed 1"),
                     (fixed_seed, "case 1 of 2 (learning rate 0.001, seed 1"),
                     (train_loss, "case 1 of 2")):  # fmt: skip
        result = check.experiment(fn, base, tok, TASK, STEPS, BATCH)
        assert not result.correct and says in result.message, result.message


def test_experiment_unanswered_costs_no_training(shipped, monkeypatch):
    from lora_lab import experiments

    base, tok = shipped
    monkeypatch.setattr(experiments, "finetune", lambda *a, **k: pytest.fail("trained"))

    def stub(lr, seed):
        raise NotImplementedError

    assert "No answer yet" in check.experiment(stub, base, tok, TASK, STEPS, BATCH).message
    assert "No answer yet" in check.experiment(None, base, tok, TASK, STEPS, BATCH).message


def test_experiment_takes_expected_values_from_the_committed_grid(shipped):
    base, tok = shipped
    calls = []

    def made_up(lr, seed):
        calls.append((lr, seed))
        return {(1e-3, 1): 0.5, (1e-2, 0): 0.25}[lr, seed]

    ref = {"rank": 8, "alpha": 16, "targets": "q, k, v, o", "use_rslora": False, "dropout": 0.0}
    grid = {"model": "m", "quick": False, "task": TASK, "steps": STEPS, "batch_size": BATCH,
            "reference": ref, "runs": [{**ref, "lr": 1e-3, "seed": 1, "diverged": False, "test_loss": 0.5},
                                       {**ref, "lr": 1e-2, "seed": 0, "diverged": False, "test_loss": 0.25}]}  # fmt: skip
    assert check.experiment(
        made_up, base, tok, TASK, STEPS, BATCH, grid=grid, model_name="m"
    ).correct
    assert calls == [(1e-3, 1), (1e-2, 0)]  # each case run once, nothing trained by the checker
    grid["runs"][1]["test_loss"] = 0.26  # the committed value is the yardstick
    result = check.experiment(made_up, base, tok, TASK, STEPS, BATCH, grid=grid, model_name="m")
    assert not result.correct and "case 2 of 2 (learning rate 0.01, seed 0" in result.message
