"""How much memory fine-tuning needs: parameter counts from a config, and bytes per component.

A ``ModelSpec`` describes a decoder-only transformer by its architecture numbers; every
parameter count is computed from them (``parameter_shapes`` names each tensor as transformers
does). ``estimate_memory`` turns a spec, a preset name or a config into bytes for the weights,
the gradients, the optimizer's states, the activations and the LoRA adapter, for full, LoRA
and QLoRA fine-tuning. ``measure_state_bytes`` and ``measure_activation_bytes`` measure the
same quantities on a real model, so the two can be compared.

Units: ``GB`` is 10**9 bytes (the unit of the lesson's "28 GB" for 7e9 fp32 weights) and
``GiB`` is 2**30 bytes (an "80 GB" A100 holds 80 GiB: nvidia-smi shows 81920 MiB).
"""

import math
import numbers
import re
from dataclasses import dataclass, field, fields

from lora_lab.lora import ALL_LINEAR, check_target_modules, target_matches
from lora_lab.quant import DQ_BLOCKSIZE as NF4_NESTED_BLOCK  # the absmaxes, 8-bit, 256 a block
from lora_lab.quant import NF4_BLOCKSIZE as NF4_BLOCK  # one absmax per 64 weights

GB = 10**9  # a decimal gigabyte
GiB = 2**30  # a binary gibibyte

PRECISIONS = {"fp32": 4, "fp16": 2, "bf16": 2}  # bytes per element
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw_8bit", "sgd_momentum", "sgd")
CONVENTIONS = ("mixed", "lesson")
ATTENTIONS = ("flash", "eager")

ADAMW_8BIT_BLOCK = 256  # bitsandbytes' 8-bit optimizers: one fp32 absmax per 256 values
ADAMW_8BIT_MIN_SIZE = 4096  # ... and tensors smaller than this keep fp32 states


def _bad(name, value, valid):
    return ValueError(f"{name} must be one of {list(valid)}, got {value!r}")


def _check_choice(name, value, valid):
    if value not in valid:
        raise _bad(name, value, valid)


def _check_positive_int(name, value, limit=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if limit is not None and value > limit:
        raise ValueError(
            f"{name} must be at most {limit:,} (no real model is larger), got {value!r}"
        )


# Bounds on a ModelSpec: each a few times the largest published model's, so a typo (or a
# hostile config) is refused at once instead of making the estimator loop for minutes.
SPEC_LIMITS = {
    "vocab_size": 10_000_000,
    "hidden_size": 1_000_000,
    "intermediate_size": 10_000_000,
    "num_layers": 10_000,
    "num_heads": 100_000,
    "max_positions": 100_000_000,
}


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


# ----------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class ModelSpec:
    """The architecture numbers of a decoder-only transformer, enough to count every weight."""

    name: str = "custom"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008  # width of the MLP's hidden layer
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: as many as num_heads (no grouped-query attention)
    head_dim: int | None = None  # None: hidden_size // num_heads
    mlp: str = "gated"  # "gated": SwiGLU gate/up/down (Llama); "plain": GELU up/down (GPT-2)
    norm: str = "rmsnorm"  # "rmsnorm": a weight; "layernorm": a weight and a bias
    qkv_bias: bool = False  # biases on the query/key/value projections (GPT-2, Qwen2)
    o_bias: bool = False  # bias on the attention output projection (GPT-2)
    mlp_bias: bool = False  # biases on the MLP's linear layers (GPT-2)
    qk_norm: bool = False  # an RMSNorm on each query and key head (Qwen3)
    tied_embeddings: bool = False  # lm_head shares the token embedding matrix (GPT-2)
    position_embeddings: str = "rope"  # "rope": no weights; "learned": a (max_positions, d) table
    max_positions: int = 4096  # context length the model was trained for
    naming: str = "llama"  # names as in "llama" (LlamaForCausalLM), "phi3" (fused) or "gpt2"

    def __post_init__(self):
        for f, limit in SPEC_LIMITS.items():
            _check_positive_int(f"ModelSpec.{f}", getattr(self, f), limit)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ModelSpec.name must be a non-empty string, got {self.name!r}")
        kv, hd = self.num_kv_heads, self.head_dim
        if kv is not None:
            _check_positive_int("ModelSpec.num_kv_heads", kv)
            if self.num_heads % kv:
                raise ValueError(
                    f"ModelSpec.num_heads ({self.num_heads}) must be a multiple of "
                    f"num_kv_heads ({kv})"
                )
        if hd is not None:
            _check_positive_int("ModelSpec.head_dim", hd)
        elif self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelSpec.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads}) when head_dim is None"
            )
        _check_choice("ModelSpec.mlp", self.mlp, ("gated", "plain"))
        _check_choice("ModelSpec.norm", self.norm, ("rmsnorm", "layernorm"))
        _check_choice(
            "ModelSpec.position_embeddings", self.position_embeddings, ("rope", "learned")
        )
        _check_choice("ModelSpec.naming", self.naming, ("llama", "phi3", "gpt2"))
        if self.naming == "phi3" and self.mlp != "gated":
            raise ValueError("ModelSpec.naming='phi3' means a fused gate_up_proj (mlp='gated')")
        for f in ("qkv_bias", "o_bias", "mlp_bias", "qk_norm", "tied_embeddings"):
            _check_bool(f"ModelSpec.{f}", getattr(self, f))
        if self.naming == "gpt2":
            fused_ok = self.kv_heads == self.num_heads and self.qk_dim == self.hidden_size
            if not fused_ok or self.mlp != "plain":
                raise ValueError(
                    "ModelSpec.naming='gpt2' means a fused c_attn (no grouped-query attention, "
                    "num_heads * head_dim == hidden_size) and a plain MLP (mlp='plain')"
                )

    @property
    def kv_heads(self):
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dim_per_head(self):
        return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def qk_dim(self):
        """Width of the concatenated query heads (= hidden_size unless head_dim says otherwise)."""
        return self.num_heads * self.dim_per_head

    @property
    def kv_dim(self):
        """Width of the key (and of the value) projection: smaller under grouped-query attention."""
        return self.kv_heads * self.dim_per_head

    @classmethod
    def from_config(cls, config):
        """A spec from a preset name, a transformers config (or its dict) or a GPTConfig."""
        return _spec_from(config)

    @classmethod
    def from_model(cls, model):
        """The spec of a model in memory: the shipped GPT, a transformers model, or either
        wrapped by PEFT. The one place a chapter reads a model's sizes from."""
        import torch.nn as nn

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for m in (model, getattr(model, "base_model", None)):
            for candidate in (m, getattr(m, "model", None)):
                config = getattr(candidate, "config", None)
                if config is not None and not isinstance(config, dict):
                    return _spec_from(config)
        raise TypeError(
            f"model ({type(model).__name__}) has no .config: pass the shipped GPT or a "
            "transformers model"
        )

    def attention_targets(self):
        """The ``target_modules`` that put LoRA on the attention projections, by naming."""
        return _default_targets(self)

    # -- the tensors ----------------------------------------------------------------------

    def linear_layers(self):
        """The linear layers of one block: relative name -> (in_features, out_features, bias)."""
        d, inter = self.hidden_size, self.intermediate_size
        q, kv = self.qk_dim, self.kv_dim
        if self.naming == "phi3":  # fused q/k/v and gate/up
            return {
                "self_attn.qkv_proj": (d, q + 2 * kv, self.qkv_bias),
                "self_attn.o_proj": (q, d, self.o_bias),
                "mlp.gate_up_proj": (d, 2 * inter, self.mlp_bias),
                "mlp.down_proj": (inter, d, self.mlp_bias),
            }
        if self.naming == "gpt2":
            return {
                "attn.c_attn": (d, 3 * d, self.qkv_bias),
                "attn.c_proj": (d, d, self.o_bias),
                "mlp.c_fc": (d, inter, self.mlp_bias),
                "mlp.c_proj": (inter, d, self.mlp_bias),
            }
        layers = {
            "self_attn.q_proj": (d, q, self.qkv_bias),
            "self_attn.k_proj": (d, kv, self.qkv_bias),
            "self_attn.v_proj": (d, kv, self.qkv_bias),
            "self_attn.o_proj": (q, d, self.o_bias),
        }
        if self.mlp == "gated":
            layers["mlp.gate_proj"] = (d, inter, self.mlp_bias)
        layers["mlp.up_proj"] = (d, inter, self.mlp_bias)
        layers["mlp.down_proj"] = (inter, d, self.mlp_bias)
        return layers

    def layer_prefix(self, i):
        return f"transformer.h.{i}." if self.naming == "gpt2" else f"model.layers.{i}."

    def parameter_shapes(self):
        """Every parameter tensor, named as transformers names it: name -> shape.

        A tied lm_head is not listed (it is the embedding matrix), as in ``named_parameters``.
        """
        d, gpt2 = self.hidden_size, self.naming == "gpt2"
        norm = {"weight": (d,), "bias": (d,)} if self.norm == "layernorm" else {"weight": (d,)}
        top = "transformer." if gpt2 else "model."
        shapes = {top + ("wte" if gpt2 else "embed_tokens") + ".weight": (self.vocab_size, d)}
        if self.position_embeddings == "learned":
            shapes[top + ("wpe" if gpt2 else "embed_positions") + ".weight"] = (
                self.max_positions,
                d,
            )
        norms = ("ln_1", "ln_2") if gpt2 else ("input_layernorm", "post_attention_layernorm")
        for i in range(self.num_layers):
            prefix = self.layer_prefix(i)
            for rel, (fin, fout, bias) in self.linear_layers().items():
                # transformers' GPT-2 uses Conv1D, whose weight is stored (in, out)
                shapes[f"{prefix}{rel}.weight"] = (fin, fout) if gpt2 else (fout, fin)
                if bias:
                    shapes[f"{prefix}{rel}.bias"] = (fout,)
            if self.qk_norm:
                shapes[f"{prefix}self_attn.q_norm.weight"] = (self.dim_per_head,)
                shapes[f"{prefix}self_attn.k_norm.weight"] = (self.dim_per_head,)
            for n in norms:
                for kind, shape in norm.items():
                    shapes[f"{prefix}{n}.{kind}"] = shape
        for kind, shape in norm.items():
            shapes[top + ("ln_f" if gpt2 else "norm") + f".{kind}"] = shape
        if not self.tied_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        return shapes

    def num_parameters(self):
        """Total number of parameters (a tied lm_head counted once)."""
        return sum(math.prod(s) for s in self.parameter_shapes().values())

    def parameter_table(self):
        """A pandas DataFrame: each kind of tensor, its shape, how many there are, their total."""
        import pandas as pd

        rows = {}
        for name, shape in self.parameter_shapes().items():
            kind = re.sub(r"^(model|transformer)\.(layers|h)\.\d+\.", "layers.*.", name)
            row = rows.setdefault(kind, {"tensor": kind, "shape": shape, "count": 0})
            row["count"] += 1
        df = pd.DataFrame(rows.values())
        df["parameters"] = [math.prod(s) * c for s, c in zip(df["shape"], df["count"], strict=True)]
        df["share"] = df["parameters"] / df["parameters"].sum()
        return df

    def lora_parameters(self, rank=8, target_modules=None):
        """Number of LoRA parameters (lora_A and lora_B) for ``rank`` and ``target_modules``."""
        _check_positive_int("rank", rank)
        return sum(rank * (fin + fout) for _, fin, fout in self._lora_targets(target_modules))

    def max_rank(self, target_modules=None):
        """The largest LoRA rank every targeted layer allows: the least min(in, out) among them."""
        return min(min(fin, fout) for _, fin, fout in self._lora_targets(target_modules))

    def _lora_targets(self, target_modules):
        """(full name, in, out) of every targeted linear layer, checked against the names."""
        targets = _check_targets(target_modules, self)
        found = []
        for i in range(self.num_layers):
            for rel, (fin, fout, _) in self.linear_layers().items():
                full = self.layer_prefix(i) + rel
                if _target_matches(full, targets):
                    found.append((full, fin, fout))
        if not found:
            raise ValueError(
                f"target_modules {targets!r} matched no linear layer of {self.name}; its layers "
                f"are {list(self.linear_layers())} (in every block: {self.layer_prefix(0)}...), "
                f"or use {ALL_LINEAR!r}"
            )
        return found


def _default_targets(spec):
    """The attention projections: q/k/v/o, Phi-3's qkv_proj/o_proj, or GPT-2's c_attn/c_proj."""
    if spec.naming == "gpt2":
        return ("c_attn", "attn.c_proj")
    if spec.naming == "phi3":
        return ("qkv_proj", "o_proj")
    return ("q_proj", "k_proj", "v_proj", "o_proj")


def _check_targets(target_modules, spec):
    if target_modules is None:
        return _default_targets(spec)
    target_modules = check_target_modules(target_modules)  # the same rules as apply_lora
    if isinstance(target_modules, str):
        return target_modules
    full_names = [
        spec.layer_prefix(i) + rel for i in range(spec.num_layers) for rel in spec.linear_layers()
    ]
    unknown = [t for t in target_modules if not any(_target_matches(n, (t,)) for n in full_names)]
    if unknown:
        valid = sorted(
            {".".join(rel.split(".")[k:]) for rel in spec.linear_layers() for k in (0, 1)}
        )
        raise ValueError(
            f"target_modules {unknown!r} name no linear layer of {spec.name}; valid names are "
            f"{valid} (or full names such as {full_names[0]!r}), or {ALL_LINEAR!r}"
        )
    return tuple(target_modules)


def _target_matches(full_name, targets):
    """PEFT's rule, as apply_lora applies it; "all-linear" selects every linear layer of a block."""
    return targets == ALL_LINEAR or target_matches(full_name, targets)


# ----------------------------------------------------------------------------- presets

# Architecture numbers from each model's config.json on the Hugging Face Hub (meta-llama/
# Llama-2-{7b,13b,70b}-hf, mistralai/Mistral-7B-v0.1, openai-community/gpt2{,-medium,-large,
# -xl}, Qwen/Qwen2.5-0.5B), as mirrored in the transformers documentation and model cards.
_LLAMA2 = dict(vocab_size=32000, max_positions=4096)
_GPT2 = dict(
    vocab_size=50257,
    max_positions=1024,
    mlp="plain",
    norm="layernorm",
    qkv_bias=True,
    o_bias=True,
    mlp_bias=True,
    tied_embeddings=True,
    position_embeddings="learned",
    naming="gpt2",
)
PRESETS = {
    "llama-2-7b": ModelSpec("llama-2-7b", hidden_size=4096, intermediate_size=11008,
                            num_layers=32, num_heads=32, **_LLAMA2),
    "llama-2-13b": ModelSpec("llama-2-13b", hidden_size=5120, intermediate_size=13824,
                             num_layers=40, num_heads=40, **_LLAMA2),
    "llama-2-70b": ModelSpec("llama-2-70b", hidden_size=8192, intermediate_size=28672,
                             num_layers=80, num_heads=64, num_kv_heads=8, **_LLAMA2),
    "mistral-7b": ModelSpec("mistral-7b", vocab_size=32000, hidden_size=4096,
                            intermediate_size=14336, num_layers=32, num_heads=32,
                            num_kv_heads=8, max_positions=32768),
    "qwen2.5-0.5b": ModelSpec("qwen2.5-0.5b", vocab_size=151936, hidden_size=896,
                              intermediate_size=4864, num_layers=24, num_heads=14,
                              num_kv_heads=2, qkv_bias=True, tied_embeddings=True,
                              max_positions=32768),
    "gpt2": ModelSpec("gpt2", hidden_size=768, intermediate_size=3072, num_layers=12,
                      num_heads=12, **_GPT2),
    "gpt2-medium": ModelSpec("gpt2-medium", hidden_size=1024, intermediate_size=4096,
                             num_layers=24, num_heads=16, **_GPT2),
    "gpt2-large": ModelSpec("gpt2-large", hidden_size=1280, intermediate_size=5120,
                            num_layers=36, num_heads=20, **_GPT2),
    "gpt2-xl": ModelSpec("gpt2-xl", hidden_size=1600, intermediate_size=6400,
                         num_layers=48, num_heads=25, **_GPT2),
}  # fmt: skip


LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")


def _spec_from_transformers(cfg):
    kind = getattr(cfg, "model_type", None)
    if kind == "gpt2":
        gpt2 = {
            **_GPT2,
            "vocab_size": cfg.vocab_size,
            "max_positions": cfg.n_positions,
            "tied_embeddings": bool(getattr(cfg, "tie_word_embeddings", True)),
        }
        return ModelSpec(
            name=getattr(cfg, "name_or_path", "") or "gpt2-config",
            hidden_size=cfg.n_embd,
            intermediate_size=cfg.n_inner or 4 * cfg.n_embd,
            num_layers=cfg.n_layer,
            num_heads=cfg.n_head,
            **gpt2,
        )
    if kind in LLAMA_FAMILY:
        act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
        allowed = ("gelu_pytorch_tanh", "gelu") if kind == "gemma" else ("silu",)
        if act not in allowed:
            raise ValueError(f"config.hidden_act must be one of {allowed} (gated MLP), got {act!r}")
        attn_bias = bool(getattr(cfg, "attention_bias", False) or False)
        return ModelSpec(
            name=getattr(cfg, "name_or_path", "") or f"{kind}-config",
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None),
            head_dim=getattr(cfg, "head_dim", None),
            qkv_bias=True if kind == "qwen2" else attn_bias,  # Qwen2: q/k/v biases, not o
            o_bias=False if kind == "qwen2" else attn_bias,
            mlp_bias=bool(getattr(cfg, "mlp_bias", False) or False),
            qk_norm=kind == "qwen3",
            tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            max_positions=cfg.max_position_embeddings,
            naming="phi3" if kind == "phi3" else "llama",
        )
    raise ValueError(f"config.model_type must be one of {[*LLAMA_FAMILY, 'gpt2']}, got {kind!r}")


def _spec_from_gptconfig(cfg):
    """lora_lab's GPTConfig: Llama-style (RMSNorm, RoPE, SwiGLU, no biases, untied head)."""
    return ModelSpec(
        name="lora-lab-gpt",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.n_layer,
        num_heads=cfg.n_head,
        max_positions=cfg.block_size,
    )


def _spec_from(model):
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str):
        if model not in PRESETS:
            raise ValueError(f"unknown preset {model!r}; the presets are {list(PRESETS)}")
        return PRESETS[model]
    if isinstance(model, dict):  # a config.json, as a dict
        if "model_type" not in model:
            raise ValueError(f"a config dict needs a 'model_type' key, got keys {sorted(model)}")
        from transformers import AutoConfig

        args = dict(model)
        return _spec_from_transformers(AutoConfig.for_model(args.pop("model_type"), **args))
    if type(model).__name__ == "GPTConfig" and type(model).__module__.startswith("lora_lab"):
        return _spec_from_gptconfig(model)
    if hasattr(model, "model_type") and hasattr(model, "to_dict"):
        return _spec_from_transformers(model)
    raise TypeError(
        "model must be a preset name, a ModelSpec, a transformers config (llama, mistral, "
        f"qwen2, gpt2), its dict, or a lora_lab GPTConfig; got {type(model).__name__}"
    )


# ----------------------------------------------------------------------------- bytes per tensor


def nf4_bytes(numel, blocksize=NF4_BLOCK, double_quant=True):
    """Bytes bitsandbytes stores for one NF4 tensor of ``numel`` weights.

    Two 4-bit codes per byte, the 16-entry fp32 codebook, and one absmax per block: fp32
    (4 + 32/64 = 4.5 bits per weight), or with double quantization 8-bit, with an fp32 absmax
    per 256 of them, a 256-entry fp32 code and an fp32 offset (about 4.127 bits per weight).
    """
    _check_positive_int("numel", numel)
    _check_positive_int("blocksize", blocksize)
    _check_bool("double_quant", double_quant)
    blocks = -(-numel // blocksize)
    packed = -(-numel // 2) + 16 * 4
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * -(-blocks // NF4_NESTED_BLOCK) + 256 * 4 + 4


def optimizer_state_bytes(numels, optimizer, state_bytes):
    """Bytes an optimizer keeps for trainable tensors of sizes ``numels``.

    adamw: exp_avg and exp_avg_sq at ``state_bytes`` each, plus torch's fp32 ``step`` tensor
    per parameter. sgd_momentum: one momentum buffer. sgd: nothing. adamw_8bit (bitsandbytes):
    two uint8 states and two fp32 absmax per 256 values, fp32 states for tensors under 4096
    values, and the two 256-entry fp32 quantization maps shared by all tensors.
    """
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_positive_int("state_bytes", state_bytes)
    numels = list(numels)
    for n in numels:
        _check_positive_int("every entry of numels", n)
    if optimizer == "sgd":
        return 0
    if optimizer == "sgd_momentum":
        return sum(n * state_bytes for n in numels)
    if optimizer == "adamw":
        return sum(2 * n * state_bytes + 4 for n in numels)
    big = [n for n in numels if n >= ADAMW_8BIT_MIN_SIZE]
    small = sum(8 * n for n in numels if n < ADAMW_8BIT_MIN_SIZE)
    quantized = sum(2 * n + 2 * 4 * -(-n // ADAMW_8BIT_BLOCK) for n in big)
    return small + quantized + (2 * 256 * 4 if big else 0)


# ----------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class _Training:
    """What trains and at which sizes, for the activation walk."""

    full: bool  # every weight trains (else only LoRA adapters on ``targets``)
    targets: frozenset  # full names of the LoRA-adapted linear layers
    rank: int
    a: int  # bytes per activation element
    la: int  # bytes per adapter element (PEFT casts a LoRA layer's input to the adapter dtype)
    dropout: float  # LoRA dropout
    mask: int  # bytes per element of a dropout mask
    attention: str
    seq_len: int


def _norm_saved(spec, grad_in, t):
    """Bytes per token a norm saves for backward, and whether its output needs a gradient.

    RMSNorm (as in transformers and lora_lab) upcasts to fp32: it keeps its input in fp32 and
    the fp32 1/rms; its normalised output (before the weight) only if the weight trains.
    LayerNorm keeps its input and the fp32 mean and 1/std.
    """
    d = spec.hidden_size
    if spec.norm == "rmsnorm":
        saved = (4 * d + 4 if grad_in else 0) + (t.a * d if t.full else 0)
    else:
        saved = t.a * d + 8 if (grad_in or t.full) else 0
    return saved, grad_in or t.full


def _linears_saved(group, grad_in, t, input_kept=False):
    """Bytes per token saved by linear layers sharing one input, and their outputs' grad flags.

    A frozen linear keeps nothing (its weight is in memory anyway); a trained one keeps its
    input for the weight's gradient (shared inputs counted once, none if ``input_kept``: an
    earlier op keeps it). A LoRA layer keeps lora_A's input: the shared one, or its own copy
    when cast to the adapter dtype, or its dropped-out copy plus the dropout mask; and
    lora_A's output (rank values) for lora_B.
    """
    saved, shared, grads = 0, t.full, {}
    for name, fin, _ in group:
        if name in t.targets:
            if t.dropout > 0:
                saved += fin * t.la + (fin * t.mask if grad_in else 0)
            elif t.la != t.a:
                saved += fin * t.la
            else:
                shared = True
            saved += t.rank * t.la
        grads[name] = grad_in or t.full or name in t.targets
    if shared and not input_kept:
        saved += group[0][1] * t.a
    return saved, grads


def _attention_saved(spec, grads, t):
    """Bytes per token attention saves, given which of q, k, v need a gradient.

    Flash (SDPA's fused kernels) keeps q, k, v, the output and an fp32 log-sum-exp per head.
    Eager keeps, as far as gradients need them, q and k (repeated to H heads) for the scores,
    the fp32 softmax, its ``a``-byte copy for probs @ v, and v.
    """
    H, KV, hd, a, T = spec.num_heads, spec.kv_heads, spec.dim_per_head, t.a, t.seq_len
    q, k, v = grads if len(grads) == 3 else grads * 3  # GPT-2's fused c_attn: one flag
    if t.attention == "flash":
        return a * (2 * H * hd + 2 * KV * hd) + 4 * H if (q or k or v) else 0
    scores = q or k
    saved = a * H * hd * (int(q) + int(k) + int(scores))
    if a == 4:  # the fp32 softmax is the probs @ v input itself
        return saved + 4 * H * T * int(scores or v)
    return saved + 4 * H * T * int(scores) + a * H * T * int(v)


def _layer_saved(spec, i, grad_in, t):
    """Bytes per token one block saves for backward, and whether its output needs a gradient."""
    inter, a = spec.intermediate_size, t.a
    lin = [
        (spec.layer_prefix(i) + rel, fin, fout)
        for rel, (fin, fout, _) in spec.linear_layers().items()
    ]
    if spec.naming in ("gpt2", "phi3"):  # fused: c_attn | c_proj | c_fc | c_proj (or Phi-3's)
        attn_in, attn_out, mlp_in, mlp_out = lin[:1], lin[1:2], lin[2:3], lin[3:4]
    else:  # q, k, v | o | (gate,) up | down
        attn_in, attn_out, mlp_in, mlp_out = lin[:3], lin[3:4], lin[4:-1], lin[-1:]
    saved, g = _norm_saved(spec, grad_in, t)
    s, grads = _linears_saved(attn_in, g, t)
    saved += s
    qkv_grads = [grads[n] for n, _, _ in attn_in]
    if spec.qk_norm:  # Qwen3's per-head RMSNorm of q and k keeps their fp32 input and 1/rms
        q, k = (qkv_grads * 3)[:2] if len(qkv_grads) == 1 else qkv_grads[:2]
        for needed, heads in ((q, spec.num_heads), (k, spec.kv_heads)):
            if needed or t.full:
                saved += heads * (4 * spec.dim_per_head + 4) + (
                    t.a * heads * spec.dim_per_head if t.full else 0
                )
    saved += _attention_saved(spec, qkv_grads, t)
    qkv_grad, flash = any(grads.values()), t.attention == "flash"
    s, grads = _linears_saved(attn_out, qkv_grad, t, input_kept=qkv_grad and flash)
    saved += s
    g = grad_in or any(grads.values())
    s, g2 = _norm_saved(spec, g, t)
    saved += s
    s, grads = _linears_saved(mlp_in, g2, t)
    saved += s
    if spec.mlp == "gated":  # silu keeps gate's output; the product keeps each factor
        gate, up = grads[mlp_in[0][0]], grads[mlp_in[-1][0]]  # (one fused gate_up: the same)
        saved += inter * a * (2 * int(gate) + int(up))
        hidden_grad = gate or up
    else:  # gelu keeps its input
        hidden_grad = grads[mlp_in[0][0]]
        saved += inter * a if hidden_grad else 0
    s, grads = _linears_saved(mlp_out, hidden_grad, t)
    return saved + s, g or any(grads.values())


def activation_bytes(
    model,
    method="full",
    precision="bf16",
    rank=8,
    target_modules=None,
    batch_size=1,
    seq_len=512,
    lora_dropout=0.0,
    attention="flash",
    gradient_checkpointing=False,
    adapter_precision=None,
    dropout_mask_bytes=1,
):
    """Bytes autograd keeps for the backward pass, itemised: a dict of parts and their bytes.

    Counted per token, tensor by tensor, for the block transformers' Llama (and lora_lab's
    GPT) runs, with activations of ``a`` bytes (4 for fp32, 2 for 16-bit), d = hidden size,
    I = MLP width, H and KV = query and key/value heads:

    - each RMSNorm: its input in fp32 (4d, it upcasts) and 1/rms (4); its output before the
      weight (a*d) if the weight trains;
    - a trained linear layer: its input (a*in, one copy for q/k/v and one for gate/up); a
      frozen one nothing; a LoRA layer: lora_A's input (the shared one; its own copy if cast
      to ``adapter_precision``; or its dropped-out copy and mask) and lora_A's output (rank);
    - attention, "flash" (SDPA's fused kernels): q, k, v and the output
      (a*(2H + 2KV)*head_dim) and an fp32 log-sum-exp per head; "eager": q, k, v repeated to
      H heads and the H*seq_len softmax in fp32 (plus its a-byte copy in 16-bit), and o_proj's
      input when o_proj trains;
    - SwiGLU: gate's and up's outputs and silu(gate) (3a*I); down_proj's input (a*I) if it
      trains;
    - the head: the final norm, lm_head's input if it trains, the fp32 log-softmax (4V) and
      the int64 label; the int64 token id if the embedding trains;
    - once per step: RoPE's cos and sin (2a*seq_len*head_dim, built every forward by
      transformers; lora_lab keeps them as buffers) and the loss's 4-byte scalar.

    So full fine-tuning saves 8d + a*(4d + 2(H + KV)*head_dim + 4I) + 8 + 4H bytes per token
    per Llama block with flash attention. Gradients reach nothing before the first trained
    weight, so with LoRA the first block keeps less. A dropout mask takes ``dropout_mask_bytes`` per element: 1 on CUDA
    (a bool mask), ``a`` on the CPU (torch keeps a float mask there). Model dropout is assumed
    off (Llama's default). With gradient checkpointing each block keeps its input (a*d) and
    one block's activations are rebuilt at a time. Not counted: temporaries inside an op
    (bitsandbytes dequantizing a 4-bit weight in backward), logits held by the caller, and the
    extra intermediates of GPT-2's tanh GELU.
    """
    spec = _spec_from(model)
    _check_choice("method", method, METHODS)
    _check_choice("precision", precision, PRECISIONS)
    _check_choice("attention", attention, ATTENTIONS)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("dropout_mask_bytes", dropout_mask_bytes)
    _check_bool("gradient_checkpointing", gradient_checkpointing)
    _check_dropout(lora_dropout)
    if adapter_precision is not None:
        _check_choice("adapter_precision", adapter_precision, PRECISIONS)
    if spec.position_embeddings == "learned" and seq_len > spec.max_positions:
        raise ValueError(
            f"seq_len ({seq_len}) exceeds {spec.name}'s {spec.max_positions} learned positions"
        )
    a, full, d = PRECISIONS[precision], method == "full", spec.hidden_size
    targets = frozenset()
    if not full:
        _check_positive_int("rank", rank)
        targets = frozenset(name for name, _, _ in spec._lora_targets(target_modules))
    la = PRECISIONS[adapter_precision or precision]
    t = _Training(full, targets, rank, a, la, lora_dropout, dropout_mask_bytes, attention, seq_len)
    g, per_layer = full, []  # the embedding's output needs a gradient only if it trains
    for i in range(spec.num_layers):
        saved, g = _layer_saved(spec, i, g, t)
        per_layer.append(saved)
    head, g = _norm_saved(spec, g, t)
    head += (a * d if full else 0) + 4 * spec.vocab_size + 8 + (8 if full else 0)
    tokens = batch_size * seq_len
    if gradient_checkpointing:
        layers = tokens * (spec.num_layers * a * d + max(per_layer))
    else:
        layers = tokens * sum(per_layer)
    parts = {"layers": layers, "head": tokens * head, "loss": 4}
    if spec.position_embeddings == "rope":
        parts["rope"] = 2 * a * seq_len * spec.dim_per_head
    else:
        parts["positions"] = 8 * seq_len  # the position ids the learned table looks up
    return parts


def _check_dropout(p):
    ok = isinstance(p, numbers.Real) and not isinstance(p, bool)
    if not ok or not 0.0 <= p < 1.0:
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {p!r}")


# ----------------------------------------------------------------------------- the estimate

COMPONENTS = {  # field -> label in tables
    "weights": "Model weights",
    "adapter": "LoRA adapter weights",
    "gradients": "Gradients",
    "master_weights": "fp32 master weights",
    "optimizer_states": "Optimizer states",
    "activations": "Activations",
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component of one fine-tuning set-up; ``total`` is their sum."""

    model: str
    method: str
    precision: str
    optimizer: str
    convention: str
    num_parameters: int  # of the base model
    trainable_parameters: int
    weights: int  # the model's own weights (frozen for LoRA/QLoRA; NF4 + 16-bit for QLoRA)
    adapter: int  # LoRA's lora_A and lora_B
    gradients: int
    master_weights: int  # the fp32 copy mixed precision keeps of 16-bit trained weights
    optimizer_states: int
    activations: int
    activation_parts: dict = field(default_factory=dict, compare=False)

    @property
    def total(self):
        return sum(getattr(self, f) for f in COMPONENTS)

    def gb(self, part="total"):
        """A component (or the total) in GB = 10**9 bytes."""
        return self._part(part) / GB

    def gib(self, part="total"):
        """A component (or the total) in GiB = 2**30 bytes."""
        return self._part(part) / GiB

    def _part(self, part):
        if part != "total" and part not in COMPONENTS:
            raise _bad("part", part, ["total", *COMPONENTS])
        return getattr(self, part)

    def to_dict(self):
        """Every field, plus ``total``, as plain Python values (bytes for the components)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["activation_parts"] = dict(self.activation_parts)
        out["total"] = self.total
        return out

    def table(self, unit="GB"):
        """A pandas DataFrame: one row per component and the total, in bytes and ``unit``."""
        import pandas as pd

        _check_choice("unit", unit, ("GB", "GiB"))
        scale = GB if unit == "GB" else GiB
        rows = [(label, getattr(self, f)) for f, label in COMPONENTS.items()]
        rows.append(("Total", self.total))
        df = pd.DataFrame(rows, columns=["component", "bytes"]).set_index("component")
        df[unit] = df["bytes"] / scale
        return df

    def __str__(self):
        head = (
            f"{self.model}: {self.method} fine-tuning, {self.precision}, {self.optimizer}, "
            f"'{self.convention}' convention; {self.trainable_parameters:,} of "
            f"{self.num_parameters:,} parameters train"
        )
        return head + "\n" + self.table().to_string(float_format=lambda x: f"{x:,.3f}")

    def _repr_html_(self):
        return self.table().to_html(float_format=lambda x: f"{x:,.3f}")


def _trainable_bytes(numels, dtype_bytes, optimizer, convention):
    """(weights, gradients, master copy, optimizer states) bytes for trained tensors."""
    n = sum(numels)
    mixed = convention == "mixed"
    master = 4 * n if mixed and dtype_bytes == 2 else 0
    states = optimizer_state_bytes(numels, optimizer, 4 if mixed else dtype_bytes)
    return n * dtype_bytes, n * dtype_bytes, master, states


def _check_lora_only(method, **given):
    for name, value in given.items():
        if method == "full" and value is not None:
            raise ValueError(f"{name}={value!r} applies to method 'lora' or 'qlora', not 'full'")


def _lora_numels(spec, rank, target_modules):
    """Sizes of every lora_A (rank, in) and lora_B (out, rank) tensor."""
    _check_positive_int("rank", rank)
    numels = []
    for name, fin, fout in spec._lora_targets(target_modules):
        if rank > min(fin, fout):
            raise ValueError(
                f"rank must be at most min(in, out) = {min(fin, fout)} for {name}, got {rank}"
            )
        numels += [rank * fin, fout * rank]
    return numels


def _frozen_bytes(spec, b, quantize, double_quant):
    """Bytes of the frozen base: all at ``b`` bytes, or the blocks' linear weights in NF4."""
    linear = {
        spec.layer_prefix(i) + rel + ".weight"
        for i in range(spec.num_layers)
        for rel in spec.linear_layers()
    }
    return sum(
        nf4_bytes(math.prod(shape), NF4_BLOCK, double_quant)
        if quantize and name in linear
        else math.prod(shape) * b
        for name, shape in spec.parameter_shapes().items()
    )


def estimate_memory(
    model,
    method="full",
    precision="bf16",
    optimizer="adamw",
    rank=None,
    target_modules=None,
    batch_size=1,
    seq_len=512,
    activations=True,
    gradient_checkpointing=False,
    attention="flash",
    convention="mixed",
    adapter_precision=None,
    lora_dropout=None,
    double_quant=None,
):
    """Bytes needed to fine-tune ``model`` (a preset name, ModelSpec or config): a MemoryEstimate.

    method: "full" trains every weight; "lora" freezes the base (no gradients, no optimizer
    state) and trains rank-``rank`` adapters on ``target_modules`` (default 8 and the
    attention projections); "qlora" also stores the blocks' linear weights in NF4
    (``double_quant`` default True) and the rest (embeddings, norms, biases, lm_head) at
    ``precision``, as transformers + bitsandbytes load it (PEFT's
    ``prepare_model_for_kbit_training`` then casts that rest to fp32).

    convention: "lesson" keeps every tensor at ``precision`` (the lesson's table: 16 bytes
    per fp32 parameter, 8 per fp16 one, with AdamW); "mixed" is real mixed precision: 16-bit
    weights and gradients for compute, an fp32 master copy and fp32 optimizer states of what
    trains, so full AdamW costs 2 + 2 + 4 + 8 = 16 bytes per parameter in bf16 as in fp32.
    Adapters default to fp32 under "mixed" (PEFT's choice), to ``precision`` under "lesson".

    Activations follow ``activation_bytes`` (its docstring states the formula). The total is
    a sum of what lives at once at the end of backward: no CUDA context, allocator slack or
    temporaries.
    """
    spec = _spec_from(model)
    _check_choice("method", method, METHODS)
    _check_choice("precision", precision, PRECISIONS)
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("convention", convention, CONVENTIONS)
    _check_bool("activations", activations)
    _check_lora_only(
        method,
        rank=rank,
        target_modules=target_modules,
        adapter_precision=adapter_precision,
        lora_dropout=lora_dropout,
    )
    if method != "qlora" and double_quant is not None:
        raise ValueError(f"double_quant={double_quant!r} applies to method 'qlora' only")
    rank = 8 if rank is None else rank
    lora_dropout = 0.0 if lora_dropout is None else lora_dropout
    double_quant = True if double_quant is None else double_quant
    _check_bool("double_quant", double_quant)
    if adapter_precision is None:
        adapter_precision = "fp32" if convention == "mixed" else precision
    _check_choice("adapter_precision", adapter_precision, PRECISIONS)
    b = PRECISIONS[precision]
    act = activation_bytes(
        spec,
        method,
        precision,
        rank,
        target_modules,
        batch_size,
        seq_len,
        lora_dropout,
        attention,
        gradient_checkpointing,
        adapter_precision,
    )
    numels = [math.prod(s) for s in spec.parameter_shapes().values()]
    if method == "full":
        weights, grads, master, states = _trainable_bytes(numels, b, optimizer, convention)
        adapter, trainable = 0, sum(numels)
    else:
        lora_numels = _lora_numels(spec, rank, target_modules)
        ab = PRECISIONS[adapter_precision]
        adapter, grads, master, states = _trainable_bytes(lora_numels, ab, optimizer, convention)
        trainable = sum(lora_numels)
        weights = _frozen_bytes(spec, b, method == "qlora", double_quant)
    return MemoryEstimate(
        model=spec.name,
        method=method,
        precision=precision,
        optimizer=optimizer,
        convention=convention,
        num_parameters=sum(numels),
        trainable_parameters=trainable,
        weights=weights,
        adapter=adapter,
        gradients=grads,
        master_weights=master,
        optimizer_states=states,
        activations=sum(act.values()) if activations else 0,
        activation_parts=act if activations else {},
    )


def _per_parameter_bytes(n, b, convention):
    """Full AdamW fine-tuning of ``n`` parameters at ``b`` bytes, with no per-tensor extras."""
    if not math.isfinite(n) or n <= 0:
        raise ValueError(f"model, as a parameter count, must be positive, got {n!r}")
    mixed = convention == "mixed"
    return {
        "weights": n * b,
        "gradients": n * b,
        "master_weights": 4 * n if mixed and b == 2 else 0,
        "optimizer_states": 2 * n * (4 if mixed else b),
    }


def lesson_table(model=7e9, convention="lesson"):
    """The lesson's full fine-tuning table (AdamW, fp32 and fp16 columns) in GB = 10**9 bytes.

    ``model`` is a parameter count (the lesson's 7e9) or anything ``estimate_memory`` takes;
    for a count, no per-tensor extras (AdamW's 4-byte step counters) are known or added.
    "mixed" adds the row the lesson leaves out: fp16 training's fp32 master weights.
    """
    import pandas as pd

    _check_choice("convention", convention, CONVENTIONS)
    rows = ["weights", "gradients", "optimizer_states"]
    if convention == "mixed":
        rows.insert(2, "master_weights")
    columns = {}
    for precision in ("fp32", "fp16"):
        if isinstance(model, numbers.Real) and not isinstance(model, bool):
            part = _per_parameter_bytes(model, PRECISIONS[precision], convention)
        else:
            est = estimate_memory(
                model, "full", precision, "adamw", convention=convention, activations=False
            )
            part = {f: getattr(est, f) for f in rows}
        values = [part[f] for f in rows]
        columns[f"{precision.upper()} (GB)"] = [v / GB for v in [*values, sum(values)]]
    labels = [COMPONENTS[f] for f in rows]
    labels[-1] = "Optimizer states (AdamW)"
    return pd.DataFrame(columns, index=[*labels, "Total"])


# ----------------------------------------------------------------------------- measurement


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

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
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

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
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


# ----------------------------------------------------------------------------- the widget


def memory_calculator(model="llama-2-7b", method="lora", precision="bf16", optimizer="adamw"):
    """An ipywidgets calculator: pick a preset and settings, read the breakdown table.

    Returns a VBox; ``box.controls`` maps each setting to its widget and ``box.output`` is
    the HTML widget that shows the table (updated on every change, no kernel needed).
    """
    import ipywidgets as w

    for name, value, valid in (
        ("model", model, PRESETS),
        ("method", method, METHODS),
        ("precision", precision, PRECISIONS),
        ("optimizer", optimizer, OPTIMIZERS),
    ):
        _check_choice(name, value, valid)
    style = {"description_width": "110px"}
    controls = {
        "model": w.Dropdown(options=list(PRESETS), value=model, description="model"),
        "method": w.Dropdown(options=METHODS, value=method, description="method"),
        "precision": w.Dropdown(options=list(PRECISIONS), value=precision, description="precision"),
        "optimizer": w.Dropdown(options=OPTIMIZERS, value=optimizer, description="optimizer"),
        "convention": w.Dropdown(options=CONVENTIONS, value="mixed", description="convention"),
        "rank": w.IntSlider(value=8, min=1, max=256, description="LoRA rank"),
        "batch_size": w.IntSlider(value=1, min=1, max=64, description="batch size"),
        "seq_len": w.IntSlider(value=512, min=16, max=8192, step=16, description="seq_len"),
    }
    for c in controls.values():
        c.style = style
    output = w.HTML()

    def update(_=None):
        v = {k: c.value for k, c in controls.items()}
        controls["rank"].disabled = v["method"] == "full"
        seq_len = min(v["seq_len"], PRESETS[v["model"]].max_positions)
        kw = {} if v["method"] == "full" else {"rank": v["rank"]}
        try:
            est = estimate_memory(
                v["model"],
                v["method"],
                v["precision"],
                v["optimizer"],
                batch_size=v["batch_size"],
                seq_len=seq_len,
                convention=v["convention"],
                **kw,
            )
        except ValueError as err:  # e.g. a rank larger than a layer allows
            output.value = f"<pre>{err}</pre>"
            return
        note = f" (seq_len capped at {seq_len})" if seq_len != v["seq_len"] else ""
        output.value = (
            f"<b>{est.model}</b>: {est.trainable_parameters:,} of {est.num_parameters:,} "
            f"parameters train{note}. GB = 10<sup>9</sup> bytes.{est._repr_html_()}"
        )

    for c in controls.values():
        c.observe(update, names="value")
    update()
    box = w.VBox(
        [w.HBox([w.VBox(list(controls.values())[:5]), w.VBox(list(controls.values())[5:])]), output]
    )
    box.controls, box.output = controls, output
    return box


__all__ = [
    "GB",
    "GiB",
    "PRESETS",
    "ModelSpec",
    "MemoryEstimate",
    "activation_bytes",
    "estimate_memory",
    "lesson_table",
    "measure_activation_bytes",
    "measure_state_bytes",
    "memory_calculator",
    "nf4_bytes",
    "optimizer_state_bytes",
]
