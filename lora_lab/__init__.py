"""lora_lab: the helper package of the LoRA Lab course.

Each module holds one concept; this file only re-exports the public names so a
notebook can write ``from lora_lab import LoRALinear``. The modules import only torch
at import time (transformers, peft, bitsandbytes and pandas are imported inside the
functions that need them), so ``import lora_lab`` stays cheap.
"""

import os

# torch's OpenMP worker threads busy-wait ("spin") after each parallel region. When another
# process competes for the cores, the spinning workers take the CPU time the working thread
# needs, and a chapter on a 2-core machine runs 3 to 10 times slower than on a quiet one
# (benchmarks/busy_machine.py measures it). PASSIVE makes idle workers sleep instead. OpenMP
# reads the variable once, when torch loads it, so it is set here, before lora_lab's first
# ``import torch``; a value already in the environment wins, and a torch imported before
# lora_lab keeps the runtime's default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.3.0"

# adapters in PEFT's format (chapter 7)
from lora_lab.adapters import load_adapter, save_adapter  # noqa: E402

# the tasks (chapters 4-10)
from lora_lab.data import TASKS, get_task  # noqa: E402

# the byte formulas (chapter 1)
from lora_lab.estimate import estimate_memory, lesson_table  # noqa: E402

# any model: the MODEL switch, 16-bit types, settings by size, offline test models
from lora_lab.hub import (  # noqa: E402
    chosen_model,
    half_dtype,
    is_shipped,
    logits_agree,
    save_random_model,
    train_settings,
)

# LoRA core (chapters 3, 4)
from lora_lab.lora import LoRALinear, apply_lora, count_parameters, merge_lora  # noqa: E402

# low-rank helpers (chapter 2)
from lora_lab.lowrank import energy_captured, low_rank_approx, sample_image  # noqa: E402

# measurement: tensor bytes and the one timer (chapters 1, 5, 7, 8)
from lora_lab.measure import interleaved_times, measure_state_bytes, median  # noqa: E402

# the shipped model and its tokenizer (chapters 4-10)
from lora_lab.model import GPT, GPTConfig, load_model, load_pretrained  # noqa: E402

# quantization (chapter 6): the layer, the codebooks, the quantizers
from lora_lab.quant import QLoRALinear, QuantizedTensor, apply_qlora  # noqa: E402

# isort: split
from lora_lab.quant import (  # noqa: E402
    dynamic_map,
    e2m1_codebook,
    fp4_codebook,
    int4_codebook,
    nf4_codebook,
)

# isort: split
from lora_lab.quant import (  # noqa: E402
    quantize_4bit,
    quantize_e2m1,
    quantize_fp4,
    quantize_int4,
    quantize_nf4,
)

# several named adapters on one base, mixed batches, hot-swapping (chapter 12)
from lora_lab.serving import (  # noqa: E402
    add_adapter,
    delete_adapter,
    hot_swap,
    list_adapters,
    load_named_adapter,
    mixed_batch,
    set_adapter,
)

# model specs and presets (chapter 1)
from lora_lab.specs import PRESETS, ModelSpec  # noqa: E402
from lora_lab.tokenizer import CharTokenizer  # noqa: E402

# training: fine-tune, sample, score (chapters 5-10)
from lora_lab.training import evaluate, generate, train  # noqa: E402

# utils: seeding, device choice, environment report
from lora_lab.utils import get_device, in_colab, print_versions, set_seed  # noqa: E402

# LoRA's variants: the PiSSA and LoftQ starts, LoRA+'s optimizer (chapter 11)
from lora_lab.variants import create_loraplus_optimizer  # noqa: E402

# the memory calculator widget (chapter 1)
from lora_lab.widgets import memory_calculator  # noqa: E402

__all__ = [
    "__version__",
    "add_adapter",
    "apply_lora",
    "apply_qlora",
    "CharTokenizer",
    "chosen_model",
    "count_parameters",
    "create_loraplus_optimizer",
    "delete_adapter",
    "dynamic_map",
    "e2m1_codebook",
    "energy_captured",
    "estimate_memory",
    "evaluate",
    "fp4_codebook",
    "generate",
    "get_device",
    "get_task",
    "GPT",
    "GPTConfig",
    "half_dtype",
    "hot_swap",
    "in_colab",
    "int4_codebook",
    "interleaved_times",
    "is_shipped",
    "lesson_table",
    "list_adapters",
    "load_adapter",
    "load_model",
    "load_named_adapter",
    "load_pretrained",
    "logits_agree",
    "LoRALinear",
    "low_rank_approx",
    "measure_state_bytes",
    "median",
    "memory_calculator",
    "merge_lora",
    "mixed_batch",
    "ModelSpec",
    "nf4_codebook",
    "PRESETS",
    "print_versions",
    "QLoRALinear",
    "quantize_4bit",
    "quantize_e2m1",
    "quantize_fp4",
    "quantize_int4",
    "quantize_nf4",
    "QuantizedTensor",
    "sample_image",
    "save_adapter",
    "save_random_model",
    "set_adapter",
    "set_seed",
    "TASKS",
    "train",
    "train_settings",
]
