"""Any model, one switch: which model a chapter uses, the dtype it computes in, its settings.

A chapter that loads a model writes ``MODEL = chosen_model()`` and passes ``MODEL`` to
``load_model``. ``chosen_model()`` is the environment variable ``LORA_LAB_MODEL`` when it is
set, else the shipped tiny model; a learner on Colab replaces the line with a Hub ID such as
``MODEL = "Qwen/Qwen2.5-0.5B"``. Nothing else in the chapter changes: sizes come from
``ModelSpec.from_model``, training settings from ``train_settings``, 16-bit types from
``half_dtype``.

``save_random_model`` builds small random-weight transformers models offline (Qwen2 with
grouped-query attention, GPT-2 with Conv1D layers, ...): CI runs the model chapters on them.
"""

import os
from dataclasses import dataclass

import torch

from .files import write_folder
from .validate import choice, module

MODEL_ENV = "LORA_LAB_MODEL"  # the environment variable chosen_model() reads
SHIPPED_MODEL = "lora-lab/tiny-gpt"  # the name of the shipped checkpoint (lora_lab.model)
HALF = (torch.float16, torch.bfloat16)


def chosen_model():
    """The model a chapter runs on: ``$LORA_LAB_MODEL`` if set and not empty, else the shipped one."""
    name = os.environ.get(MODEL_ENV, "").strip()
    return name or SHIPPED_MODEL


def is_shipped(name):
    """True when ``name`` (a MODEL setting) means the shipped tiny model."""
    return name is None or name == SHIPPED_MODEL


# ----------------------------------------------------------------------------- 16-bit


def half_dtype(device):
    """The 16-bit type ``device`` computes natively, or None where it has none worth using.

    CUDA: bfloat16 from compute capability 8.0 (Ampere) on, else float16. A T4 (7.5) is
    float16: ``torch.cuda.is_bf16_supported()`` answers True there too, because it counts
    bfloat16 that is emulated. MPS: float16. CPU: None (it computes 16-bit, but no faster).
    """
    device = torch.device(device)
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if device.type == "mps":
        return torch.float16
    return None


def _as_dtype(value):
    if isinstance(value, torch.dtype) or value is None:
        return value
    return getattr(torch, str(value), None) if isinstance(value, str) else None


def load_dtype(stored, device):
    """The dtype to load a checkpoint stored in ``stored`` in, on ``device``.

    A 16-bit checkpoint stays 16-bit (the frozen base of LoRA and QLoRA is stored that way),
    but in the type the device computes: bfloat16 weights become float16 on a GPU without
    native bfloat16. Anything else loads as stored. On the CPU a bfloat16 model stays
    bfloat16: correct, only slower than on a GPU.
    """
    stored = _as_dtype(stored) or torch.float32
    native = half_dtype(device)
    if stored in HALF and native is not None and torch.device(device).type == "cuda":
        return stored if stored == torch.float16 else native
    return stored


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class TrainSettings:
    """Learning rates, batch size and steps that suit a model of a given size."""

    lr_lora: float  # AdamW learning rate of LoRA (and QLoRA) adapters
    lr_full: float  # AdamW learning rate of full fine-tuning
    batch_size: int
    steps: int
    why: str  # where the numbers come from


# (largest total parameter count, settings), smallest first. The shipped model's row holds
# the values its chapters were tuned with (chapter 5's learning-rate check); the others
# follow the QLoRA paper's LoRA rates (2e-4 up to 13B, 1e-4 above) and the usual 1e-5 to
# 2e-5 for full fine-tuning, with batches a 16 GB GPU holds.
SETTINGS_BY_SIZE = (
    (20_000_000, TrainSettings(3e-3, 3e-4, 16, 60, "tuned on the shipped model (chapter 5)")),
    (2_000_000_000, TrainSettings(2e-4, 2e-5, 8, 60, "QLoRA paper's LoRA rate; full at 1/10")),
    (15_000_000_000, TrainSettings(2e-4, 1e-5, 4, 60, "QLoRA paper's rate for 7B-13B")),
    (float("inf"), TrainSettings(1e-4, 1e-5, 1, 60, "QLoRA paper's rate for 33B-65B")),
)


def train_settings(model):
    """The ``TrainSettings`` row for ``model`` (an nn.Module), chosen by its parameter count."""
    module("model", model)
    n = sum(p.numel() for p in model.parameters())
    return next(row for limit, row in SETTINGS_BY_SIZE if n <= limit)


# ----------------------------------------------------------------------------- test models

RANDOM_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2")


def _tiny_config(arch, vocab_size, eos_id):
    import transformers as tf

    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab_size, n_positions=256, n_embd=64, n_layer=2, n_head=4,
            bos_token_id=eos_id, eos_token_id=eos_id, tie_word_embeddings=True,
        )  # fmt: skip
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=None,
    )  # fmt: skip
    classes = {
        "llama": (tf.LlamaConfig, {"tie_word_embeddings": False}),
        "mistral": (tf.MistralConfig, {"tie_word_embeddings": False, "sliding_window": None}),
        "qwen2": (tf.Qwen2Config, {"tie_word_embeddings": True}),
        "qwen3": (tf.Qwen3Config, {"tie_word_embeddings": True, "head_dim": 16}),
        "gemma": (tf.GemmaConfig, {"head_dim": 16}),
        "phi3": (tf.Phi3Config, {"tie_word_embeddings": False, "pad_token_id": None}),
    }
    cls, extra = classes[arch]
    return cls(**{**common, **extra})


def save_random_model(arch, path, dtype=torch.bfloat16, seed=0):
    """Build a tiny random-weight transformers model of family ``arch`` and save it to ``path``.

    Two blocks, width 64, 4 query heads sharing 2 key/value heads (GPT-2: 4 heads), the
    shipped character tokenizer (96 tokens): ``load_model(path)`` loads it with nothing
    downloaded. Weights are stored in ``dtype``. ``path`` must not exist yet (or be empty);
    the folder is written beside it and moved into place whole. Returns ``path``.
    """
    import transformers

    from .tokenizer import CharTokenizer

    if arch not in RANDOM_ARCHS:
        raise ValueError(f"arch must be one of {RANDOM_ARCHS}, got {arch!r}")
    if dtype not in (torch.float32, *HALF):
        raise ValueError(
            f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}"
        )
    tok = CharTokenizer()
    config = _tiny_config(arch, tok.vocab_size, tok.EOS_ID)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)

    def write(folder):
        model.save_pretrained(folder, safe_serialization=True)
        tok.to_transformers().save_pretrained(folder)

    return write_folder(path, write)


# ----------------------------------------------------------------------------- comparing


def logit_tolerance(dtype):
    """``(rtol, atol)`` for comparing two models' logits computed in ``dtype``.

    float32: (0, 0), exact: the same operations in the same order give the same bits. A
    16-bit type: two units in the last place of its 8 (bfloat16) or 11 (float16) significant
    bits, relative, and as much absolute near zero: two paths that round once differently
    stay within it.
    """
    eps = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
    choice("dtype", dtype, eps)
    return 2 * eps[dtype], 2 * eps[dtype]


def logits_agree(a, b):
    """True when logits ``a`` and ``b`` (same dtype) agree within ``logit_tolerance``."""
    if a.dtype != b.dtype or a.shape != b.shape:
        raise ValueError(
            f"a and b must match: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
        )
    rtol, atol = logit_tolerance(a.dtype)
    if rtol == 0:
        return torch.equal(a, b)
    return torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol)
