"""Many adapters on one model: named LoRA adapters side by side, mixed batches, hot-swapping.

A ``MultiLoRALinear`` holds one frozen base layer and, per adapter name, its own ``lora_A``,
``lora_B`` and ``scaling``, as PEFT's LoRA layer does (state-dict keys such as
``q_proj.lora_A.pirate.weight``). One adapter is active, or none (the base model alone). In a
mixed batch, row ``i`` uses ``adapter_names[i]`` (``"__base__"`` or None: no adapter): the
rows are grouped by adapter and each group gets its own low-rank update, as PEFT's
``model(..., adapter_names=[...])`` does. ``hot_swap`` replaces an adapter's weights in place.

The layers are for serving: their adapter weights are frozen. Train an adapter with
``apply_lora`` and ``train``, save it with ``save_adapter``, then load it here by name.

Over 500 lines: the layer, the matching of its targets, and the checks every public function
makes on names, rows and files (reusing ``lora_lab.adapters``' readers) are one concept.
"""

import contextlib
import math
import numbers
import re

import torch
import torch.nn as nn

from . import adapters, validate
from .lora import (
    DEFAULT_TARGETS,
    LoRALinear,
    WrapsBase,
    _inside,
    adapter_dtype_for,
    check_hyperparameters,
    check_linear_base,
    is_conv1d,
    layer_features,
    matching_names,
    replace_module,
)

BASE = "__base__"  # PEFT's name, in adapter_names, for a row that uses no adapter
NAME_PATTERN = re.compile(r"[A-Za-z0-9_\-]+")  # an adapter name is a key of nn.ModuleDict


# ----------------------------------------------------------------------------- the layer


class MultiLoRALinear(WrapsBase, nn.Module):
    """A frozen ``nn.Linear`` (or transformers ``Conv1D``) with several named LoRA adapters.

    ``forward`` adds the active adapter's ``scaling * B (A x)``, or nothing when no adapter is
    active or this layer lacks it. While ``row_adapters`` holds one name per row of the batch,
    each row gets its own adapter's update instead (a mixed batch; see ``mixed_batch``). On a
    16-bit base the adapters are float32 (PEFT's default): the update is added in float32 and
    the sum rounded once to the base's dtype, as ``LoRALinear`` does.
    """

    def __init__(self, base):
        super().__init__()
        check_linear_base(base)
        self.base_layer = base.requires_grad_(False)  # frozen W (out, in) and b (out,)
        self.fan_in_fan_out = is_conv1d(base)  # PEFT's name: the weight is stored (in, out)
        self.lora_A = nn.ModuleDict()  # name -> nn.Linear(in, r): A (r, in)
        self.lora_B = nn.ModuleDict()  # name -> nn.Linear(r, out): B (out, r)
        self.lora_dropout = nn.ModuleDict()
        self.r, self.lora_alpha, self.use_rslora, self.scaling = {}, {}, {}, {}
        self.active_adapter = None  # the name in use outside a mixed batch; None: base only
        self.row_adapters = None  # during a mixed batch: one name (or BASE) per row

    def add(self, name, rank, alpha, dropout=0.0, use_rslora=False, adapter_dtype=None):
        """Give this layer adapter ``name``: A Kaiming-uniform, B zero (the update starts at 0)."""
        if name in self.lora_A:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        dtype = adapter_dtype_for(adapter_dtype, self.base_layer.weight.dtype)
        kw = {"bias": False, "device": self.base_layer.weight.device, "dtype": dtype}
        self.lora_A[name] = nn.Linear(self.in_features, rank, **kw).requires_grad_(False)
        self.lora_B[name] = nn.Linear(rank, self.out_features, **kw).requires_grad_(False)
        nn.init.zeros_(self.lora_B[name].weight)  # nn.Linear's init already gave A its values
        self.r[name] = int(rank)
        self.set_scaling(name, alpha, dropout, use_rslora)

    def set_scaling(self, name, alpha, dropout=0.0, use_rslora=False):
        """Set adapter ``name``'s alpha, dropout and rsLoRA flag (its weights stay as they are)."""
        rank = self.r[name]
        self.lora_alpha[name] = int(alpha) if isinstance(alpha, numbers.Integral) else float(alpha)
        self.use_rslora[name] = use_rslora
        self.scaling[name] = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        if name not in self.lora_dropout or dropout != getattr(self.lora_dropout[name], "p", 0.0):
            self.lora_dropout[name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()

    def remove(self, name):
        """Drop adapter ``name`` from this layer (its tensors are freed once nothing holds them)."""
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[name]
        for table in (self.r, self.lora_alpha, self.use_rslora, self.scaling):
            del table[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def update(self, x, name):  # x: (n, ..., in) -> (n, ..., out), in the adapter's dtype
        """The low-rank update ``scaling * B (A x)`` of adapter ``name``."""
        x = x.to(self.lora_A[name].weight.dtype)  # fp32 adapters on a 16-bit base see fp32
        return self.scaling[name] * self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x)))

    def forward(self, x):  # x: (B, ..., in)
        y = self.base_layer(x)  # (B, ..., out)
        if self.row_adapters is not None:
            return self.mixed_forward(x, y)
        name = self.active_adapter
        if name is None or name not in self.lora_A:
            return y
        return (y + self.update(x, name)).to(y.dtype)

    def mixed_forward(self, x, y):
        """Row ``i`` of ``y`` (the base output) plus the update of ``row_adapters[i]``."""
        rows = self.row_adapters
        if x.dim() < 2 or x.shape[0] != len(rows):
            raise ValueError(
                f"adapter_names has {len(rows)} names but the batch has "
                f"{x.shape[0] if x.dim() else 0} rows: give one name per row"
            )
        out = y
        for name, idx in group_rows(rows).items():
            if name == BASE or name not in self.lora_A:
                continue  # these rows keep the base output
            if len(idx) == len(rows):  # the whole batch uses one adapter: no gather needed
                return (y + self.update(x, name)).to(y.dtype)
            if out is y:
                out = y.clone()
            index = torch.tensor(idx, device=x.device)
            out[index] = (y[index] + self.update(x[index], name)).to(y.dtype)
        return out

    def delta_weight(self, name):
        """Adapter ``name``'s update ``scaling * B @ A`` as an (out, in) matrix."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        return (self.scaling[name] * (B.float() @ A.float())).to(A.dtype)  # accumulate in fp32

    def extra_repr(self):
        shown = ", ".join(f"{n} (r={self.r[n]}, scaling={self.scaling[n]:g})" for n in self.r)
        return f"adapters: [{shown}], active={self.active_adapter!r}"


def group_rows(adapter_names):
    """``{name: [row indices]}`` in the order names first appear: the groups of a mixed batch."""
    groups = {}
    for i, name in enumerate(adapter_names):
        groups.setdefault(name, []).append(i)
    return groups


# ----------------------------------------------------------------------------- finding layers


def multi_lora_layers(model):
    """``{full name: MultiLoRALinear}`` for every multi-adapter layer of ``model``."""
    validate.module("model", model)
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


def find_targets(model, target_modules):
    """Full names of the layers ``target_modules`` selects (PEFT's rules; see lora.py)."""
    names, _ = matching_names(model, target_modules, wrappers=(MultiLoRALinear, LoRALinear))
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise TypeError(
                f"{name!r} is a single-adapter LoRALinear; named adapters go on a model without "
                "LoRALinear layers (merge_lora or start from the base model)"
            )
        if not (isinstance(module, (nn.Linear, MultiLoRALinear)) or is_conv1d(module)):
            raise TypeError(
                f"target_modules {target_modules!r} matched {name!r}, a {type(module).__name__}; "
                "adapters go on torch.nn.Linear and transformers Conv1D layers only"
            )
    return names


def _base_of(module):
    return module.base_layer if isinstance(module, MultiLoRALinear) else module


class _BaseView:
    """``model`` as ``lora_lab.adapters``' checks expect a model without adapters to look.

    A wrapped layer reads as its base layer, and the adapters' own ``nn.Linear`` modules are
    hidden, so the file checks (shapes, ``fan_in_fan_out``, base-model size) see the base.
    """

    def __init__(self, model):
        self.model = model
        self.multi = list(multi_lora_layers(model))

    def get_submodule(self, name):
        return _base_of(self.model.get_submodule(name))

    def named_modules(self):
        own = {f"{m}.{part}" for m in self.multi for part in ("lora_A", "lora_B")}
        return [(n, m) for n, m in self.model.named_modules() if not _inside(n, own)]

    def named_parameters(self):
        return self.model.named_parameters()


# ----------------------------------------------------------------------------- names


def _names_of(layers):
    names = {}
    for layer in layers:
        names.update(dict.fromkeys(layer.r))
    return tuple(names)


def list_adapters(model):
    """The adapter names on ``model``, in the order they were added."""
    return _names_of(multi_lora_layers(model).values())


def active_adapter(model):
    """The adapter in use outside a mixed batch, or None (the base model alone)."""
    layers = list(multi_lora_layers(model).values())
    return layers[0].active_adapter if layers else None


def _new_name(model, adapter_name):
    if not isinstance(adapter_name, str) or not NAME_PATTERN.fullmatch(adapter_name):
        raise ValueError(
            f"adapter_name must be a non-empty str of letters, digits, '_' and '-', "
            f"got {adapter_name!r}"
        )
    if adapter_name == BASE:
        raise ValueError(f"adapter_name {BASE!r} is reserved: it means 'no adapter'")
    if adapter_name in list_adapters(model):
        raise ValueError(
            f"adapter_name {adapter_name!r} is already on the model (adapters: "
            f"{list(list_adapters(model))}); delete_adapter it first, or hot_swap its weights"
        )


def _known_name(model, adapter_name, arg="adapter_name", names=None):
    names = list_adapters(model) if names is None else names
    if adapter_name not in names:
        raise ValueError(
            f"{arg} {adapter_name!r} is not on the model; its adapters are {list(names)}"
        )


# ----------------------------------------------------------------------------- add, load, set


def _wrap(model, name):
    module = model.get_submodule(name)
    if isinstance(module, MultiLoRALinear):
        return module
    layer = MultiLoRALinear(module)
    layer.active_adapter = active_adapter(model)
    replace_module(model, name, layer)
    return layer


def _add(model, adapter_name, names, rank, alpha, dropout, use_rslora, adapter_dtype):
    """Add the adapter to the layers ``names`` (all checked already); return them by name."""
    first = not list_adapters(model)
    for param in model.parameters():
        param.requires_grad_(False)  # a serving model: the base, and every adapter, frozen
    layers = {}
    for name in names:
        layers[name] = _wrap(model, name)
        layers[name].add(adapter_name, rank, alpha, dropout, use_rslora, adapter_dtype)
    if first:  # PEFT's rule: the first adapter becomes the active one
        set_adapter(model, adapter_name)
    return layers


def _check_layers(model, names, rank):
    for name in names:
        fan_in, fan_out = layer_features(_base_of(model.get_submodule(name)))
        if rank > min(fan_in, fan_out):
            raise ValueError(
                f"rank must be at most min(in_features, out_features) = {min(fan_in, fan_out)} "
                f"for layer {name!r}, got {rank!r}"
            )


def add_adapter(
    model,
    adapter_name,
    rank=8,
    alpha=16,
    target_modules=DEFAULT_TARGETS,
    dropout=0.0,
    use_rslora=False,
    adapter_dtype=None,
):
    """Add a new adapter called ``adapter_name`` to ``model`` (in place); return ``model``.

    The selected layers are wrapped in ``MultiLoRALinear`` (once; later adapters share the
    wrapper). A starts Kaiming-uniform and B at zero, so the new adapter changes nothing until
    its weights are set. The first adapter added becomes active; later ones do not.
    """
    validate.module("model", model)
    _new_name(model, adapter_name)
    check_hyperparameters(rank, alpha, dropout, use_rslora)
    adapter_dtype_for(adapter_dtype, torch.float32)
    names = find_targets(model, target_modules)
    _check_layers(model, names, rank)
    _add(model, adapter_name, names, rank, alpha, dropout, use_rslora, adapter_dtype)
    return model


def _check_plain_lora(config, path):
    """Refuse the variants a shared base cannot serve side by side with other adapters."""
    where = f"{str(path)!r}/{adapters.CONFIG_NAME}"
    if config.get("use_dora", False):
        raise ValueError(
            f"use_dora=True in {where}: named adapters are plain LoRA (a DoRA layer rescales "
            "the whole weight); load a DoRA adapter alone with lora_lab.load_adapter"
        )
    init = config.get("init_lora_weights", True)
    if init in ("pissa", "loftq"):
        raise ValueError(
            f"init_lora_weights={init!r} in {where}: {init} changed the base weight when it "
            "was made, so the adapter needs its own base; load it alone with load_adapter"
        )


def _read(model, path):
    """Read and check the adapter directory ``path`` against ``model``: (config, names, tensors)."""
    config = adapters.read_adapter_config(path)
    _, weights_file = adapters._adapter_files(path)
    _check_plain_lora(config, path)
    rank, alpha = config["r"], config["lora_alpha"]
    dropout, use_rslora = config.get("lora_dropout", 0.0), config.get("use_rslora", False)
    try:
        check_hyperparameters(rank, alpha, dropout, use_rslora)
        names = find_targets(model, config["target_modules"])
    except (TypeError, ValueError) as err:
        raise type(err)(f"{err} (read from {str(path)!r}/{adapters.CONFIG_NAME})") from None
    view = _BaseView(model)
    adapters._check_fan_in_fan_out(config.get("fan_in_fan_out", False), view, names, path)
    tensors, metadata = adapters._read_weights(weights_file)
    adapters._check_file(tensors, view, names, rank, weights_file)
    adapters._check_base(metadata, view, weights_file)
    return config, names, tensors


@torch.no_grad()
def _copy_weights(layers, adapter_name, tensors):
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            weight = getattr(layer, part)[adapter_name].weight
            weight.copy_(tensors[f"{adapters.PREFIX}{name}.{part}.weight"])


def load_named_adapter(model, path, adapter_name):
    """Add the adapter saved at ``path`` (by PEFT or ``save_adapter``) as ``adapter_name``.

    The file is checked as ``lora_lab.load_adapter`` checks it (config, every key, shapes,
    finite values, checksum, base size) before ``model`` changes. Returns ``model``.
    """
    validate.module("model", model)
    _new_name(model, adapter_name)
    config, names, tensors = _read(model, path)
    rank, alpha = config["r"], config["lora_alpha"]
    dropout, use_rslora = config.get("lora_dropout", 0.0), config.get("use_rslora", False)
    layers = _add(model, adapter_name, names, rank, alpha, dropout, use_rslora, None)
    _copy_weights(layers, adapter_name, tensors)
    return model


def set_adapter(model, adapter_name):
    """Make ``adapter_name`` the active adapter of every layer; None: the base model alone."""
    layers = multi_lora_layers(model).values()
    if adapter_name is not None:
        _known_name(model, adapter_name, names=_names_of(layers))
    for layer in layers:
        layer.active_adapter = adapter_name
    return model


def delete_adapter(model, adapter_name):
    """Remove ``adapter_name`` and its weights; a layer left with no adapter is unwrapped.

    If it was the active adapter, none is active afterwards (the base model alone).
    """
    validate.module("model", model)
    _known_name(model, adapter_name)
    for name, layer in multi_lora_layers(model).items():
        if adapter_name in layer.r:
            layer.remove(adapter_name)
        if not layer.r:
            replace_module(model, name, layer.base_layer)
    set_adapter(model, None if active_adapter(model) == adapter_name else active_adapter(model))
    return model


# ----------------------------------------------------------------------------- mixed batches


def _check_row_names(known, adapter_names):
    if not isinstance(adapter_names, (list, tuple)) or not adapter_names:
        raise TypeError(
            f"adapter_names must be a non-empty list of adapter names (one per row), "
            f"got {adapter_names!r}"
        )
    rows = [BASE if n is None else n for n in adapter_names]
    for i, name in enumerate(rows):
        if name != BASE and name not in known:
            raise ValueError(
                f"adapter_names[{i}] is {name!r}, not an adapter of the model; valid names are "
                f"{list(known)} and {BASE!r} or None for the base model"
            )
    return rows


@contextlib.contextmanager
def mixed_batch(model, adapter_names):
    """Within the block, row ``i`` of every batch ``model`` runs uses ``adapter_names[i]``.

    ``"__base__"`` or None: that row gets the base model alone. Every forward pass in the block
    must have ``len(adapter_names)`` rows. Inference only: in training mode it raises, as PEFT
    does. Afterwards the layers go back to their active adapter.
    """
    validate.module("model", model)
    layers = list(multi_lora_layers(model).values())
    if not layers:
        raise ValueError("model has no adapters; add_adapter or load_named_adapter first")
    rows = _check_row_names(_names_of(layers), adapter_names)
    if model.training:
        raise ValueError("mixed_batch is for inference: call model.eval() first")
    for layer in layers:
        layer.row_adapters = rows
    try:
        yield model
    finally:
        for layer in layers:
            layer.row_adapters = None


# ----------------------------------------------------------------------------- hot-swapping


def hot_swap(model, adapter_name, path):
    """Replace adapter ``adapter_name``'s weights, in place, with those saved at ``path``.

    The new adapter must target the same layers with the same rank, so every tensor keeps its
    storage and no module is rebuilt; alpha, dropout and rsLoRA may change (they are numbers).
    Anything that differs is an error naming it, raised before ``model`` changes.
    """
    validate.module("model", model)
    _known_name(model, adapter_name)
    config, names, tensors = _read(model, path)
    layers = {n: m for n, m in multi_lora_layers(model).items() if adapter_name in m.r}
    if set(names) != set(layers):
        raise ValueError(
            f"{str(path)!r} targets other layers than adapter {adapter_name!r}: only in the "
            f"file {sorted(set(names) - set(layers))}, only in the model "
            f"{sorted(set(layers) - set(names))}; hot_swap needs the same layers"
        )
    ranks = {layer.r[adapter_name] for layer in layers.values()}
    if ranks != {config["r"]}:
        raise ValueError(
            f"{str(path)!r} has rank r={config['r']}, adapter {adapter_name!r} has rank "
            f"{sorted(ranks)}: hot_swap keeps the tensors' shapes; delete_adapter and "
            "load_named_adapter to change the rank"
        )
    dropout, use_rslora = config.get("lora_dropout", 0.0), config.get("use_rslora", False)
    _copy_weights(layers, adapter_name, tensors)
    for layer in layers.values():
        layer.set_scaling(adapter_name, config["lora_alpha"], dropout, use_rslora)
    return model


__all__ = [
    "BASE",
    "MultiLoRALinear",
    "active_adapter",
    "add_adapter",
    "delete_adapter",
    "find_targets",
    "group_rows",
    "hot_swap",
    "list_adapters",
    "load_named_adapter",
    "mixed_batch",
    "multi_lora_layers",
    "set_adapter",
]
