"""Adapters on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

A lora_lab adapter directory is one ``peft.PeftModel.from_pretrained(base, path)`` loads,
and ``load_adapter`` reads the directories PEFT writes. Weights are safetensors only (never
a pickle), and a save is written whole to a temporary directory and then renamed into place.

Over 400 lines because reading a file nobody vouches for is most of it: every check a
hostile or damaged adapter needs (config, keys, shapes, finite values, hash, base size)
sits next to the format it checks.
"""

import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .files import check_finite, read_safetensors
from .lora import (
    apply_lora,
    check_hyperparameters,
    check_variant,
    find_target_modules,
    is_conv1d,
    layer_features,
    lora_layers,
)
from .variants import INIT_CHOICES

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME, "README.md"}  # what a save may replace
PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model

# PEFT config entries that change the adapter's math and lora_lab does not implement:
# entry -> the value that means "off". Loading refuses any other value.
UNSUPPORTED = {
    "lora_bias": False,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layers_pattern": None,
    "layer_replication": None,
    "exclude_modules": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "use_bdlora": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "kasa_config": None,
}


# ----------------------------------------------------------------------------- what is saved


def _layers_of(model):
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRALinear layers (call apply_lora or load_adapter first)")
    from .quant import QLoRALinear

    qlora = [n for n, m in model.named_modules() if isinstance(m, QLoRALinear)]
    if qlora:
        raise ValueError(
            f"model also has QLoRALinear layers ({qlora[:3]}{'...' if len(qlora) > 3 else ''}), "
            "whose adapters save_adapter does not write: saving only the LoRALinear layers "
            "would lose them. Save a model whose adapters are all LoRALinear"
        )
    return layers


def _one_value(layers, what, get):
    """The value ``get(layer)`` shared by every layer; PEFT's format stores one per adapter."""
    values = {name: get(layer) for name, layer in layers.items()}
    distinct = set(values.values())
    if len(distinct) > 1:
        raise ValueError(
            f"the LoRA layers differ in {what} ({values}); an adapter file records a single "
            f"{what}, so save layers with equal {what} only"
        )
    return distinct.pop()


def _dropout_p(layer):
    return float(getattr(layer.lora_dropout, "p", 0.0))


# The "off" entries a save writes: ones every PEFT since 0.13 knows (newer ones default to off).
WRITTEN_OFF = (
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
)


def _loftq_entry(layers):
    config = _one_value(layers, "loftq_config", lambda m: json.dumps(m.loftq_config))
    return {"loftq_config": json.loads(config)} if config != "null" else {}


def adapter_config(model):
    """The ``adapter_config.json`` contents for the LoRA layers of ``model``, as a dict.

    ``target_modules`` lists the full names of the wrapped layers, sorted, which selects
    exactly those layers under PEFT's matching rule, whatever pattern chose them.
    """
    layers = _layers_of(model)
    name = getattr(model, "name_or_path", None)  # set on transformers models
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": name if isinstance(name, str) and name else None,
        "r": _one_value(layers, "rank", lambda m: m.rank),
        "lora_alpha": _one_value(layers, "alpha", lambda m: m.alpha),
        "lora_dropout": _one_value(layers, "dropout", _dropout_p),
        "use_rslora": _one_value(layers, "use_rslora", lambda m: m.use_rslora),
        # True for GPT-2's Conv1D layers, whose weights are stored (in, out), as PEFT writes it
        "fan_in_fan_out": _one_value(layers, "fan_in_fan_out", lambda m: m.fan_in_fan_out),
        "target_modules": sorted(layers),
        "bias": "none",
        "use_dora": _one_value(layers, "use_dora", lambda m: m.use_dora),
        # PiSSA and LoftQ moved part of W into A and B: a loader redoes that on the base first
        "init_lora_weights": _one_value(layers, "init_lora_weights", lambda m: m.init_lora_weights),
        **_loftq_entry(layers),
        "inference_mode": True,
        **{key: UNSUPPORTED[key] for key in WRITTEN_OFF},
    }


def adapter_state_dict(model):
    """``{PEFT key: tensor}`` for every LoRA weight, e.g. ``base_model.model.<name>.lora_A.weight``.

    Refuses weights that are not finite (a diverged run): such an adapter is never written.
    """
    tensors = {}
    for name, layer in _layers_of(model).items():
        parts = {
            f"{name}.lora_A.weight": layer.lora_A.weight,
            f"{name}.lora_B.weight": layer.lora_B.weight,
        }
        if layer.use_dora:  # DoRA's magnitude m, saved under PEFT's key (no ".weight")
            parts[f"{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
        for key, weight in parts.items():
            check_finite(weight.detach(), PREFIX + key, "model")
            tensors[PREFIX + key] = weight.detach().to("cpu").contiguous()
    return tensors


# lora_lab writes two entries in the safetensors header (PEFT ignores them): a SHA-256 of the
# tensors, which detects flipped bits (safetensors itself has no checksum), and the base
# model's linear-layer count and parameter count, which tell a model of another size.
SHA_KEY, BASE_KEY = "lora_lab_sha256", "lora_lab_base"


def _digest(tensors):
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _base_fingerprint(model):
    from .lora import linear_names

    n_params = sum(
        p.numel()
        for n, p in model.named_parameters()
        if ".lora_A." not in n and ".lora_B." not in n and "lora_magnitude_vector" not in n
    )
    return f"{len(linear_names(model))} linear layers, {n_params} parameters"


# ----------------------------------------------------------------------------- saving


def _as_path(path, arg="path"):
    if not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise TypeError(f"{arg} must be a non-empty str or os.PathLike, got {path!r}")
    return Path(path)


def _check_replaceable(target):
    """Refuse to replace anything but a (possibly empty) adapter directory."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(
            f"path {str(target)!r} exists and is not a directory; not replacing it"
        )
    if not target.exists():
        return
    entries = set(os.listdir(target))
    foreign = sorted(entries - ADAPTER_FILES)
    if foreign or (entries and CONFIG_NAME not in entries):
        raise FileExistsError(
            f"path {str(target)!r} exists and is not an adapter directory (it holds "
            f"{sorted(entries)}); save_adapter only replaces a directory holding "
            f"{sorted(ADAPTER_FILES)}, so choose another path or remove it yourself"
        )


def _fsync(path):
    """Flush a file, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def exchange_paths(a, b):
    """Swap the paths ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the system cannot (another OS, an old kernel or file system).
    """
    if not sys.platform.startswith("linux"):
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _step(name):
    """A named point in save_adapter, where the crash tests stop the process."""


def _move_into_place(tmp, target):
    """Put the complete adapter in ``tmp`` at ``target``; on return ``tmp`` is gone.

    A new path is a plain rename. An old adapter is exchanged with the new one in one atomic
    step, so ``target`` always holds a complete adapter, old or new, even across a crash.
    Where the system has no atomic exchange the old adapter is renamed away first; a crash
    between the two renames leaves it in ``.<name>.old-*`` beside ``target``.
    """
    parent = target.parent
    if not target.exists():
        os.rename(tmp, target)
        _step("renamed")
        _fsync(parent)
        return
    if exchange_paths(tmp, target):  # tmp now holds the old adapter
        _step("exchanged")
        _fsync(parent)
        shutil.rmtree(tmp)
        _step("old removed")
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
    os.rename(target, backup / "adapter")
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(backup / "adapter", target)  # put the old adapter back
        shutil.rmtree(backup, ignore_errors=True)
        raise
    _fsync(parent)
    shutil.rmtree(backup, ignore_errors=True)


def _remove_debris(target):
    """Delete temporary folders an interrupted save of ``target`` left beside it."""
    for prefix in (f".{target.name}.tmp-", f".{target.name}.old-"):
        for stale in target.parent.glob(prefix + "*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)


def save_adapter(model, path):
    """Write the LoRA weights of ``model`` to the directory ``path`` in PEFT's format.

    The files are written and flushed to disk in a temporary directory beside ``path``,
    which then takes its place in one atomic exchange (Linux; elsewhere two renames): at any
    moment, a crash included, ``path`` holds the complete old adapter or the complete new
    one. An existing adapter directory is replaced; a ``README.md`` in it (lora_lab never
    writes one) is kept; any other existing file or directory is refused. Returns ``path``.
    """
    target = _as_path(path)
    config, tensors = adapter_config(model), adapter_state_dict(model)
    metadata = {"format": "pt", SHA_KEY: _digest(tensors), BASE_KEY: _base_fingerprint(model)}
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_debris(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        _step("weights written")
        with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        _step("config written")
        if (target / "README.md").is_file():
            shutil.copy2(target / "README.md", tmp / "README.md")  # the user's notes stay
        for name in os.listdir(tmp):
            _fsync(tmp / name)
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        _fsync(tmp)
        _step("synced")
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ----------------------------------------------------------------------------- loading


def _adapter_files(path):
    folder = _as_path(path)
    if not folder.exists():
        raise FileNotFoundError(f"adapter directory {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"path {str(folder)!r} is a file; pass the adapter directory")
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(config_file)!r} is missing: not an adapter directory")
    if not weights_file.is_file():
        pickles = [n for n in PICKLE_NAMES if (folder / n).exists()]
        if pickles:
            raise ValueError(
                f"{str(folder)!r} holds {pickles} but no {WEIGHTS_NAME}: lora_lab never loads "
                "pickles; convert the adapter to safetensors (e.g. save it again with PEFT's "
                "save_pretrained, which writes safetensors by default)"
            )
        raise FileNotFoundError(f"{str(weights_file)!r} is missing")
    return config_file, weights_file


def read_adapter_config(path):
    """Read and check ``adapter_config.json`` in ``path``: a LoRA adapter lora_lab can load."""
    config_file, _ = _adapter_files(path)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(config_file)!r} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(
            f"{str(config_file)!r} must hold a JSON object, got {type(config).__name__}"
        )
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"peft_type must be 'LORA', got {config.get('peft_type')!r} in {str(config_file)!r}"
        )
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"{str(config_file)!r} has no {key!r} entry")
    if config.get("bias", "none") != "none":
        raise ValueError(f"bias={config['bias']!r} is not supported (only 'none'); use PEFT for it")
    for key, off in UNSUPPORTED.items():
        value = config.get(key, off)
        if value not in (off, None, False, {}, [], ""):
            raise ValueError(f"{key}={value!r} is not supported by lora_lab; use PEFT for it")
    init = config.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in INIT_CHOICES):
        raise ValueError(
            f"init_lora_weights={init!r} in {str(config_file)!r} is not supported by lora_lab "
            f"(it knows {list(INIT_CHOICES)}); use PEFT for it"
        )
    return config


def _check_file(tensors, model, names, rank, weights_file, use_dora=False):
    """Every key used, every layer covered, every shape right: else raise before any change."""
    expected = {}
    for name in names:
        fan_in, fan_out = layer_features(model.get_submodule(name))
        expected[f"{PREFIX}{name}.lora_A.weight"] = (rank, fan_in)
        expected[f"{PREFIX}{name}.lora_B.weight"] = (fan_out, rank)
        if use_dora:
            expected[f"{PREFIX}{name}.lora_magnitude_vector"] = (fan_out,)
    unused = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unused:
        raise ValueError(f"{str(weights_file)!r} has keys that match no LoRA layer: {unused}")
    if missing:
        raise ValueError(f"{str(weights_file)!r} lacks the keys {missing}")
    for key, shape in expected.items():
        got = tuple(tensors[key].shape)
        if got != shape:
            raise ValueError(
                f"shape mismatch for {key!r}: the file has {got}, the model needs {shape}"
            )
        if not tensors[key].is_floating_point():
            raise ValueError(f"{key!r} has dtype {tensors[key].dtype}; expected a float tensor")


def _check_fan_in_fan_out(flag, model, names, path):
    """The file's ``fan_in_fan_out`` must describe the layers: True for Conv1D, else False."""
    if not isinstance(flag, bool):
        raise ValueError(f"fan_in_fan_out must be true or false, got {flag!r} in {str(path)!r}")
    for name in names:
        conv = is_conv1d(model.get_submodule(name))
        if conv != flag:
            kind = "a transformers Conv1D (weight stored (in, out))" if conv else "an nn.Linear"
            raise ValueError(
                f"{str(path)!r}/{CONFIG_NAME} says fan_in_fan_out={flag}, but {name!r} is {kind}; "
                f"this adapter was made for a model with other layer types"
            )


def _read_weights(weights_file):
    """The tensors of an adapter file, checked: readable, finite, and intact."""
    tensors, metadata = read_safetensors(weights_file)
    if SHA_KEY in metadata and metadata[SHA_KEY] != _digest(tensors):
        raise ValueError(
            f"{str(weights_file)!r} is damaged: its tensors no longer match the SHA-256 "
            "lora_lab recorded when it saved them (flipped bits or an edited file)"
        )
    return tensors, metadata


def _check_base(metadata, model, weights_file):
    """Where lora_lab recorded the base model's size, the model must have the same."""
    if BASE_KEY in metadata and metadata[BASE_KEY] != _base_fingerprint(model):
        raise ValueError(
            f"{str(weights_file)!r} was saved on a base model with {metadata[BASE_KEY]}; "
            f"this model has {_base_fingerprint(model)}: load it into the model it was made for"
        )


def load_adapter(model, path):
    """Inject the adapter at ``path`` (lora_lab's or PEFT's) into ``model`` and load it strictly.

    Rank, alpha, dropout, rsLoRA and target modules come from ``adapter_config.json``. Every
    tensor in the file must fill a LoRA weight of the right shape and every LoRA weight must
    be filled; otherwise nothing in ``model`` changes. Weights are cast to the model's dtype
    and device. The LoRA weights stay trainable, as after ``apply_lora``. Returns ``model``.
    """
    if lora_layers(model):
        raise ValueError(
            f"model already has LoRA layers ({sorted(lora_layers(model))[:4]}...); "
            "load an adapter into a model without LoRA"
        )
    config = read_adapter_config(path)
    _, weights_file = _adapter_files(path)
    rank, alpha = config["r"], config["lora_alpha"]
    dropout, use_rslora = config.get("lora_dropout", 0.0), config.get("use_rslora", False)
    targets, use_dora = config["target_modules"], config.get("use_dora", False) or False
    variant = {"use_dora": use_dora, "init_lora_weights": config.get("init_lora_weights", True)}
    if variant["init_lora_weights"] == "loftq":
        variant["loftq_config"] = config.get("loftq_config") or None
    try:
        check_hyperparameters(rank, alpha, dropout, use_rslora)
        check_variant(**variant)
        names = find_target_modules(model, targets)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{err} (read from {str(path)!r}/{CONFIG_NAME})") from None
    _check_fan_in_fan_out(config.get("fan_in_fan_out", False), model, names, path)
    tensors, metadata = _read_weights(weights_file)
    _check_file(tensors, model, names, rank, weights_file, use_dora)
    _check_base(metadata, model, weights_file)

    # PiSSA and LoftQ first move part of the base weight into A and B, as when they were made
    apply_lora(model, rank, alpha, targets, dropout, use_rslora, **variant)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_A.weight.copy_(tensors[f"{PREFIX}{name}.lora_A.weight"])
            layer.lora_B.weight.copy_(tensors[f"{PREFIX}{name}.lora_B.weight"])
            if use_dora:
                layer.lora_magnitude_vector.copy_(tensors[f"{PREFIX}{name}.lora_magnitude_vector"])
    return model
