"""The byte formulas: how much memory fine-tuning needs, per component.

``estimate_memory`` turns a spec, a preset name or a config into bytes for the weights, the
gradients, the optimizer's states, the activations and the LoRA adapter, for full, LoRA and
QLoRA fine-tuning; ``activation_bytes`` itemises what autograd keeps, ``nf4_bytes`` and
``optimizer_state_bytes`` count one tensor's storage. ``lora_lab.measure`` measures the same
quantities on a real model, so the two can be compared.

Units: ``GB`` is 10**9 bytes (the unit of the lesson's "28 GB" for 7e9 fp32 weights) and
``GiB`` is 2**30 bytes (an "80 GB" A100 holds 80 GiB: nvidia-smi shows 81920 MiB).

Over 400 lines because the activation walk (about 200 of them: norms, linear layers,
attention, MLP, head, each a small function sharing one ``_Training`` record) is one formula
that ``estimate_memory`` sums; split, its parts would have to be read side by side anyway.
"""

import math
import numbers
from dataclasses import dataclass, field, fields

from lora_lab.quant import DQ_BLOCKSIZE as NF4_NESTED_BLOCK  # the absmaxes, 8-bit, 256 a block
from lora_lab.quant import NF4_BLOCKSIZE as NF4_BLOCK  # one absmax per 64 weights
from lora_lab.specs import spec_from
from lora_lab.validate import bad_choice, boolean, choice, positive_int, probability

GB = 10**9  # a decimal gigabyte
GiB = 2**30  # a binary gibibyte

PRECISIONS = {"fp32": 4, "fp16": 2, "bf16": 2}  # bytes per element
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw_8bit", "sgd_momentum", "sgd")
CONVENTIONS = ("mixed", "lesson")
ATTENTIONS = ("flash", "eager")

ADAMW_8BIT_BLOCK = 256  # bitsandbytes' 8-bit optimizers: one fp32 absmax per 256 values
ADAMW_8BIT_MIN_SIZE = 4096  # ... and tensors smaller than this keep fp32 states


# ----------------------------------------------------------------------------- bytes per tensor


def nf4_bytes(numel, blocksize=NF4_BLOCK, double_quant=True):
    """Bytes bitsandbytes stores for one NF4 tensor of ``numel`` weights.

    Two 4-bit codes per byte, the 16-entry fp32 codebook, and one absmax per block: fp32
    (4 + 32/64 = 4.5 bits per weight), or with double quantization 8-bit, with an fp32 absmax
    per 256 of them, a 256-entry fp32 code and an fp32 offset (about 4.127 bits per weight).
    """
    positive_int("numel", numel)
    positive_int("blocksize", blocksize)
    boolean("double_quant", double_quant)
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
    choice("optimizer", optimizer, OPTIMIZERS)
    positive_int("state_bytes", state_bytes)
    numels = list(numels)
    for n in numels:
        positive_int("every entry of numels", n)
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
    *,
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
    spec = spec_from(model)
    choice("method", method, METHODS)
    choice("precision", precision, PRECISIONS)
    choice("attention", attention, ATTENTIONS)
    positive_int("batch_size", batch_size)
    positive_int("seq_len", seq_len)
    positive_int("dropout_mask_bytes", dropout_mask_bytes)
    boolean("gradient_checkpointing", gradient_checkpointing)
    probability("lora_dropout", lora_dropout)
    if adapter_precision is not None:
        choice("adapter_precision", adapter_precision, PRECISIONS)
    if spec.position_embeddings == "learned" and seq_len > spec.max_positions:
        raise ValueError(
            f"seq_len ({seq_len}) exceeds {spec.name}'s {spec.max_positions} learned positions"
        )
    a, full, d = PRECISIONS[precision], method == "full", spec.hidden_size
    targets = frozenset()
    if not full:
        positive_int("rank", rank)
        targets = frozenset(name for name, _, _ in spec.lora_targets(target_modules))
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
            raise bad_choice("part", part, ["total", *COMPONENTS])
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

        choice("unit", unit, ("GB", "GiB"))
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
    positive_int("rank", rank)
    numels = []
    for name, fin, fout in spec.lora_targets(target_modules):
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
    *,
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
    (``torch.autocast``, which ``lora_lab.train`` uses, is neither: fp32 weights, gradients and
    states, 16 bytes, plus a 16-bit copy of each weight saved for backward, 2 more: 18 while
    gradients and copies coexist. Chapter 1 measures both parts; it is not modelled here.)
    Adapters default to fp32 under "mixed" (PEFT's choice), to ``precision`` under "lesson".

    Activations follow ``activation_bytes`` (its docstring states the formula). The total is
    a sum of what lives at once at the end of backward: no CUDA context, allocator slack or
    temporaries.
    """
    spec = spec_from(model)
    choice("method", method, METHODS)
    choice("precision", precision, PRECISIONS)
    choice("optimizer", optimizer, OPTIMIZERS)
    choice("convention", convention, CONVENTIONS)
    boolean("activations", activations)
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
    boolean("double_quant", double_quant)
    if adapter_precision is None:
        adapter_precision = "fp32" if convention == "mixed" else precision
    choice("adapter_precision", adapter_precision, PRECISIONS)
    b = PRECISIONS[precision]
    # no activations asked for: batch and sequence do not matter (a seq_len beyond a small
    # model's positions is then no error)
    act = (
        {}
        if not activations
        else activation_bytes(
            spec,
            method,
            precision=precision,
            rank=rank,
            target_modules=target_modules,
            batch_size=batch_size,
            seq_len=seq_len,
            lora_dropout=lora_dropout,
            attention=attention,
            gradient_checkpointing=gradient_checkpointing,
            adapter_precision=adapter_precision,
        )
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
        activations=sum(act.values()),
        activation_parts=act,
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

    choice("convention", convention, CONVENTIONS)
    rows = ["weights", "gradients", "optimizer_states"]
    if convention == "mixed":
        rows.insert(2, "master_weights")
    columns = {}
    for precision in ("fp32", "fp16"):
        if isinstance(model, numbers.Real) and not isinstance(model, bool):
            part = _per_parameter_bytes(model, PRECISIONS[precision], convention)
        else:
            est = estimate_memory(
                model,
                "full",
                precision=precision,
                optimizer="adamw",
                convention=convention,
                activations=False,
            )
            part = {f: getattr(est, f) for f in rows}
        values = [part[f] for f in rows]
        columns[f"{precision.upper()} (GB)"] = [v / GB for v in [*values, sum(values)]]
    labels = [COMPONENTS[f] for f in rows]
    labels[-1] = "Optimizer states (AdamW)"
    return pd.DataFrame(columns, index=[*labels, "Total"])


__all__ = [
    "COMPONENTS",
    "CONVENTIONS",
    "GB",
    "GiB",
    "METHODS",
    "OPTIMIZERS",
    "PRECISIONS",
    "MemoryEstimate",
    "activation_bytes",
    "estimate_memory",
    "lesson_table",
    "nf4_bytes",
    "optimizer_state_bytes",
]
