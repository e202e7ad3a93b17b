"""lora_lab.finetune and lora_lab.distributed: the command in one process and under torchrun
with 2 CPU processes (gloo), DDP and FSDP2.

Tolerances. One process reproduces ``lora_lab.train`` bit for bit (the same operations in the
same order). Two processes add the same numbers in another order: each rank sums the loss
gradients of its half of the batch, then gloo adds the two halves. Gradients then agree to
float32 rounding (2e-7 relative, ``test_rank_losses_give_the_global_gradient`` measures
it), and AdamW, which divides each gradient by its running size, passes that relative error
into every update. After 5 steps at lr 3e-3 the adapters of the shipped model (entries up to
0.1) differ by at most 2e-6 (measured: 5e-7 DDP, 1.9e-6 FSDP; 20 steps the same); ADAPTER_TOL
is 1e-5. A wrong reduction fails it by far: averaging the ranks' own mean losses (rows with
more target tokens weigh less) moves the gradient by 7e-2 relative on the batch of that test,
where the token-weighted sum is off by 2e-7.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import lora_lab
from lora_lab import distributed as D
from lora_lab import finetune
from lora_lab.adapters import load_adapter
from lora_lab.training import IGNORE, encode_pairs, logits_of, make_batch

ADAPTER_TOL = 1e-5  # two processes against one; see the module docstring
SMALL = ["--steps", "5", "--batch-size", "8", "--quiet"]
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONHASHSEED": "0",
    "OMP_WAIT_POLICY": "PASSIVE",
}


def torchrun(*args, nproc=2, timeout=180):
    """``torchrun --nproc_per_node=nproc -m lora_lab.finetune *args`` in a fresh process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd += ["--standalone", "-m", "lora_lab.finetune", *map(str, args)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def reports(folder):
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("rank*.json"))]


def max_diff(a, b):
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def shipped_lora(seed=0):
    model, _ = lora_lab.load_model(None, device="cpu")
    torch.manual_seed(seed)
    return lora_lab.apply_lora(model, 8, 16)


# ----------------------------------------------------------------------------- the data


def test_global_batches_refill_with_fresh_shuffles():
    batches = finetune.global_batches(10, 4, 5, seed=3)
    assert [len(b) for b in batches] == [4] * 5
    flat = sum(batches, [])
    assert sorted(flat[:10]) == list(range(10))  # the first epoch has every example once
    assert finetune.global_batches(10, 4, 5, seed=3) == batches
    assert finetune.global_batches(10, 4, 5, seed=4) != batches


def test_rank_slices_tile_the_global_batch():
    rows = list(range(12))
    parts = [rows[finetune.rank_slice(12, 3, r)] for r in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(ValueError, match="batch_size=10 is not divisible by world_size=4"):
        finetune.rank_slice(10, 4, 0)


def test_rank_losses_give_the_global_gradient():
    """Each rank's summed loss / the global batch's target tokens x world size, averaged as DDP
    does, is the gradient of the whole batch's mean; the mean of the ranks' means is not."""
    model = shipped_lora()
    for m in lora_lab.lora.lora_layers(model).values():  # B != 0, so A gets a gradient too
        torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    pairs = lora_lab.get_task("reverse").train[:16]
    examples = sorted(encode_pairs(pairs, lora_lab.CharTokenizer()), key=lambda e: len(e[0]))[::2]
    # (8 examples; the first half's targets shorter than the second's)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(loss_of_half):
        total = [torch.zeros_like(p) for p in params]
        for half in (examples[:4], examples[4:]):  # two "ranks"
            x, y = make_batch(half, "cpu")
            logits = logits_of(model, x).flatten(0, 1)
            g = torch.autograd.grad(loss_of_half(logits, y.flatten()), params)
            total = [t + gi / 2 for t, gi in zip(total, g, strict=True)]  # DDP's average
        return torch.cat([t.flatten() for t in total])

    n = finetune.target_tokens(examples)
    ours = grads(lambda lg, y: F.cross_entropy(lg, y, ignore_index=IGNORE, reduction="sum") * 2 / n)
    means = grads(lambda lg, y: F.cross_entropy(lg, y, ignore_index=IGNORE))
    x, y = make_batch(examples, "cpu")
    full = F.cross_entropy(logits_of(model, x).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    whole = torch.cat([g.flatten() for g in torch.autograd.grad(full, params)])
    assert ((ours - whole).norm() / whole.norm()).item() < 1e-6
    assert ((means - whole).norm() / whole.norm()).item() > 1e-3


# ----------------------------------------------------------------------------- arguments


def test_world_from_env():
    assert D.world_from_env({}) == D.World()
    world = D.world_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (world.rank, world.world_size, world.local_rank, world.launched) == (1, 2, 1, True)
    with pytest.raises(ValueError, match=r"sets \['RANK'\] but not \['WORLD_SIZE', 'LOCAL_RANK'\]"):
        D.world_from_env({"RANK": "0"})
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer, got 'two'"):
        D.world_from_env({"RANK": "0", "WORLD_SIZE": "two", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="rank must be an integer from 0 to world_size - 1=1"):
        D.world_from_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def parse_error(capsys, argv, environ=None, monkeypatch=None):
    if environ:
        for key, value in environ.items():
            monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


TWO = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}


@pytest.mark.parametrize(
    "argv, environ, message",
    [
        (["--strategy", "fsdx"], None, "argument --strategy: invalid choice: 'fsdx'"),
        (["--method", "dora"], None, "argument --method: invalid choice: 'dora'"),
        (["--task", "poetry"], None, "argument --task: invalid choice: 'poetry'"),
        (["--batch-size", "0"], None, "--batch-size: must be an integer >= 1, got '0'"),
        (["--lr", "nan"], None, "--lr: must be a finite number > 0, got 'nan'"),
        (["--targets", "q_proj,,v_proj"], None, "comma-separated list of module names"),
        (["--strategy", "ddp"], None, "--strategy ddp needs several processes: start"),
        (["--strategy", "fsdp"], None, "torchrun --nproc_per_node=N"),
        ([], TWO, "--strategy none under a launcher with WORLD_SIZE=2"),
        (["--strategy", "ddp", "--batch-size", "5"], TWO, "--batch-size 5 is not divisible"),
        (["--strategy", "fsdp", "--method", "qlora"], TWO, "does not shard"),
        (["--seed", "-1"], None, "--seed must be an int >= 0, got -1"),
    ],
)
def test_bad_arguments_name_argument_and_value(capsys, monkeypatch, argv, environ, message):
    err = parse_error(capsys, argv, environ, monkeypatch)
    assert message in err


def test_output_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("notes")
    err = parse_error(capsys, ["--output", str(out)])
    assert "exists and is not a directory" in err
    assert out.read_text() == "notes"


def test_blocks_are_the_largest_module_list():
    model, _ = lora_lab.load_model(None, device="cpu")
    assert D.blocks(model) is model.model.layers
    with pytest.raises(ValueError, match="no nn.ModuleList of blocks"):
        D.blocks(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"strategy must be one of \['none', 'ddp', 'fsdp'\]"):
        D.wrap(model, "zero3", torch.device("cpu"), 2)


# ----------------------------------------------------------------------------- one process


def test_one_process_is_lora_lab_train(tmp_path):
    report = finetune.main([*SMALL, "--output", str(tmp_path / "a"), "--task", "butler"])
    model = shipped_lora()
    history = lora_lab.train(model, "butler", 5, 3e-3, 8, progress=False)
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    theirs = lora_lab.adapters.adapter_state_dict(model)
    assert max_diff(saved, theirs) == 0.0  # bit for bit
    assert report.loss == pytest.approx(history.loss, rel=1e-6)
    assert report.world_size == 1 and report.strategy == "none"


def test_a_diverging_run_writes_nothing(tmp_path):
    with pytest.raises(FloatingPointError, match="no adapter is saved; lower --lr"):
        finetune.main(["--lr", "1e30", *SMALL, "--output", str(tmp_path / "a")])
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary debris


# ----------------------------------------------------------------------------- two processes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run in one process and under torchrun with 2 processes, DDP and FSDP."""
    root = tmp_path_factory.mktemp("finetune")
    single = finetune.main([*SMALL, "--output", str(root / "none")])
    out = {"none": {"report": [single.__dict__], "dir": root / "none"}}
    for strategy in ("ddp", "fsdp"):
        done = torchrun(*SMALL, "--strategy", strategy, "--output", root / strategy,
                        "--report", root / f"{strategy}-report")  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stderr.count("saved the adapter to") == 1  # rank 0 alone saves and says so
        out[strategy] = {"report": reports(root / f"{strategy}-report"), "dir": root / strategy}
    return out


def adapter(run):
    return load_file(run["dir"] / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_every_rank_holds_the_same_adapter(runs, strategy):
    r0, r1 = runs[strategy]["report"]
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    assert r0["adapter_sha256"] == r1["adapter_sha256"]
    assert r0["loss"] == r1["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(runs, strategy):
    diff = max_diff(adapter(runs[strategy]), adapter(runs["none"]))
    assert 0 <= diff < ADAPTER_TOL
    assert runs[strategy]["report"][0]["loss"] == pytest.approx(
        runs["none"]["report"][0]["loss"], rel=1e-5
    )
    scale = max(t.abs().max().item() for t in adapter(runs["none"]).values())
    assert scale > 100 * ADAPTER_TOL  # the adapters trained: the tolerance is not their size


@pytest.mark.slow
def test_fsdp_shards_the_parameters_and_ddp_replicates_them(runs):
    whole = runs["none"]["report"][0]
    ddp, fsdp = runs["ddp"]["report"], runs["fsdp"]["report"]
    assert [r["param_bytes"] for r in ddp] == [whole["param_bytes"]] * 2
    assert sum(r["param_bytes"] for r in fsdp) == whole["param_bytes"]  # no row padded here
    assert all(r["param_bytes"] == whole["param_bytes"] // 2 for r in fsdp)
    assert all(2 * r["trainable_bytes"] == whole["trainable_bytes"] for r in fsdp)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_saved_adapter_loads_in_peft_and_lora_lab(runs, strategy, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    from lora_lab.model import export_transformers

    base, _ = lora_lab.load_model(None, device="cpu")
    export_transformers(base, tmp_path / "hf")
    path = str(runs[strategy]["dir"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), path
        )
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    ours = load_adapter(lora_lab.load_model(None, device="cpu")[0], path).eval()
    idx = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine, peft_logits, plain = ours(idx), theirs.eval()(idx).logits, base(idx)
    torch.testing.assert_close(peft_logits, mine, rtol=0, atol=1e-5)
    assert (mine - plain).abs().max() > 1e-3  # the adapter changes the outputs


@pytest.mark.slow
def test_qlora_under_ddp_equals_one_process(tmp_path):
    args = [*SMALL, "--method", "qlora"]
    finetune.main([*args, "--output", str(tmp_path / "one")])
    done = torchrun(*args, "--strategy", "ddp", "--output", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("one", "two"))
    assert max_diff(one, two) < ADAPTER_TOL
    assert json.loads((tmp_path / "two" / "adapter_config.json").read_text())["r"] == 8


@pytest.mark.slow
def test_torchrun_bad_batch_and_failed_save_end_every_rank(tmp_path):
    done = torchrun("--strategy", "ddp", "--batch-size", "5", "--output", tmp_path / "a")
    assert done.returncode != 0
    assert "--batch-size 5 is not divisible by the 2 processes" in done.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")  # the output's parent is a file: rank 0's save fails after training
    done = torchrun(*SMALL, "--strategy", "ddp", "--output", blocker / "a", timeout=120)
    assert done.returncode != 0
    for rank in (0, 1):  # rank 0 told rank 1, so neither waits for the other
        assert f"[rank{rank}]: RuntimeError: rank 0 could not save the adapter" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
