"""Where a run executes: rank, world size and device, joined to torchrun's process group
when there is one; and how its samples are split into index batches."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kshare.errors import TrainingError, param


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: rank, world size, device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


DEVICE_HELP = "cpu, cuda (this process's GPU) or cuda:N"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device a run uses, always with an index on CUDA (`torch.cuda.set_device` needs one).

    None: this process's GPU when CUDA is available (`cuda:LOCAL_RANK` under torchrun), else the
    CPU. `cuda` is this process's GPU; `cuda:N` a given one, which must exist; under torchrun
    every process takes its own, so `cuda:N` is refused there."""
    text = str(device) if device is not None else None
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if text is None:
        text = "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = text.partition(":")
    if kind == "cpu" and not index:
        return torch.device("cpu")
    if kind != "cuda" or (index and not index.isdigit()):
        raise TrainingError(f"unknown device {text!r}: expected {DEVICE_HELP} ({param('device')})")
    if not torch.cuda.is_available():
        raise TrainingError(f"device {text!r} asked for, but CUDA is not available here: use "
                            f"{param('device', 'cpu')}")
    count = torch.cuda.device_count()
    if index and world > 1:
        raise TrainingError(f"under torchrun each process takes its own GPU (cuda:LOCAL_RANK): pass "
                            f"{param('device', 'cuda')}, not {text!r}")
    chosen = int(index) if index else local
    if chosen >= count:
        raise TrainingError(f"device cuda:{chosen} does not exist: this machine has {count} GPU(s)"
                            + (f" and LOCAL_RANK is {local}" if not index else ""))
    return torch.device("cuda", chosen)


def runtime(device: str | torch.device | None = None) -> Runtime:
    """Join the process group when started by torchrun; pick the device (`resolve_device`)."""
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return Runtime(rank, dist.get_world_size() if dist.is_initialized() else 1, dev)


def index_batches(n: int, batch_size: int, rt: Runtime, generator: torch.Generator | None,
                  every: bool = False, device: torch.device | None = None) -> Iterator[torch.Tensor]:
    """Index batches for this rank: a shuffled (or ordered) equal share of the n samples, without a
    lone last sample (BatchNorm cannot train on one). `every`: all n samples, shares as they fall
    (evaluation, where every image must count and ranks need not step together). `device`: where
    the indices live (the order is drawn on the CPU, so runs repeat on any device, and copied once)."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    if device is not None:
        order = order.to(device)
    end = n if every or rt.world == 1 else (n // rt.world) * rt.world
    share = order[rt.rank : end : rt.world]
    for start in range(0, len(share), batch_size):
        idx = share[start : start + batch_size]
        if every or len(idx) > 1 or len(share) == 1:
            yield idx


def all_sum(values: list[float], rt: Runtime) -> list[float]:
    """The sum of `values` over every rank (the values themselves in one process)."""
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
