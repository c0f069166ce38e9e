"""Shared-kernel arithmetic: how one kernel stands in for several, and what a member's delta
must make up. Pure tensor functions, used by analysis, planning and surgery alike.

- `shared_kernel`: the tensor a convolution's kernel is stored as (the shared original under
  a relaxation's parametrization);
- `initial_kernel`: a group's shared kernel from its members' (`first`, `mean`, `medoid`,
  `norm_mean`);
- `fit_residual` and `lowrank_factors`: the least-squares scale per output channel and the
  truncated SVD of what the scaled shared kernel still misses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

INITS = ("first", "mean", "medoid", "norm_mean")


def shared_kernel(conv: nn.Module) -> torch.Tensor:
    """The tensor a member's kernel is stored as: the shared original under a relaxation."""
    if parametrize.is_parametrized(conv, "weight"):
        return conv.parametrizations.weight.original
    return conv.weight


def fan_in(shape: Sequence[int]) -> int:
    """Elements per output channel of a kernel: the width of its matrix form."""
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def medoid_index(kernels: torch.Tensor) -> int:
    """Index of the member kernel closest (summed L2) to all the others."""
    flat = kernels.flatten(1).double()
    return int(torch.cdist(flat, flat).sum(1).argmin())


def initial_kernel(tensors: Sequence[torch.Tensor], init: str, medoid: int = 0) -> torch.Tensor:
    """The shared tensor a group starts from; `medoid` is `medoid_index`'s answer under `medoid`."""
    if init == "first":
        return tensors[0].detach().clone()
    if init == "medoid":
        return tensors[medoid].detach().clone()
    stacked = torch.stack([t.detach() for t in tensors]).double()
    mean = stacked.mean(0)
    if init == "norm_mean" and mean.ndim > 1:
        # Averaging kernels that point different ways shrinks them; give each output channel
        # of the mean the members' average norm for that channel, so activations keep their scale.
        dims = tuple(range(2, stacked.ndim))
        want = torch.linalg.vector_norm(stacked, dim=dims, keepdim=True).mean(0)
        have = torch.linalg.vector_norm(mean, dim=tuple(range(1, mean.ndim)), keepdim=True)
        mean = mean * want / have.clamp_min(1e-12)
    return mean.to(tensors[0].dtype)


def fit_residual(shared: torch.Tensor, original: torch.Tensor, scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares scale per output channel (ones unless `scale`) and what the scaled shared
    kernel still misses of `original`, as an out × fan-in float64 matrix: the low-rank delta's target."""
    w, target = shared.detach().double().flatten(1), original.detach().double().flatten(1)
    factor = (w * target).sum(1) / w.square().sum(1).clamp_min(1e-12) if scale else torch.ones_like(w[:, 0])
    return factor, target - w * factor[:, None]


def lowrank_factors(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with A @ B the best rank-`rank` approximation of `residual` (truncated SVD, the
    singular values split evenly between the factors)."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]
