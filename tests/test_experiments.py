"""lora_lab.experiments: scores agree with evaluate and a hand computation; runs are fresh,
repeatable and count what they train."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

from lora_lab import GPT, CharTokenizer, GPTConfig, count_parameters, evaluate, get_task
from lora_lab.experiments import (
    Run,
    current_rss,
    finetune,
    reset_peak_rss,
    score,
)
from lora_lab.training import IGNORE, encode_pairs, make_batch

TINY = GPTConfig(n_layer=1, n_head=2, n_embd=32, intermediate_size=64)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return GPT(TINY).eval()


def test_score_matches_evaluate_and_hand_computation(base):
    task = get_task("reverse")
    got = score(base, task, n=40, batch_size=16)  # batches of 16, 16, 8
    assert got["exact"] == evaluate(base, task, n=40)
    x, y = make_batch(encode_pairs(task.test[:40], CharTokenizer()), "cpu")
    logits = base(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    mask = y != IGNORE
    right = int(((logits.argmax(-1) == y) & mask).sum())
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)  # float32 sums in another order
    assert got["char_acc"] == right / int(mask.sum())


def test_score_exact_is_one_when_the_model_is_forced_right(base):
    # a model whose logits always put the target first scores 1 on everything
    task = get_task("butler")
    examples = encode_pairs(task.test[:5], CharTokenizer())

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.config = TINY

        def forward(self, idx):
            x, y = make_batch(examples, idx.device)
            assert torch.equal(x, idx)
            return F.one_hot(y.clamp(min=0), TINY.vocab_size).float() * 50

    got = score(Oracle(), task, n=5)
    assert got["exact"] == 1.0 and got["char_acc"] == 1.0 and got["loss"] < 1e-12


def test_finetune_lora_trains_only_the_adapter_and_leaves_base_alone(base):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    run = finetune(base, "reverse", 3, 1e-2, lora={"rank": 2, "alpha": 4}, batch_size=4)
    assert isinstance(run, Run) and run.method == "LoRA r=2"
    # 4 attention projections of 32x32 in 1 layer: 4 * r * (32 + 32)
    assert run.trainable_params == 4 * 2 * 64 == count_parameters(run.model)[0]
    assert run.total_params == count_parameters(base)[1] + run.trainable_params
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert len(run.history.loss) == 3 and run.scores == score(run.model, "reverse")
    row = run.row()
    assert row["trainable"] == run.trainable_params and row["steps"] == 3
    assert row["state_bytes"] == run.history.memory["total"] > 0


def test_finetune_full_trains_everything(base):
    run = finetune(base, "reverse", 2, 1e-3, batch_size=4)
    trainable, total = count_parameters(base)
    assert run.method == "full" and run.trainable_params == run.total_params == total
    # fp32 params + grads + AdamW's two moments (4 copies of 4 bytes), plus AdamW's float32
    # step counter, one per parameter tensor
    n_tensors = len(list(base.parameters()))
    assert run.history.memory["total"] == 16 * total + 4 * n_tensors


def test_finetune_is_repeatable_and_seed_matters(base):
    kw = {"lora": {"rank": 4, "alpha": 8}, "batch_size": 4}
    a = finetune(base, "butler", 3, 1e-2, seed=1, **kw)
    b = finetune(base, "butler", 3, 1e-2, seed=1, **kw)
    c = finetune(base, "butler", 3, 1e-2, seed=2, **kw)
    assert a.history.loss == b.history.loss and a.scores == b.scores
    assert a.history.loss != c.history.loss


def test_finetune_bad_input(base):
    with pytest.raises(TypeError, match="lora must be a dict"):
        finetune(base, "reverse", 1, 1e-3, lora=8)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        finetune(base, "reverse", 1, 1e-3, lora={"rank": 0})
    with pytest.raises(TypeError, match="unexpected keyword"):
        finetune(base, "reverse", 1, 1e-3, lora={"ranks": 8})
    with pytest.raises(ValueError, match="steps must be an int"):
        finetune(base, "reverse", 0, 1e-3)
    with pytest.raises(ValueError):
        finetune(base, "no-such-task", 1, 1e-3)
    with pytest.raises(ValueError, match="n=500 is more than"):
        score(base, "butler", n=500)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only")
def test_reset_peak_rss_lowers_the_peak_after_a_big_allocation():
    from lora_lab.measure import peak_rss_bytes

    mib = 2**20
    big = torch.ones(64 * mib // 4)  # 64 MiB, touched
    high = peak_rss_bytes()
    # the kernel syncs its RSS counters lazily, so allow a few MiB of slack either way
    assert high >= current_rss() - 4 * mib
    del big
    assert reset_peak_rss()
    assert peak_rss_bytes() < high - 32 * mib  # the 64 MiB peak is gone
    assert abs(peak_rss_bytes() - current_rss()) < 4 * mib


_TRIM_SCRIPT = """
import ctypes
from lora_lab.experiments import current_rss, release_free_memory
libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: free() never hands the heap back by itself
libc.mallopt(-3, 2**30)  # M_MMAP_THRESHOLD: these blocks live on the heap, not in mmaps
blocks = [ctypes.create_string_buffer(2**16) for _ in range(1024)]  # 64 MiB, touched
high = current_rss()
del blocks
kept = current_rss()
assert release_free_memory()
print(high, kept, current_rss())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only")
def test_release_free_memory_returns_freed_heap_to_the_os():
    import subprocess
    import sys

    # in a child process: the malloc settings above would otherwise last the whole session
    out = subprocess.run([sys.executable, "-c", _TRIM_SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    high, kept, after = map(int, out.stdout.split())
    mib = 2**20
    assert kept > high - 8 * mib  # freed, yet still resident: the problem
    assert after < kept - 48 * mib  # trimmed: most of the 64 MiB went back to the OS
