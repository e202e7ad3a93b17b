"""Chapter 9's exercise checkers: right answers pass, named slips and wrong answers fail.

Expected values are worked out by hand from the shipped model's shapes (4 blocks, d = 128,
d_ff = 352) and from Llama-2-7B's published ones (32 blocks, d = 4096).
"""

import math

from lora_lab.checks import ch09 as check


def test_rank_for_budget():
    per_rank = 4 * (4 * (128 + 128) + 2 * (128 + 352) + (352 + 128))  # all-linear: 9,856
    assert per_rank == 9_856 and 32_768 // per_rank == 3
    result = check.rank_for_budget(3)
    assert result.correct and "9,856" in result.message
    assert check.rank_for_budget(32, targets=["q_proj"]).correct  # 1,024 per rank
    assert check.rank_for_budget(16, targets=["q_proj", "v_proj"]).correct
    assert not check.rank_for_budget(2).correct
    assert "round down" in check.rank_for_budget(4).message
    assert not check.rank_for_budget(3.0).correct
    assert not check.rank_for_budget(None).correct


def test_rank_for_budget_of_another_model():
    import transformers

    config = transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config)  # Conv1D layers, d = 64, MLP 256 wide
    per_rank = 2 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))  # all-linear: 2,048
    budget = 8 * 2 * ((64 + 192) + (64 + 64))  # rank 8 on c_attn and attn.c_proj: 6,144
    assert budget // per_rank == 3
    result = check.rank_for_budget(3, budget=budget, model=model)
    assert result.correct and "2,048" in result.message
    assert not check.rank_for_budget(2, budget=budget, model=model).correct
    mlp = ["mlp.c_fc", "mlp.c_proj"]  # 2 x (320 + 320) = 1,280 per rank
    assert check.rank_for_budget(4, budget=budget, targets=mlp, model=model).correct


def test_rslora_ratio():
    assert check.rslora_ratio(8).correct
    assert check.rslora_ratio(8.0).correct
    assert check.rslora_ratio(4, rank=16).correct
    assert not check.rslora_ratio(64).correct
    assert "turn it round" in check.rslora_ratio(1 / 8).message
    assert not check.rslora_ratio(None).correct


def test_llama_qv_params():
    right = 32 * 2 * 16 * (4096 + 4096)
    assert right == 8_388_608
    assert check.llama_qv_params(right).correct
    assert check.llama_qv_params(right // 2, rank=8).correct
    assert not check.llama_qv_params(right + 1).correct
    assert "one block" in check.llama_qv_params(right // 32).message
    assert not check.llama_qv_params(None).correct
    assert math.isclose(right / 6_738_415_616, 0.001245, rel_tol=1e-3)  # Llama-2-7B's size
    assert "0.12%" in check.llama_qv_params(right).message
