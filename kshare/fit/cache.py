"""Where the sequential fit keeps a stream's activations at a cut, batch by batch, within a
memory budget: float32 in memory when the caches fit, else float16 in memory, else float16 in
memory-mapped files of a temporary folder (removed when the fit ends). Float16 keeps about 3
decimal digits; a batch that would overflow it is kept in float32 instead."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

LIVE_CACHES = 4  # two streams (untied, partially tied), each at the cut it leaves and the one it reaches


@dataclass(frozen=True)
class Storage:
    """How every cache of one fit is kept: `place` "memory" or "disk", and the `dtype`."""

    place: str
    dtype: torch.dtype

    def describe(self) -> str:
        kind = "float32" if self.dtype == torch.float32 else "float16"
        return f"in memory as {kind}" if self.place == "memory" else f"on disk as {kind} (memory-mapped)"


def choose_storage(largest_bytes: int, budget: int, live: int = LIVE_CACHES) -> Storage:
    """The most exact storage under which the `live` largest caches (each `largest_bytes` in
    float32) stay within `budget` bytes of memory."""
    if live * largest_bytes <= budget:
        return Storage("memory", torch.float32)
    if live * largest_bytes // 2 <= budget:
        return Storage("memory", torch.float16)
    return Storage("disk", torch.float16)


class ActivationCache:
    """One stream's activations at one cut: `put(i, x)` keeps batch i, `get(i)` gives it back as a
    fresh float32 tensor on the device and in the memory layout it came in."""

    def __init__(self, storage: Storage, folder: Path | None = None) -> None:
        self.storage, self.folder = storage, folder
        self.batches: dict[int, tuple[torch.Tensor, torch.device, bool]] = {}
        self.files: list[Path] = []

    def put(self, index: int, x: torch.Tensor, owned: bool = False) -> None:
        """Keep batch `index`; `owned`: nothing else holds `x`, so a float32 one is kept as it is."""
        layout = x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        kept = x.detach()
        if self.storage.dtype == torch.float16:
            half = kept.half()
            kept = half if bool(torch.isfinite(half).all()) or not bool(torch.isfinite(kept).all()) else kept.float()
        else:
            kept = kept.float()
        if self.storage.place == "disk":
            assert self.folder is not None
            kept = kept.cpu().contiguous()
            dtype = np.float16 if kept.dtype == torch.float16 else np.float32
            mapped = np.memmap(self.folder / f"{id(self)}-{index}.bin", dtype=dtype, mode="w+", shape=tuple(kept.shape))
            mapped[...] = kept.numpy()
            mapped.flush()
            kept = torch.from_numpy(mapped)
            self.files.append(self.folder / f"{id(self)}-{index}.bin")
        elif kept.data_ptr() == x.data_ptr() and not owned:  # copied: the network may change its own tensor
            kept = kept.clone()
        self.batches[index] = (kept, x.device, layout)

    def get(self, index: int) -> torch.Tensor:
        kept, device, layout = self.batches[index]
        x = kept.to(device=device, dtype=torch.float32, copy=True)
        return x.contiguous(memory_format=torch.channels_last) if layout else x

    def peek(self, index: int) -> torch.Tensor:
        """Batch `index` as float32, to read only: the kept tensor itself where it is one."""
        kept, device, _ = self.batches[index]
        if self.storage.place == "memory" and kept.dtype == torch.float32 and kept.device == device:
            return kept
        return self.get(index)

    def pop(self, index: int) -> torch.Tensor:
        """Batch `index` as `get` gives it, no longer kept."""
        x = self.peek(index)
        del self.batches[index]
        if self.storage.place == "disk":
            assert self.folder is not None
            (self.folder / f"{id(self)}-{index}.bin").unlink(missing_ok=True)
        return x

    def drop(self) -> None:
        self.batches.clear()
        for file in self.files:
            file.unlink(missing_ok=True)
        self.files.clear()


class CacheFolder:
    """The temporary folder of a fit's disk caches (None in memory), removed on exit."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.path: Path | None = None

    def __enter__(self) -> CacheFolder:
        if self.storage.place == "disk":
            self.path = Path(tempfile.mkdtemp(prefix="kshare-fit-cache-"))
        return self

    def __exit__(self, *_: object) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)

    def cache(self) -> ActivationCache:
        return ActivationCache(self.storage, self.path)
