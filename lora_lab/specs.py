"""Model specs: the architecture numbers of a decoder-only transformer, and the presets.

A ``ModelSpec`` describes a model by its architecture numbers; every parameter count is
computed from them (``parameter_shapes`` names each tensor as transformers does).
``spec_from`` reads one from a preset name, a transformers config (or its dict) or a lora_lab
``GPTConfig``. The byte formulas that use a spec are in ``lora_lab.estimate``. (A little over
400 lines: the presets and the config readers belong with the spec they build.)
"""

import math
import re
from dataclasses import dataclass

from lora_lab.lora import ALL_LINEAR, check_target_modules, target_matches
from lora_lab.validate import boolean, choice, positive_int

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
            positive_int(f"ModelSpec.{f}", getattr(self, f), limit=limit)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ModelSpec.name must be a non-empty string, got {self.name!r}")
        kv, hd = self.num_kv_heads, self.head_dim
        if kv is not None:
            positive_int("ModelSpec.num_kv_heads", kv)
            if self.num_heads % kv:
                raise ValueError(
                    f"ModelSpec.num_heads ({self.num_heads}) must be a multiple of "
                    f"num_kv_heads ({kv})"
                )
        if hd is not None:
            positive_int("ModelSpec.head_dim", hd)
        elif self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelSpec.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads}) when head_dim is None"
            )
        choice("ModelSpec.mlp", self.mlp, ("gated", "plain"))
        choice("ModelSpec.norm", self.norm, ("rmsnorm", "layernorm"))
        choice("ModelSpec.position_embeddings", self.position_embeddings, ("rope", "learned"))
        choice("ModelSpec.naming", self.naming, ("llama", "phi3", "gpt2"))
        if self.naming == "phi3" and self.mlp != "gated":
            raise ValueError("ModelSpec.naming='phi3' means a fused gate_up_proj (mlp='gated')")
        for f in ("qkv_bias", "o_bias", "mlp_bias", "qk_norm", "tied_embeddings"):
            boolean(f"ModelSpec.{f}", getattr(self, f))
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
        return spec_from(config)

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
                    return spec_from(config)
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
        positive_int("rank", rank)
        return sum(rank * (fin + fout) for _, fin, fout in self.lora_targets(target_modules))

    def max_rank(self, target_modules=None):
        """The largest LoRA rank every targeted layer allows: the least min(in, out) among them."""
        return min(min(fin, fout) for _, fin, fout in self.lora_targets(target_modules))

    def lora_targets(self, target_modules):
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


def spec_from(model):
    """A ModelSpec from a preset name, a ModelSpec, a transformers config or its dict, or a GPTConfig."""
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


__all__ = ["LLAMA_FAMILY", "PRESETS", "SPEC_LIMITS", "ModelSpec", "spec_from"]
