"""lora_lab: the helper package of the LoRA Lab course.

Each module holds one concept; this file only re-exports the public names so a
notebook can write ``from lora_lab import LoRALinear``. Names are resolved on
first use, so importing ``lora_lab`` stays cheap and pulls in no heavy library
(transformers, peft, bitsandbytes) until a chapter asks for it.
"""

import os
from importlib import import_module

# torch's OpenMP worker threads busy-wait ("spin") after each parallel region. When another
# process competes for the cores, the spinning workers take the CPU time the working thread
# needs, and a chapter on a 2-core machine runs 3 to 10 times slower than on a quiet one
# (benchmarks/busy_machine.py measures it). PASSIVE makes idle workers sleep instead. OpenMP
# reads the variable once, when torch loads it, so it is set here, before lora_lab's first
# ``import torch``; a value already in the environment wins, and a torch imported before
# lora_lab keeps the runtime's default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # utils: seeding, device choice, environment report
    "set_seed": "utils",
    "get_device": "utils",
    "print_versions": "utils",
    "in_colab": "utils",
    # low-rank helpers (chapter 2)
    "low_rank_approx": "lowrank",
    "sample_image": "lowrank",
    "energy_captured": "lowrank",
    # LoRA core (chapters 3, 4)
    "LoRALinear": "lora",
    "apply_lora": "lora",
    "count_parameters": "lora",
    "merge_lora": "lora",
    # adapters in PEFT's format (chapter 7)
    "save_adapter": "adapters",
    "load_adapter": "adapters",
    # any model: the MODEL switch, 16-bit types, settings by size, offline test models
    "chosen_model": "hub",
    "is_shipped": "hub",
    "half_dtype": "hub",
    "train_settings": "hub",
    "save_random_model": "hub",
    "logits_agree": "hub",
    # the shipped model, its tokenizer and data (chapters 4-10)
    "GPT": "model",
    "GPTConfig": "model",
    "load_pretrained": "model",
    "load_model": "model",
    "CharTokenizer": "tokenizer",
    "get_task": "data",
    "TASKS": "data",
    # memory estimator (chapter 1)
    "estimate_memory": "memory",
    "ModelSpec": "memory",
    "PRESETS": "memory",
    "lesson_table": "memory",
    "measure_state_bytes": "memory",
    "memory_calculator": "memory",
    # quantization (chapter 6)
    "nf4_codebook": "quant",
    "quantize_nf4": "quant",
    "QLoRALinear": "quant",
    "apply_qlora": "quant",
    "QuantizedTensor": "quant",
    "quantize_4bit": "quant",
    "quantize_int4": "quant",
    "quantize_fp4": "quant",
    "fp4_codebook": "quant",
    "int4_codebook": "quant",
    "dynamic_map": "quant",
}

# ``train`` is both a submodule and its main function. Importing the submodule sets the
# package attribute ``lora_lab.train`` to the module, which would hide the function, so
# the three training functions are bound here, eagerly (lora_lab.train needs only torch).
from lora_lab.train import evaluate, generate, train  # noqa: E402, F401

__all__ = sorted([*_EXPORTS, "train", "generate", "evaluate"]) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_lab' has no attribute {name!r}")
    value = getattr(import_module(f"lora_lab.{module}"), name)
    globals()[name] = value  # cache: the next lookup is a plain attribute
    return value


def __dir__():
    return __all__
