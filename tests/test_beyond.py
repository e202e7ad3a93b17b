"""lora_lab.beyond: chapter 11's plan, its precompute script at a toy size, and the readers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lora_lab import beyond, load_pretrained
from lora_lab.quant import nf_roundtrip
from lora_lab.variants import loftq_factors, pissa_factors

ROOT = Path(__file__).resolve().parents[1]


def test_smooth_and_steps_to_target():
    assert beyond.smooth([4.0, 2.0, 0.0], window=2) == [4.0, 3.0, 1.0]
    curve = [5.0] * 10 + [1.0] * 10
    assert beyond.steps_to_target(curve, 3.0, window=4) == 12  # (5 + 5 + 1 + 1) / 4 = 3
    assert beyond.steps_to_target(curve, 0.5, window=4) is None
    with pytest.raises(ValueError, match="curve must be a non-empty list"):
        beyond.smooth([])
    with pytest.raises(ValueError, match="window must be an int >= 1, got 0"):
        beyond.smooth([1.0], window=0)


def test_plan_gives_every_method_a_grid_and_the_variant_switches():
    plan = beyond.variants_plan(load_pretrained())
    assert (
        set(plan["methods"]) == set(plan["lr_grid"]) == {"LoRA", "rsLoRA", "DoRA", "PiSSA", "LoRA+"}
    )
    assert all(len(grid) == 5 for grid in plan["lr_grid"].values())
    assert plan["methods"]["DoRA"]["use_dora"] and plan["methods"]["rsLoRA"]["use_rslora"]
    assert plan["methods"]["PiSSA"]["init_lora_weights"] == "pissa"
    assert plan["methods"]["LoRA+"]["loraplus_lr_ratio"] == beyond.LORAPLUS_RATIO
    assert len(plan["seeds"]) >= 3 and plan["task"] == "reverse3"


@pytest.mark.slow
def test_the_script_runs_at_a_toy_size_and_the_readers_read_it(tmp_path):
    out = tmp_path / "v.json"
    subprocess.run(
        [sys.executable, "scripts/ch11_variants.py", "--quick", "--out", str(out)],
        cwd=ROOT, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    results = beyond.read_variants(out)
    assert results["meta"]["quick"] is True
    scores = beyond.method_scores(results)
    assert set(scores) == set(results["plan"]["methods"])
    # DoRA trains one magnitude per output feature more than LoRA, the others exactly as many
    assert (
        scores["rsLoRA"]["trainable"] == scores["PiSSA"]["trainable"] == scores["LoRA"]["trainable"]
    )
    assert scores["DoRA"]["trainable"] > scores["LoRA"]["trainable"]
    sweep = beyond.loraplus_sweep(results)
    assert set(sweep) == {1, beyond.LORAPLUS_RATIO, *results["plan"]["ratios"]}
    assert all(1 <= s <= results["plan"]["steps"] + 1 for r in sweep.values() for s in r["steps"])


def test_read_variants_refuses_a_file_without_its_keys(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"runs": []}))
    with pytest.raises(ValueError, match="expected the keys 'plan' and 'runs'"):
        beyond.read_variants(path)
    assert beyond.read_variants(tmp_path / "none.json") is None


def test_frozen_errors_are_the_starts_distances_from_w():
    """Each entry is recomputed from the factors it stands for, on a two-layer toy model."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(64, 48, bias=False))
    model.add_module("v_proj", nn.Linear(48, 64, bias=False))
    errors = beyond.frozen_errors(model, bits=(4, 2), rank=4, alpha=8, targets=["q_proj", "v_proj"])
    weights = [model.q_proj.weight.detach(), model.v_proj.weight.detach()]
    norm = sum(w.square().sum() for w in weights).sqrt()

    def total(piece):
        return (sum((w - piece(w)).square().sum() for w in weights).sqrt() / norm).item()

    def pissa(w, bits):
        A, B, res = pissa_factors(w, 4, 2.0)
        return nf_roundtrip(res, bits) + 2.0 * B @ A

    def loftq(w, bits, steps):
        A, B, Q = loftq_factors(w, 4, bits, steps)
        return Q + B @ A

    for bits in (4, 2):
        expected = {
            "QLoRA": total(lambda w, b=bits: nf_roundtrip(w, b)),
            "PiSSA": total(lambda w, b=bits: pissa(w, b)),
            "LoftQ, 1 step": total(lambda w, b=bits: loftq(w, b, 1)),
            "LoftQ, 5 steps": total(lambda w, b=bits: loftq(w, b, 5)),
        }
        for method, value in expected.items():
            assert errors[method, bits] == pytest.approx(value, rel=1e-5), (method, bits)
    assert errors["QLoRA", 2] > errors["QLoRA", 4]
