"""The GPU check: the model chapters on a GPU, and fine-tuning memory of a Llama-2-7B shape.

    python scripts/gpu_check.py                  # on a CUDA machine: everything, lora_lab/results/gpu_check.json
    python scripts/gpu_check.py --no-chapters    # memory only
    python scripts/gpu_check.py --out x.json     # write elsewhere

On a CUDA machine it
1. executes every chapter that reads the MODEL switch, on the shipped model and on a local
   random-weight Qwen2 (bf16, built offline by lora_lab.save_random_model), and records
   pass or fail and seconds;
2. builds a Llama-2-7B-shaped model with random weights (nothing downloaded), saves it to a
   scratch folder, and measures the peak GPU memory (``torch.cuda.max_memory_allocated``) of
   one AdamW step, batch 1 x 512 tokens, for full fine-tuning (pure bf16, the lesson's
   convention), LoRA (bf16 base, fp32 adapters r=8 on q/k/v/o) and QLoRA (NF4 with double
   quantization, bf16 compute, the same adapters; transformers + bitsandbytes + PEFT),
   beside chapter 1's estimate and the lesson's 56 / 14 / 4 GB. A method whose estimate
   exceeds the GPU's memory, or that runs out of memory, is reported as skipped: never
   estimated in its place.

Without CUDA it says so, and measures the same three methods on a small Llama shape on the
CPU, counting tensor bytes as chapter 1 does (states by ``measure_state_bytes``, activations
by ``measure_activation_bytes``), into runs/gpu_check_cpu.json unless ``--out`` is given.
"""

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GPU_RESULT = (
    ROOT / "lora_lab" / "results" / "gpu_check.json"
)  # committed; chapter 1 and the claims page read it
CPU_RESULT = ROOT / "runs" / "gpu_check_cpu.json"  # not committed
LESSON_GB = {"full": 56, "lora": 14, "qlora": 4}  # the lesson's figures for a 7B model
BATCH, SEQ, RANK, ALPHA = 1, 512, 8, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SMALL = dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ)  # fmt: skip


def log(msg):
    print(msg, flush=True)


# ----------------------------------------------------------------------------- chapters


def model_chapters():
    """The chapters that read the MODEL switch (``chosen_model()``)."""
    return sorted(
        p
        for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")
        if "chosen_model()" in p.read_text()
    )


def run_chapter(path, model_env, timeout=900):
    """Execute one chapter with LORA_LAB_MODEL=model_env; (ok, seconds, error or None)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    old = os.environ.get("LORA_LAB_MODEL")
    os.environ["LORA_LAB_MODEL"] = model_env
    t0 = time.perf_counter()
    try:
        NotebookClient(
            nb, timeout=timeout, resources={"metadata": {"path": str(path.parent)}}
        ).execute()
        return True, time.perf_counter() - t0, None
    except Exception as err:  # noqa: BLE001 - any failure of a chapter is reported, not raised
        return False, time.perf_counter() - t0, f"{type(err).__name__}: {str(err)[-500:]}"
    finally:
        if old is None:
            os.environ.pop("LORA_LAB_MODEL", None)
        else:
            os.environ["LORA_LAB_MODEL"] = old


def check_chapters(scratch):
    from lora_lab import save_random_model
    from lora_lab.hub import SHIPPED_MODEL

    local = save_random_model("qwen2", Path(scratch) / "tiny-qwen2", dtype=torch.bfloat16)
    rows = []
    for path in model_chapters():
        for label, env in (("shipped", SHIPPED_MODEL), ("random qwen2 (bf16)", str(local))):
            ok, seconds, error = run_chapter(path, env)
            log(f"  {path.name:<34} {label:<20} {'ok' if ok else 'FAILED'} {seconds:6.1f} s")
            rows.append({"chapter": path.name, "model": label, "ok": ok,
                         "seconds": round(seconds, 1), "error": error})  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- memory


def _config(shape):
    from transformers import LlamaConfig

    if shape == "llama-2-7b":  # LlamaConfig's defaults are Llama-2-7B's shape
        return LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False)
    return LlamaConfig(tie_word_embeddings=False, **SMALL)


def _estimate(method, shape, config):
    from lora_lab import estimate_memory
    from lora_lab.specs import ModelSpec

    spec = ModelSpec.from_config(config)
    kw = dict(
        batch_size=BATCH, seq_len=SEQ, attention="flash"
    )  # SDPA: fused kernels on CPU and GPU
    if method == "full":
        return estimate_memory(spec, "full", precision="bf16", convention="lesson", **kw)
    return estimate_memory(spec, method, precision="bf16", rank=RANK, target_modules=TARGETS, **kw)


def _build(method, folder, device):
    """The model for ``method``, loaded from ``folder`` as a learner would load a checkpoint."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    if method == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quant, dtype=torch.bfloat16, device_map={"": device}
        )
        return get_peft_model(model, lora)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device)
    return get_peft_model(model, lora) if method == "lora" else model.requires_grad_(True)


def _one_step(model, vocab, device):
    """One AdamW step on random tokens; returns (activation bytes saved, state bytes)."""
    from lora_lab.measure import measure_activation_bytes, measure_state_bytes

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (BATCH, SEQ), generator=gen).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    saved, loss = measure_activation_bytes(model, lambda: model(input_ids=x, labels=x).loss)
    loss.backward()
    optimizer.step()
    return saved, measure_state_bytes(model, optimizer)


def measure(shape, device, scratch):
    """Rows of (method, estimate, measurement or the reason it was skipped)."""
    from transformers import LlamaForCausalLM

    config = _config(shape)
    folder = Path(scratch) / shape
    log(f"building a {shape}-shaped model with random weights in {folder} ...")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build straight in bf16: half the memory
    try:
        with torch.device(device):
            LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    finally:
        torch.set_default_dtype(default)
    gc.collect()
    capacity = (
        torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    )
    rows = []
    for method in ("full", "lora", "qlora"):
        est = _estimate(method, shape, config)
        row = {"method": method, "estimate_bytes": est.total, "estimate_gb": round(est.gb(), 2),
               "lesson_gb": LESSON_GB[method] if shape == "llama-2-7b" else None}  # fmt: skip
        if capacity is not None and est.total > capacity:
            row["skipped"] = f"estimate {est.gb():.1f} GB exceeds the GPU's {capacity / 1e9:.1f} GB"
            rows.append(row)
            log(f"  {method}: skipped ({row['skipped']})")
            continue
        model = None
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            model = _build(method, folder, device)
            saved, states = _one_step(model, config.vocab_size, device)
            row.update(activation_bytes=saved, state_bytes=states["total"],
                       tensor_bytes=saved + states["total"])  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
                row["measured_gb"] = round(row["peak_allocated_bytes"] / 1e9, 2)
            else:
                row["measured_gb"] = round(row["tensor_bytes"] / 1e9, 4)
            row["measured_over_estimate"] = round(row["measured_gb"] * 1e9 / est.total, 3)
            log(f"  {method}: measured {row['measured_gb']} GB, estimate {est.gb():.2f} GB")
        except torch.cuda.OutOfMemoryError as err:
            row["skipped"] = f"out of GPU memory during the step ({str(err).splitlines()[0]})"
            log(f"  {method}: skipped ({row['skipped']})")
        except Exception as err:  # noqa: BLE001 - a method that cannot run here is reported
            row["skipped"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            log(f"  {method}: skipped ({row['skipped']})")
        finally:
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON result")
    parser.add_argument("--no-chapters", action="store_true", help="skip executing the chapters")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="folder for the random-weight models (default: a temporary one)")  # fmt: skip
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    if not cuda:
        log("No CUDA GPU here: measuring a small Llama shape on the CPU instead (tensor bytes, as "
            "chapter 1 counts them); the 7B check needs a GPU.")  # fmt: skip
    out = args.out or (GPU_RESULT if cuda else CPU_RESULT)
    result = {
        "cuda": cuda,
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.machine()})",
        "shape": "llama-2-7b" if cuda else "small-llama",
        "batch_size": BATCH, "seq_len": SEQ, "rank": RANK, "target_modules": TARGETS,
        "torch": torch.__version__,
        "when": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        if not args.no_chapters and cuda:
            log("chapters that read MODEL:")
            result["chapters"] = check_chapters(scratch)
        result["memory"] = measure(result["shape"], device, scratch)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)  # whole or not at all
    log(f"wrote {out}")
    failed = [r for r in result.get("chapters", []) if not r["ok"]]
    return (
        1
        if failed or any(not math.isfinite(r.get("estimate_bytes", 0)) for r in result["memory"])
        else 0
    )


if __name__ == "__main__":
    sys.exit(main())
