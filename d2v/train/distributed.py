"""torchrun in a few functions: initialise from the launcher's environment, ask who we are, gather, tidy up."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str = "auto", where: str = "device") -> World:
    """This process's device, and under torchrun (WORLD_SIZE > 1) the process group joined: NCCL on GPUs, gloo on
    CPU. A rank takes the GPU of its local rank; one process the device named (`cuda:1`), or GPU 0 for `cuda`."""
    size = launched_size()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, where)
    use_cuda = dev.type == "cuda"
    if use_cuda and (size > 1 or dev.index is None):
        dev = torch.device(f"cuda:{local_rank}")
    elif size > 1:
        dev = torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(rank, size, local_rank, dev)


def resolve_device(name: str, where: str = "device") -> torch.device:
    """A config's device: `auto` is CUDA where torch sees one, else the CPU; CUDA asked for without one is an error
    naming `where`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"{where}: {name!r} asked for, but torch sees no CUDA device")
    return torch.device(name)


def ddp(module: torch.nn.Module, device: torch.device, find_unused_parameters: bool) -> torch.nn.Module:
    """DDP around `module`, pinned to its GPU on CUDA (gloo on CPU takes no device ids)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def any_rank(flag: bool, world: World) -> bool:
    """Whether `flag` is true on any rank (one all-reduce), so that every rank can stop when one has failed."""
    if not world.distributed:
        return flag
    t = torch.tensor([int(flag)], device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(values: dict[str, float], world: World) -> dict[str, float]:
    """Average scalar metrics over ranks with one all-reduce."""
    if not world.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / world.size).tolist()))


def gather_lists(items: list, world: World) -> list:
    """Every rank's list, concatenated in rank order, on every rank (a no-op in one process)."""
    if not world.distributed:
        return items
    parts: list[list | None] = [None] * world.size
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def gather_to_main(items: list, world: World) -> list | None:
    """Every rank's list, concatenated in rank order, on rank 0 only (None on the others; `items` in one process):
    for outputs only the first rank scores, such as CTC logits, which the other ranks need not hold as well."""
    if not world.distributed:
        return items
    parts: list[list | None] | None = [None] * world.size if world.is_main else None
    dist.gather_object(items, parts, dst=0)
    return [x for part in parts for x in part] if parts is not None else None


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
