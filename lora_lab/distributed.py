"""One training run on several processes: torchrun's environment, the process group, and a
LoRA model wrapped for DDP (a full replica per rank) or FSDP2 (the parameters sharded).

``torchrun --nproc_per_node=N`` starts N copies of a script and tells each its place in the
environment variables ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; ``world_from_env`` reads
them. The ranks talk through gloo on the CPU and NCCL on CUDA GPUs.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .validate import bad_choice, int_at_least, int_between

STRATEGIES = ("none", "ddp", "fsdp")  # one process; replicas (DDP); shards (FSDP2)
ENV_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun sets for every process


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among ``world_size`` ranks, and its rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # True when a launcher (torchrun, accelerate) set the variables

    def __post_init__(self):
        int_at_least("world_size", self.world_size)
        int_between("rank", self.rank, 0, self.world_size - 1, what="world_size - 1")
        int_at_least("local_rank", self.local_rank, minimum=0)

    @property
    def is_main(self):
        return self.rank == 0


def world_from_env(environ=None):
    """The ``World`` torchrun describes in ``environ`` (default ``os.environ``); one process if unset."""
    environ = os.environ if environ is None else environ
    present = [name for name in ENV_NAMES if name in environ]
    if not present:
        return World()
    if len(present) < len(ENV_NAMES):
        missing = [name for name in ENV_NAMES if name not in environ]
        raise ValueError(
            f"the environment sets {present} but not {missing}: start the processes with "
            "torchrun (or accelerate launch), which sets all three"
        )
    values = {}
    for name in ENV_NAMES:
        try:
            values[name] = int(environ[name])
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {environ[name]!r}") from None
    return World(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], launched=True)


def device_for(world):
    """The device this rank computes on: its own GPU (cuda:LOCAL_RANK) if there are GPUs, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def start(world, device):
    """Join the process group of a launched run: NCCL between GPUs, gloo on the CPU."""
    if not world.launched or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.world_size)


def stop():
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- wrapping


def blocks(model):
    """The transformer blocks of ``model``: its largest ``nn.ModuleList`` (FSDP's wrap units)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"model ({type(model).__name__}) has no nn.ModuleList of blocks to shard")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def wrap(model, strategy, device, world_size):
    """``model`` ready for ``strategy``: itself, in DDP, or sharded in place by FSDP2."""
    if strategy not in STRATEGIES:
        raise bad_choice("strategy", strategy, STRATEGIES)
    if strategy == "none":
        return model
    if strategy == "ddp":
        return _ddp(model, device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    for block in blocks(model):  # one all-gather per block in forward and backward
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)  # the rest: embeddings, final norm, output head


def _ddp(model, device):
    """DDP over ``model``; its frozen buffers (rotary tables, 4-bit codes) are equal on every rank
    from the start, so they are not re-sent before each forward pass."""
    import inspect

    ddp = nn.parallel.DistributedDataParallel
    ids = [device.index] if device.type == "cuda" else None
    newer = "forward_sync_buffers" in inspect.signature(ddp).parameters  # torch >= 2.12
    no_sync = {"forward_sync_buffers" if newer else "broadcast_buffers": False}
    return ddp(model, device_ids=ids, **no_sync)


def unwrap(model):
    """The model inside a DDP wrapper (FSDP2 keeps the model's own class and names)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _local(tensor):
    """The part of ``tensor`` this rank stores: its shard for a DTensor, else all of it."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def local_param_bytes(model):
    """``(all, trainable)`` bytes of the parameters this rank stores (its shards under FSDP)."""
    params = list(model.parameters())
    total = sum(_local(p).nbytes for p in params)
    return total, sum(_local(p).nbytes for p in params if p.requires_grad)


def gather_trainable(model):
    """``{name: full tensor on the CPU}`` of the trainable parameters; every rank must call it."""
    out = {}
    for name, param in unwrap(model).named_parameters():
        if param.requires_grad:
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            out[name] = full.detach().to("cpu").clone()
    return out


def all_sum(value, device):
    """The sum of a float over all ranks (the value itself in one process)."""
    if not dist.is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def same_on_all(obj):
    """Rank 0's ``obj`` on every rank (a picklable object; one process: ``obj``)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier():
    """Wait until every rank gets here (nothing in one process)."""
    if dist.is_initialized():
        dist.barrier()
