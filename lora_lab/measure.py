"""Measurement: bytes held by a model's tensors, the process's memory, and time.

``measure_state_bytes`` and ``measure_activation_bytes`` measure on a real model what
``lora_lab.estimate`` predicts. ``current_rss``, ``peak_rss_bytes``, ``reset_peak_rss`` and
``release_free_memory`` read and reset the process's resident memory (Linux; None or False
elsewhere). ``interleaved_times`` is the one timer of the course: chapters and benchmarks
compare functions with it, and ``median`` is the one statistic they report.
"""

import ctypes
import gc
import statistics
import sys
import time

from lora_lab.validate import int_at_least, module

_CLEAR_REFS = "/proc/self/clear_refs"  # Linux: writing "5" resets the peak RSS (VmHWM)


# ----------------------------------------------------------------------------- tensors


def _storages(tensors, seen):
    """Bytes of the storages behind ``tensors`` not yet in ``seen`` (which is updated)."""
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def _quant_state_tensors(param):
    """The tensors of a bitsandbytes 4-bit weight's quantization state (absmax, codes, ...)."""
    state = getattr(param, "quant_state", None)
    out = []
    while state is not None:
        out += [t for t in (state.absmax, state.code, state.offset) if t is not None]
        state = state.state2 if getattr(state, "nested", False) else None
    return out


def measure_state_bytes(model, optimizer=None):
    """Bytes held now by the parameters, their gradients and the optimizer's state tensors.

    Measured on the tensors (each storage counted once, in the first group that holds it);
    a bitsandbytes 4-bit weight's quantization constants count with the parameters.
    """
    import torch

    module("model", model)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
    params, seen = list(model.parameters()), set()
    if any(p.is_meta for p in params):
        raise ValueError("model has parameters on the meta device; measure a materialised model")
    quant = [t for p in params for t in _quant_state_tensors(p)]
    out = {"params": _storages(params + quant, seen)}
    out["grads"] = _storages([p.grad for p in params if p.grad is not None], seen)
    states = []
    if optimizer is not None:
        for state in optimizer.state.values():
            states += [v for v in state.values() if isinstance(v, torch.Tensor)]
    out["optimizer"] = _storages(states, seen)
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


def measure_activation_bytes(model, loss_fn):
    """Bytes autograd saves for backward while ``loss_fn()`` runs ``model`` forward.

    Every tensor saved for backward is seen through ``torch.autograd.graph.saved_tensors_hooks``;
    each storage counts once, and the model's parameters and buffers do not count.
    Returns ``(bytes, loss)``; call ``loss.backward()`` afterwards if you need it.
    """
    import torch

    module("model", model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable returning a loss, got {loss_fn!r}")
    seen = set()
    _storages(list(model.parameters()) + list(model.buffers()), seen)
    saved = [0]

    def pack(t):
        saved[0] += _storages([t], seen)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        raise ValueError("loss_fn must return a tensor that requires grad (a training loss)")
    return saved[0], loss


# ----------------------------------------------------------------------------- process memory


def release_free_memory():
    """Collect garbage and hand the C heap's free pages back to the OS (glibc only).

    Memory freed by earlier runs otherwise stays resident, and a later run reuses it without
    raising the RSS, so its peak would look smaller than it is. Returns False where the C
    library has no ``malloc_trim`` (then only the garbage collector ran).
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not Linux with glibc
        return False
    return True


def reset_peak_rss():
    """Reset the process's peak resident memory to its current value (Linux only).

    Returns True if it was reset, False where the OS offers no way to (then the peak
    ``train`` reports is the largest since the process started).
    """
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss():
    """The process's resident memory now, in bytes (None where /proc is missing)."""
    return _proc_status_bytes("VmRSS")


def _proc_status_bytes(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM...) in bytes; None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def peak_rss_bytes():
    """The process's peak resident set size in bytes (None where the OS does not report it).

    On Linux it is VmHWM from /proc/self/status, the peak that ``reset_peak_rss`` resets.
    getrusage's ru_maxrss is not: the kernel also folds the peak into it whenever a thread
    exits, so after a reset it can still report the old peak.
    """
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes, Linux: KiB


# ----------------------------------------------------------------------------- time


def sync(device):
    """Wait for the work queued on ``device`` (CUDA, MPS), so a clock reading covers it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def interleaved_times(fns, *, samples, calls=1, warmup=1, device=None, clock=time.perf_counter):
    """Seconds per call of each function of ``fns`` (a dict name -> callable taking nothing).

    Returns a dict name -> list of ``samples`` values. After ``warmup`` untimed calls of each,
    every sample times ``calls`` calls of each function in turn, reversing the order on every
    other sample, so a burst of load from other processes hits all sides of a sample alike.
    ``device``: the queued work on it (CUDA, MPS) is waited for before each clock reading.
    ``clock``: ``time.perf_counter`` (wall time), or ``time.thread_time`` to count only this
    thread's CPU time (on a CPU run with one thread, what the code itself costs).

    Summarise the samples with ``median``: the course's one statistic.
    """
    if not isinstance(fns, dict) or not fns or not all(callable(f) for f in fns.values()):
        raise TypeError(f"fns must be a non-empty dict of name -> callable, got {fns!r}")
    int_at_least("samples", samples)
    int_at_least("calls", calls)
    int_at_least("warmup", warmup, minimum=0)
    wait = (lambda: sync(device)) if device is not None else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    order = list(fns.items())
    for i in range(samples):
        for name, fn in order if i % 2 == 0 else order[::-1]:
            wait()
            start = clock()
            for _ in range(calls):
                fn()
            wait()
            times[name].append((clock() - start) / calls)
    return times


def median(samples):
    """The median of timing samples: the course's one statistic for time.

    Half the samples are faster, half slower: a burst of load in a few samples moves it
    little (unlike the mean), and it is the time a typical call takes (unlike the minimum,
    which only a quiet moment reaches). Given a dict of sample lists, a dict of medians.
    """
    if isinstance(samples, dict):
        return {name: statistics.median(v) for name, v in samples.items()}
    return statistics.median(samples)


def compare(fn_a, fn_b, **timing):
    """``fn_a`` against ``fn_b``: (median seconds of a, of b, median of the paired ratios a/b).

    ``timing``: ``interleaved_times``' keywords (``samples`` is required). Each ratio compares
    the two calls of one sample, made moments apart, so it is steadier than a ratio of medians.
    """
    times = interleaved_times({"a": fn_a, "b": fn_b}, **timing)
    ratios = [a / b for a, b in zip(times["a"], times["b"], strict=True)]
    return median(times["a"]), median(times["b"]), median(ratios)


__all__ = [
    "compare",
    "current_rss",
    "interleaved_times",
    "measure_activation_bytes",
    "measure_state_bytes",
    "median",
    "peak_rss_bytes",
    "release_free_memory",
    "reset_peak_rss",
    "sync",
]
