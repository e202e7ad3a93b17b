"""LoRA: a frozen linear layer plus a trainable low-rank update, and its injection into a model.

A LoRA layer computes ``y = W x + b + scaling * B (A x)`` where ``W`` (out, in) is frozen,
``A`` is (rank, in), ``B`` is (out, rank) and ``scaling = alpha / rank`` (or
``alpha / sqrt(rank)`` with rsLoRA). Attribute names follow PEFT's LoRA layer
(``base_layer``, ``lora_A``, ``lora_B``, ``lora_dropout``, ``scaling``), so a model's
state-dict keys are the ones PEFT writes in its adapter files.

The layer also carries LoRA's variants (chapter 11): DoRA (``use_dora``, a learned magnitude
per output feature) and the PiSSA, LoftQ and Gaussian starts (``init_lora_weights``), whose
math is in variants.py. About 580 lines: the layer and the target matching that places it
(PEFT's rules, with the errors that name what a pattern matched) are one concept.
"""

import math
import numbers
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import validate
from .hub import HALF  # the 16-bit floating types
from .validate import boolean, finite_number, positive_int, probability
from .variants import check_init, check_loftq_config, dora_weight_norm, loftq_factors, pissa_factors

ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output head
REGEX_TIMEOUT_S = 1.0  # the most one regex may take to match one module name
MAX_PATTERN_LENGTH = 1000  # characters of a target_modules regex
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # attention projections
MERGED_KEY = "lora_merged"  # a state-dict entry present only while a layer is merged
DORA_NORM_KEY = "lora_dora_norm"  # a merged DoRA layer's ||W + dW||_c, kept for unmerge


def is_conv1d(module):
    """True for transformers' ``Conv1D`` (GPT-2's projections: a linear layer, weight (in, out)).

    A Conv1D can only exist once transformers has been imported, so this never imports it.
    """
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def linear_from_conv1d(conv):
    """The ``nn.Linear`` that computes what a transformers ``Conv1D`` does (its weight transposed)."""
    if not is_conv1d(conv):
        raise TypeError(f"conv must be a transformers Conv1D, got {type(conv).__name__}")
    fan_in, fan_out = conv.weight.shape
    linear = nn.Linear(fan_in, fan_out, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    return linear.requires_grad_(conv.weight.requires_grad)


def layer_features(module):
    """``(in_features, out_features)`` of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if is_conv1d(module):
        return tuple(module.weight.shape)  # Conv1D stores its weight as (in, out)
    return module.in_features, module.out_features


# ----------------------------------------------------------------------------- checks


def _check_rank(rank, in_features, out_features):
    positive_int("rank", rank)
    limit = min(in_features, out_features)
    if rank > limit:
        raise ValueError(
            f"rank must be at most min(in_features, out_features) = min({in_features}, "
            f"{out_features}) = {limit} for this layer, got {rank!r}"
        )


def _check_base(base, rank):
    if isinstance(base, LoRALinear):
        raise TypeError("base is already a LoRALinear; wrap the plain nn.Linear only once")
    check_linear_base(base)
    _check_rank(rank, *layer_features(base))


def check_linear_base(base):
    """A layer LoRA can wrap: an ``nn.Linear`` or transformers ``Conv1D`` with a float weight."""
    if not (isinstance(base, nn.Linear) or is_conv1d(base)):
        raise TypeError(
            f"base must be a torch.nn.Linear or a transformers Conv1D, got {type(base).__name__}"
        )
    if not base.weight.is_floating_point():
        raise TypeError(
            f"base.weight must be a floating-point tensor, got dtype {base.weight.dtype} "
            "(quantized layers need lora_lab.QLoRALinear or PEFT)"
        )


def adapter_dtype_for(adapter_dtype, base_dtype):
    """The adapters' dtype: ``adapter_dtype``, or PEFT's rule (``autocast_adapter_dtype=True``)
    when it is None: float32 adapters on a 16-bit base, else the base's dtype."""
    if adapter_dtype is None:
        return torch.float32 if base_dtype in HALF else base_dtype
    if not isinstance(adapter_dtype, torch.dtype) or not adapter_dtype.is_floating_point:
        raise TypeError(
            f"adapter_dtype must be None or a floating torch.dtype (torch.float32, "
            f"torch.bfloat16, torch.float16), got {adapter_dtype!r}"
        )
    return adapter_dtype


def _check_init(init_lora_weights, loftq_config):
    """Validate the init choice; return the LoftQ settings it uses (None unless "loftq")."""
    check_init(init_lora_weights)
    if init_lora_weights == "loftq":
        return check_loftq_config(loftq_config)
    if loftq_config is not None:
        raise ValueError(
            f"loftq_config={loftq_config!r} is only used with init_lora_weights='loftq', "
            f"got init_lora_weights={init_lora_weights!r}"
        )
    return None


def check_variant(use_dora=False, init_lora_weights=True, loftq_config=None):
    """Validate the variant switches (chapter 11); return the LoftQ settings (None unless LoftQ)."""
    boolean("use_dora", use_dora)
    return _check_init(init_lora_weights, loftq_config)


def check_hyperparameters(rank, alpha, dropout, use_rslora):
    """Validate LoRA hyperparameters that do not depend on a layer's shape."""
    positive_int("rank", rank)
    finite_number("alpha", alpha, minimum=0)
    probability("dropout", dropout)
    boolean("use_rslora", use_rslora)


# ----------------------------------------------------------------------------- the layer


class WrapsBase:
    """What a layer wrapping ``self.base_layer`` (an nn.Linear or a Conv1D) shows of it."""

    @property
    def in_features(self):
        return layer_features(self.base_layer)[0]

    @property
    def out_features(self):
        return layer_features(self.base_layer)[1]

    @property
    def weight(self):
        """The base layer's weight (some model code reads ``proj.weight``)."""
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def _weight_out_in(self):
        """The base weight as (out, in), whatever its storage (a Conv1D keeps (in, out))."""
        weight = self.base_layer.weight
        return weight.T if is_conv1d(self.base_layer) else weight


class LoRALinear(WrapsBase, nn.Module):
    """A frozen ``nn.Linear`` plus the low-rank update ``scaling * B @ A``, as PEFT computes it.

    The base may also be transformers' ``Conv1D`` (GPT-2), whose weight is stored transposed,
    (in, out): ``fan_in_fan_out`` is then True, as in PEFT, and merging transposes the update.
    On a 16-bit base the adapter weights are float32 unless ``adapter_dtype`` says otherwise
    (PEFT's default): the input is cast to their dtype, and the sum back to the base's.

    ``merge()`` folds the update into the base weight and ``unmerge()`` takes it out again;
    each raises RuntimeError when the layer is already in the state asked for, because a
    second merge would add the update twice. While merged, the forward pass is the base
    layer's alone, so ``lora_A`` and ``lora_B`` get no gradients: unmerge before training.
    """

    def __init__(
        self,
        base,
        rank=8,
        alpha=16,
        dropout=0.0,
        use_rslora=False,
        adapter_dtype=None,
        *,
        use_dora=False,
        init_lora_weights=True,
        loftq_config=None,
    ):
        super().__init__()
        _check_base(base, rank)
        finite_number("alpha", alpha, minimum=0)
        probability("dropout", dropout)
        boolean("use_rslora", use_rslora)
        loftq_config = check_variant(use_dora, init_lora_weights, loftq_config)
        dtype = adapter_dtype_for(adapter_dtype, base.weight.dtype)

        self.base_layer = base.requires_grad_(False)  # frozen W (out, in) and b (out,)
        self.rank = int(rank)
        # a plain int or float (not a NumPy or torch scalar), as PEFT's JSON config holds it
        self.alpha = int(alpha) if isinstance(alpha, numbers.Integral) else float(alpha)
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.fan_in_fan_out = is_conv1d(base)  # PEFT's name: the weight is stored (in, out)
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        kw = {"bias": False, "device": base.weight.device, "dtype": dtype}
        self.lora_A = nn.Linear(self.in_features, self.rank, **kw)  # A: (rank, in)
        self.lora_B = nn.Linear(self.rank, self.out_features, **kw)  # B: (out, rank)
        self.init_lora_weights, self.loftq_config = init_lora_weights, loftq_config
        self.use_dora = use_dora
        self.register_parameter("lora_magnitude_vector", None)  # DoRA's m, (out,)
        self.merged = False
        if init_lora_weights in ("pissa", "loftq"):
            self._init_from_weight()  # moves part of W into A and B
        elif init_lora_weights is not False:  # False keeps nn.Linear's random A and B, as PEFT
            self.reset_lora_parameters()
        if use_dora:  # after the init, as in PEFT: m starts at the norms of W + s B A
            norm = dora_weight_norm(self._weight_out_in(), self.delta_weight().detach())
            self.lora_magnitude_vector = nn.Parameter(norm.to(dtype))

    def reset_lora_parameters(self):
        """PEFT's starts that leave W alone: the update BA starts at 0 unless init is False.

        True: A ~ Kaiming-uniform (nn.Linear's default), B = 0. "gaussian": A ~ N(0, 1/r^2),
        B = 0. False: A and B both Kaiming-uniform (a random, non-zero update, for tests).
        """
        init = self.init_lora_weights
        if init in ("pissa", "loftq"):
            raise ValueError(
                f"init_lora_weights={init!r} changed the base weight when the layer was built; "
                "build a new LoRALinear on the original weight to start again"
            )
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.rank)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B.weight)

    @torch.no_grad()
    def _init_from_weight(self):
        """PiSSA or LoftQ: A and B from the SVD of (part of) W; the frozen weight keeps the rest."""
        weight = self._weight_out_in()  # (out, in)
        if self.init_lora_weights == "pissa":
            A, B, frozen = pissa_factors(weight, self.rank, self.scaling)
        else:
            bits, steps = self.loftq_config["loftq_bits"], self.loftq_config["loftq_iter"]
            A, B, frozen = loftq_factors(weight, self.rank, bits, steps)
        self.lora_A.weight.copy_(A)
        self.lora_B.weight.copy_(B)
        stored = self.base_layer.weight
        stored.copy_((frozen.T if self.fan_in_fan_out else frozen).to(stored.dtype))

    def forward(self, x):  # x: (..., in)
        y = self.base_layer(x)  # (..., out)
        if self.merged:
            return y  # the update already sits inside base_layer.weight
        x = x.to(self.lora_A.weight.dtype)  # fp32 adapters on a 16-bit base see fp32 inputs
        dropped = self.lora_dropout(x)
        update = self.scaling * self.lora_B(self.lora_A(dropped))  # (..., out)
        if self.use_dora:
            return self._dora_forward(x, dropped, y, update)
        return (y + update).to(y.dtype)

    def _dora_forward(self, x, dropped, y, update):
        """DoRA: y = m / ||W + sBA||_c * (W x + s B A x) + b, the norm a constant (no gradient).

        Written as PEFT adds it to the base output y: (m/n - 1) * W x + (m/n) * s B A x, where
        W x is y without its bias, or, when dropout is active, W applied to the dropped input.
        """
        weight = self._weight_out_in().to(x.dtype)  # (out, in)
        norm = dora_weight_norm(weight, self.delta_weight().detach().to(x.dtype)).detach()
        ratio = self.lora_magnitude_vector / norm  # (out,)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base = y if bias is None else y - bias  # W x, from the base layer's own output
        else:
            base = F.linear(dropped, weight)  # W x on the dropped input
        return (y + (ratio - 1) * base + ratio * update).to(y.dtype)

    def delta_weight(self):
        """The update ``scaling * B @ A`` as an (out, in) matrix, in the adapter's dtype."""
        A, B = self.lora_A.weight, self.lora_B.weight
        if A.dtype in HALF:
            return (self.scaling * (B.float() @ A.float())).to(A.dtype)  # accumulate in fp32
        return self.scaling * (B @ A)  # (out, in)

    def _delta_as_stored(self):
        """The update laid out as the base weight is stored: (in, out) for a Conv1D."""
        delta = self.delta_weight()
        return (delta.T if self.fan_in_fan_out else delta).to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self):
        """Add the update to the base weight; forward then costs what the base costs.

        With DoRA the merged weight is m / ||W + dW||_c * (W + dW); the norms are kept
        (``lora_dora_norm``, saved with a merged layer) so that unmerge can divide them out.
        """
        if self.merged:
            raise RuntimeError("merge() called on a LoRALinear that is already merged")
        if self.use_dora:
            weight = self._weight_out_in()
            delta = self.delta_weight().to(weight.dtype)
            norm = dora_weight_norm(weight.float(), delta.float())  # (out,)
            ratio = (self.lora_magnitude_vector.float() / norm)[:, None]  # (out, 1)
            merged = (ratio * (weight.float() + delta.float())).to(weight.dtype)
            self.base_layer.weight.copy_(merged.T if self.fan_in_fan_out else merged)
            self.register_buffer(DORA_NORM_KEY, norm)
        else:
            self.base_layer.weight.add_(self._delta_as_stored())
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Subtract the update from the base weight again (exact up to float rounding)."""
        if not self.merged:
            raise RuntimeError("unmerge() called on a LoRALinear that is not merged")
        if self.use_dora:
            norm = getattr(self, DORA_NORM_KEY)
            weight = self._weight_out_in().float()
            ratio = (self.lora_magnitude_vector.float() / norm)[:, None]
            original = (weight / ratio - self.delta_weight().float()).to(self.weight.dtype)
            self.base_layer.weight.copy_(original.T if self.fan_in_fan_out else original)
            delattr(self, DORA_NORM_KEY)
        else:
            self.base_layer.weight.sub_(self._delta_as_stored())
        self.merged = False

    # A merged layer's base weight holds the update. Its state dict says so (``lora_merged``),
    # and loading one sets ``merged`` from it, so the update is never applied twice: a merged
    # state dict loaded into an unmerged model leaves the layer merged, and vice versa.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + MERGED_KEY] = torch.tensor(True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        flag = state_dict.pop(prefix + MERGED_KEY, None)
        norm = state_dict.pop(prefix + DORA_NORM_KEY, None)
        if hasattr(self, DORA_NORM_KEY):
            delattr(self, DORA_NORM_KEY)  # the norms a merge kept belong to the old weights
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.merged = bool(flag) if flag is not None else False
        if self.merged and self.use_dora:
            if norm is None:
                raise ValueError(
                    f"{prefix}: a merged DoRA layer's state dict must hold {DORA_NORM_KEY!r} "
                    "(the norms unmerge divides out)"
                )
            self.register_buffer(DORA_NORM_KEY, norm.clone())

    def extra_repr(self):
        extra = f", use_dora={self.use_dora}" if self.use_dora else ""
        if self.init_lora_weights is not True:
            extra += f", init_lora_weights={self.init_lora_weights!r}"
        return (
            f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, "
            f"use_rslora={self.use_rslora}{extra}, merged={self.merged}"
        )


# ----------------------------------------------------------------------------- injection


def _inside(name, prefixes):
    """True if a proper prefix of the dotted ``name`` is in the set ``prefixes``."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts)))


def _output_head(model):
    """The output head that "all-linear" leaves alone, as a module (or None).

    A transformers model names it through ``get_output_embeddings()``, which PEFT uses;
    any other model's head is the module called ``lm_head`` (the name lora_lab's GPT uses).
    """
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        return getter()
    return getattr(model, "lm_head", None)


def linear_names(model, wrappers=None):
    """Names of the linear layers (nn.Linear, Conv1D, a LoRA wrapper) of ``model``, not the
    layers inside a wrapper. ``wrappers``: the wrapper classes (default: LoRALinear)."""
    wrappers = (LoRALinear,) if wrappers is None else tuple(wrappers)
    inside = {n for n, m in model.named_modules() if isinstance(m, wrappers)}
    return [
        name
        for name, module in model.named_modules()
        if name
        and not _inside(name, inside)
        and (isinstance(module, (nn.Linear, *wrappers)) or is_conv1d(module))
    ]


def matching_names(model, target_modules, wrappers=None):
    """``(names, linear)``: the modules ``target_modules`` selects under PEFT's rules, and the
    linear layers (``linear_names``) an error lists when it selects none; never a layer inside
    one of the ``wrappers``. Checks of what was selected are the caller's."""
    given, target_modules = target_modules, check_target_modules(target_modules)
    linear = linear_names(model, wrappers)
    if target_modules == ALL_LINEAR:
        head = _output_head(model)
        names = [n for n in linear if model.get_submodule(n) is not head]
    else:
        wrappers = (LoRALinear,) if wrappers is None else tuple(wrappers)
        inside = {n for n, m in model.named_modules() if isinstance(m, wrappers)}
        names = [
            n
            for n, _ in model.named_modules()
            if n and target_matches(n, target_modules) and not _inside(n, inside)
        ]
    if not names:
        raise ValueError(
            f"target_modules {given!r} matched no module; the linear layers are: "
            f"{_short_list(linear)}"
        )
    return names, linear


def check_target_modules(target_modules):
    """Validate ``target_modules`` as PEFT accepts it: names, a regex string, or "all-linear"."""
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            return ALL_LINEAR
        if len(target_modules) > MAX_PATTERN_LENGTH:
            raise ValueError(
                f"target_modules is a regex of {len(target_modules)} characters; at most "
                f"{MAX_PATTERN_LENGTH} are accepted"
            )
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(
                f"target_modules {target_modules!r} is not a valid regular expression ({err})"
            ) from None
        return target_modules
    ok = isinstance(target_modules, (list, tuple, set, frozenset)) and len(target_modules) > 0
    if not ok or not all(isinstance(t, str) and t for t in target_modules):
        raise TypeError(
            "target_modules must be a non-empty list/tuple of module names, a regex string, "
            f"or 'all-linear'; got {target_modules!r}"
        )
    return tuple(target_modules)


def target_matches(name, target_modules):
    """PEFT's rule: a regex is matched against the full name, a list by name suffix.

    A regex may come from a file someone else wrote, and some patterns (nested repetition
    such as ``(a+)+$``) take exponential time to fail. So it is matched by the ``regex``
    package (Python's ``re`` syntax) with a time limit, ``REGEX_TIMEOUT_S`` per name: a
    pattern that needs longer is refused with a ValueError instead of hanging the process.
    """
    if isinstance(target_modules, str):
        import regex

        try:
            return regex.fullmatch(target_modules, name, timeout=REGEX_TIMEOUT_S) is not None
        except TimeoutError:
            raise ValueError(
                f"target_modules regex {target_modules!r} took more than {REGEX_TIMEOUT_S} s "
                f"to match the module name {name!r} (nested repetition backtracks "
                "exponentially); list the module names or write a simpler pattern"
            ) from None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_target_modules(model, target_modules=DEFAULT_TARGETS):
    """The full names of the linear layers that ``target_modules`` selects in ``model``.

    Raises ValueError if nothing matches (listing the linear layers that exist), TypeError
    if a match is not an ``nn.Linear``, and ValueError if a match already carries LoRA.
    """
    validate.module("model", model)
    names, _ = matching_names(model, target_modules)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(
                f"target_modules {target_modules!r} matched {name!r}, which already has LoRA; "
                "apply LoRA once per layer (merge_lora first to start over)"
            )
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise TypeError(
                f"target_modules {target_modules!r} matched {name!r}, a {type(module).__name__}; "
                "LoRALinear wraps torch.nn.Linear and transformers Conv1D layers only"
            )
    return names


def _short_list(names, limit=40):
    if not names:
        return "(none)"
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def replace_module(model, name, new):
    """Put ``new`` in place of the submodule called ``name`` (a full dotted name)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_lora(
    model,
    rank=8,
    alpha=16,
    target_modules=DEFAULT_TARGETS,
    dropout=0.0,
    use_rslora=False,
    adapter_dtype=None,
    *,
    use_dora=False,
    init_lora_weights=True,
    loftq_config=None,
):
    """Wrap the selected linear layers of ``model`` in LoRALinear (in place); return ``model``.

    ``target_modules`` is matched as PEFT matches it: names match as suffixes of the full
    module name, a string is a regex that must match the full name, and ``"all-linear"``
    selects every linear layer but the output head. Every parameter that is not a LoRA
    parameter is frozen. ``adapter_dtype`` None keeps adapters in float32 on a 16-bit model,
    as PEFT does; pass the model's dtype for 16-bit adapters. ``use_dora``, ``init_lora_weights``
    and ``loftq_config`` choose LoRA's variants (chapter 11), with PEFT's names and meanings.
    """
    check_hyperparameters(rank, alpha, dropout, use_rslora)
    check_variant(use_dora, init_lora_weights, loftq_config)
    if adapter_dtype is not None:
        adapter_dtype_for(adapter_dtype, None)  # reject a bad value before looking at the model
    names = find_target_modules(model, target_modules)
    for name in names:  # check every layer before changing any
        try:
            _check_base(model.get_submodule(name), rank)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (layer {name!r})") from None
    for name in names:
        base = model.get_submodule(name)
        variant = {"use_dora": use_dora, "init_lora_weights": init_lora_weights}
        layer = LoRALinear(
            base,
            rank,
            alpha,
            dropout,
            use_rslora,
            adapter_dtype,
            **variant,
            loftq_config=loftq_config,
        )
        replace_module(model, name, layer)
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_A.weight.requires_grad_(True)
            module.lora_B.weight.requires_grad_(True)
            if module.use_dora:
                module.lora_magnitude_vector.requires_grad_(True)
    return model


def lora_layers(model):
    """``{full name: LoRALinear}`` for every LoRA layer in ``model``, in module order."""
    validate.module("model", model)
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def count_parameters(model):
    """``(trainable, total)`` parameter counts; a shared (tied) parameter counts once."""
    validate.module("model", model)
    params = list(model.parameters())  # parameters() already skips tied duplicates
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params)


def merge_lora(model):
    """Fold every LoRA update into its base weight and put a plain linear layer back.

    Works in place and returns ``model`` (a LoRALinear passed alone comes back as its
    nn.Linear). A LoRALinear's base weight takes the update; a QLoRALinear, whose 4-bit base
    cannot, becomes the float ``nn.Linear`` of ``merged_linear()``. Base weights stay frozen.
    """
    from .quant import QLoRALinear

    if isinstance(model, LoRALinear):
        if not model.merged:
            model.merge()
        return model.base_layer
    validate.module("model", model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, QLoRALinear))}
    if not layers:
        raise ValueError("merge_lora: model has no LoRALinear or QLoRALinear layers to merge")
    for name, layer in layers.items():
        if isinstance(layer, QLoRALinear):
            replace_module(model, name, layer.merged_linear())
            continue
        if not layer.merged:
            layer.merge()
        replace_module(model, name, layer.base_layer)
    return model
