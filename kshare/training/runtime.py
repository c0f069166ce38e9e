"""Where a run executes: rank, world size and device, joined to torchrun's process group
when there is one; and how its samples are split into index batches."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: rank, world size, device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def runtime(device: str | None = None) -> Runtime:
    """Join the process group when started by torchrun; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return Runtime(rank, dist.get_world_size() if dist.is_initialized() else 1, dev)


def index_batches(n: int, batch_size: int, rt: Runtime, generator: torch.Generator | None,
             every: bool = False) -> Iterator[torch.Tensor]:
    """Index batches for this rank: a shuffled (or ordered) equal share of the n samples, without a
    lone last sample (BatchNorm cannot train on one). `every`: all n samples, shares as they fall
    (evaluation, where every image must count and ranks need not step together)."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    end = n if every or rt.world == 1 else (n // rt.world) * rt.world
    share = order[rt.rank : end : rt.world]
    for start in range(0, len(share), batch_size):
        idx = share[start : start + batch_size]
        if every or len(idx) > 1 or len(share) == 1:
            yield idx


def all_sum(values: list[float], rt: Runtime) -> list[float]:
    if rt.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t.tolist()


def shutdown() -> None:
    """Leave the process group (torchrun) cleanly.

    DDP's reducer sits in reference cycles; if the garbage collector frees it only at
    interpreter exit, after the group is gone, gloo aborts the process. Collect first, then
    wait for every rank, then destroy.
    """
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
