"""A small Llama-style GPT, its shipped checkpoint, and conversion to and from transformers.

The module tree mirrors transformers' ``LlamaForCausalLM`` name for name, so a state dict
(and a LoRA adapter trained on it) moves between the two without renaming:

    model.embed_tokens
    model.layers.{i}.input_layernorm
    model.layers.{i}.self_attn.{q_proj, k_proj, v_proj, o_proj}
    model.layers.{i}.post_attention_layernorm
    model.layers.{i}.mlp.{gate_proj, up_proj, down_proj}
    model.norm
    lm_head

A little over 400 lines: the model, its checkpoint and its conversions share the one
configuration, and each conversion is checked against the other side name for name.
"""

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .files import read_safetensors, write_folder
from .hub import SHIPPED_MODEL, is_shipped, load_dtype

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


@dataclass
class GPTConfig:
    vocab_size: int = 96  # characters of lora_lab.tokenizer.VOCAB
    block_size: int = 96  # longest sequence the model attends over (RoPE tables are this long)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    intermediate_size: int = 352  # SwiGLU hidden width, about 8/3 * n_embd as in Llama
    rope_theta: float = 10000.0  # base of the rotary frequencies
    norm_eps: float = 1e-5  # RMSNorm epsilon

    def __post_init__(self):
        for name in (
            "vocab_size",
            "block_size",
            "n_layer",
            "n_head",
            "n_embd",
            "intermediate_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must split into n_head ({self.n_head}) heads "
                "of even size (RoPE rotates pairs of dimensions)"
            )
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"GPTConfig.{name} must be a finite positive number, got {value!r}"
                )

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain (no bias, no mean)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()  # normalise in float32, as Llama does, even for half-precision weights
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(config):
    """cos and sin of every position's rotation angles, each (block_size, head_dim)."""
    half = torch.arange(0, config.head_dim, 2, dtype=torch.float) / config.head_dim
    inv_freq = 1.0 / (config.rope_theta**half)  # (head_dim/2,)
    angles = torch.arange(config.block_size).float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)  # (block_size, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + head_dim/2) of x (B, nh, T, hs) by each position's angles."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary position embeddings."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.o_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape

        def heads(t):  # (B, T, C) -> (B, nh, T, hs)
            return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

        q = apply_rope(heads(self.q_proj(x)), cos, sin)
        k = apply_rope(heads(self.k_proj(x)), cos, sin)
        y = F.scaled_dot_product_attention(q, k, heads(self.v_proj(x)), is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config):
        super().__init__()
        # registered in transformers' order, so state dicts list tensors in the same order
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Token embeddings, the stack of blocks and the final norm (Llama's ``model``)."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        cos, sin = rope_tables(config)
        # derived from the config, so kept out of the state dict (as in transformers)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.embed_tokens(idx)  # (B, T, C)
        cos = self.rope_cos[:T].to(x.dtype)  # (T, hs)
        sin = self.rope_sin[:T].to(x.dtype)
        for block in self.layers:
            x = block(x, cos, sin)
        return self.norm(x)


class GPT(nn.Module):
    """A Llama-style decoder-only language model: ``forward(idx)`` gives next-token logits."""

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # residual projections start smaller so the residual stream's scale stays put with depth
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_output_embeddings(self):
        """The output head, as transformers models name it (PEFT's "all-linear" skips it)."""
        return self.lm_head

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx):
        """idx (B, T) int64 token ids -> logits (B, T, vocab_size)."""
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
            desc = f"{tuple(idx.shape)} {idx.dtype}" if isinstance(idx, torch.Tensor) else type(idx)
            raise ValueError(f"idx must be a (B, T) int64 tensor, got {desc}")
        if idx.shape[1] > self.config.block_size:
            raise ValueError(
                f"sequence length {idx.shape[1]} exceeds block_size {self.config.block_size}"
            )
        return self.lm_head(self.model(idx))  # (B, T, vocab_size)


# ---------------------------------------------------------------- the shipped checkpoint


def read_config(path):
    """GPTConfig from a JSON file, refusing unknown or missing fields; errors name the file."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(raw).__name__}")
    names = {f.name for f in fields(GPTConfig)}
    if set(raw) != names:
        raise ValueError(
            f"{path}: fields {sorted(set(raw) ^ names)} differ from GPTConfig's {sorted(names)}"
        )
    try:
        return GPTConfig(**raw)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def save_checkpoint(model, directory):
    """Write model.config to config.json and the weights to tiny_gpt.safetensors, atomically."""
    from safetensors.torch import save_file

    if not isinstance(model, GPT):
        raise TypeError(f"model must be a GPT, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, write in (
        ("tiny_gpt.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"})),
        ("config.json", lambda p: Path(p).write_text(json.dumps(asdict(model.config), indent=2))),
    ):
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; package data must be readable
            os.replace(tmp, directory / name)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def load_pretrained(device=None, directory=None):
    """The shipped pretrained GPT, in eval mode, on ``device`` (default: the best one here).

    Loading is strict: a missing, unexpected or mis-shaped tensor is an error.
    """
    from .utils import get_device

    directory = CHECKPOINT_DIR if directory is None else Path(directory)
    weights, config_file = directory / "tiny_gpt.safetensors", directory / "config.json"
    for f in (weights, config_file):
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint file {f} is missing; run scripts/pretrain.py")
    device = get_device() if device is None else torch.device(device)
    model = GPT(read_config(config_file))
    try:
        model.load_state_dict(read_safetensors(weights)[0], strict=True)
    except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
        raise RuntimeError(f"{weights} does not fit {config_file}: {err}") from None
    return model.to(device).eval()


# ---------------------------------------------------------------- transformers interop


def llama_config(config):
    from transformers import LlamaConfig

    from .tokenizer import CharTokenizer

    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_head,
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=CharTokenizer.EOS_ID if config.vocab_size > CharTokenizer.EOS_ID else None,
        pad_token_id=None,
    )


def to_transformers(model):
    """A transformers ``LlamaForCausalLM`` with this GPT's weights (same logits, float32)."""
    from transformers import LlamaForCausalLM

    if not isinstance(model, GPT):
        raise TypeError(f"model must be a GPT, got {type(model).__name__}")
    param = next(model.parameters())
    hf = LlamaForCausalLM(llama_config(model.config)).to(device=param.device, dtype=param.dtype)
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.eval() if not model.training else hf


def _rope_theta(hf_config):
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", "default"))
    if rope_type != "default":
        raise ValueError(f"only default RoPE converts to GPT, this model uses {rope_type!r}")
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def from_transformers(hf_model):
    """A GPT with the weights of a transformers ``LlamaForCausalLM`` of the same shape."""
    c = getattr(hf_model, "config", None)
    if getattr(c, "model_type", None) != "llama":
        raise TypeError(f"hf_model must be a LlamaForCausalLM, got {type(hf_model).__name__}")
    unsupported = {
        "num_key_value_heads": (c.num_key_value_heads, c.num_attention_heads),
        "hidden_act": (c.hidden_act, "silu"),
        "attention_bias": (c.attention_bias, False),
        "mlp_bias": (c.mlp_bias, False),
        "tie_word_embeddings": (c.tie_word_embeddings, False),
        "head_dim": (
            getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            c.hidden_size // c.num_attention_heads,
        ),
    }
    for name, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ValueError(f"GPT needs hf_model.config.{name} == {wanted!r}, got {value!r}")
    config = GPTConfig(
        vocab_size=c.vocab_size,
        block_size=c.max_position_embeddings,
        n_layer=c.num_hidden_layers,
        n_head=c.num_attention_heads,
        n_embd=c.hidden_size,
        intermediate_size=c.intermediate_size,
        rope_theta=_rope_theta(c),
        norm_eps=c.rms_norm_eps,
    )
    param = next(hf_model.parameters())
    model = GPT(config).to(device=param.device, dtype=param.dtype)
    model.load_state_dict(hf_model.state_dict(), strict=True)
    return model.train(hf_model.training)


def export_transformers(model, path, tokenizer=None):
    """Write ``model`` as a transformers directory (LlamaForCausalLM + a char tokenizer).

    ``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)``
    load it. The directory is built beside ``path`` and moved into place whole; ``path`` must
    not exist yet (or be an empty directory).
    """
    from .tokenizer import CharTokenizer

    tokenizer = CharTokenizer() if tokenizer is None else tokenizer
    if not isinstance(tokenizer, CharTokenizer):
        raise TypeError(f"tokenizer must be a CharTokenizer, got {type(tokenizer).__name__}")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens, model.config.vocab_size is "
            f"{model.config.vocab_size}"
        )

    def write(folder):
        to_transformers(model).save_pretrained(folder, safe_serialization=True)
        tokenizer.to_transformers().save_pretrained(folder)

    return write_folder(path, write)


def _stored_dtype(hf_config):
    """The dtype a transformers config says its weights are stored in (None if it says none)."""
    return getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)


def load_model(name=None, device=None, **hf_kwargs):
    """The "Colab switch": ``(model, tokenizer)`` for the shipped GPT or a transformers model.

    ``name`` None or ``"lora-lab/tiny-gpt"`` gives the shipped GPT and its CharTokenizer. Any
    other string is a transformers model ID or local directory, loaded with
    ``AutoModelForCausalLM`` (``hf_kwargs`` go to its ``from_pretrained``) and ``AutoTokenizer``.
    Unless ``hf_kwargs`` name a dtype, a 16-bit checkpoint loads in 16 bits, in the type the
    device computes natively (``lora_lab.hub.load_dtype``); others load as stored.
    """
    from .tokenizer import CharTokenizer, HFTokenizer
    from .utils import get_device

    if is_shipped(name):
        if hf_kwargs:
            raise ValueError(f"hf_kwargs {sorted(hf_kwargs)} apply only to transformers models")
        return load_pretrained(device=device), CharTokenizer()
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        raise TypeError(f"name must be None, {SHIPPED_MODEL!r}, a model ID or a path, got {name!r}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = get_device() if device is None else torch.device(device)
    if not {"dtype", "torch_dtype"} & set(hf_kwargs):
        stored = _stored_dtype(AutoConfig.from_pretrained(str(name)))
        hf_kwargs["dtype"] = load_dtype(stored, device)
    tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(str(name)))
    model = AutoModelForCausalLM.from_pretrained(str(name), **hf_kwargs)
    if "device_map" not in hf_kwargs and "quantization_config" not in hf_kwargs:
        model = model.to(device)
    return model.eval(), tokenizer
