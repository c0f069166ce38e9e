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
FITTED = "data"  # a group whose shared kernel was fitted to calibration data (kshare.fit.order)


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


# --- fits to data: each member's outputs on real inputs, not its weights -------------------------
#
# A member's kernel in matrix form is G blocks (its conv groups) of out/G rows by F columns
# (F = in/G times the kernel's positions); `X` holds its input patches as columns, so its outputs
# are W X. Statistics arrive as sums over calibration patches: H = Σ x xᵀ (G × F × F) of the
# inputs a member sees now, and C = Σ x xᵀ̃ of the untied network's inputs against them (C = H
# when the two are the same). Sums and products are float32; solves are float64.


def blocks(kernel: torch.Tensor, groups: int) -> torch.Tensor:
    """A conv kernel (out, in/G, *k) as G blocks of rows: (G, out/G, F), float32."""
    return kernel.detach().float().reshape(groups, kernel.shape[0] // groups, -1)


def damped(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """`gram` in float64 plus `damp` times its mean diagonal on the diagonal, per block (GPTQ's
    dampening): positive definite even where a calibration set leaves directions unseen."""
    gram = gram.double()
    diag = gram.diagonal(dim1=-2, dim2=-1)
    scale = diag.mean(-1).clamp_min(1e-12) * damp
    return gram + torch.diag_embed(scale[:, None].expand_as(diag))


def solve_right(a: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """A B⁻¹ in float64 for symmetric positive definite blocks B (Cholesky; least squares if that fails)."""
    a = a.double()
    try:
        factor = torch.linalg.cholesky(gram)
        return torch.cholesky_solve(a.transpose(-2, -1), factor).transpose(-2, -1)
    except RuntimeError:  # not positive definite in float64: the least-squares solution instead
        return torch.linalg.lstsq(gram, a.transpose(-2, -1)).solution.transpose(-2, -1)


def shared_fit(pulls: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], weights: Sequence[float],
               prior: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The kernel W (G, O, F) that minimises Σ_i a_i ‖W X̃_i − W_i X_i‖² + λ‖W − W₀‖²: every member's
    outputs at once, W = (Σ a_i W_i C_i + λ W₀)(Σ a_i H_i + λI)⁻¹, from each member's `pulls`
    W_i C_i (C_i = Σ x_i x̃_iᵀ), `grams` H_i = Σ x̃_i x̃_iᵀ and `weights` a_i. λ is `damp` times
    the mean diagonal; where the calibration inputs leave a direction unseen, the fit keeps the
    `prior` W₀ (the members' mean) there instead of shrinking it to zero."""
    a = sum(w * p.double() for w, p in zip(weights, pulls, strict=True))
    b = sum(w * g.double() for w, g in zip(weights, grams, strict=True))
    full = damped(b, damp)  # type: ignore[arg-type]
    ridge = (full - b).diagonal(dim1=-2, dim2=-1)  # λ per block
    return solve_right(a + ridge[:, None, :] * prior.double(), full)  # type: ignore[operator]


def output_error(kernel: torch.Tensor, pull: torch.Tensor, gram: torch.Tensor, energy: float) -> float:
    """‖W X̃ − W_i X‖² from the sums: tr(W H Wᵀ) − 2 tr(W_i C Wᵀ) + ‖W_i X‖² (`energy`), with
    `pull` = W_i C."""
    kernel = kernel.to(gram.dtype)
    fitted = float((kernel @ gram * kernel).double().sum())
    mixed = float((pull.to(gram.dtype) * kernel).double().sum())
    return max(fitted - 2 * mixed + energy, 0.0)


def scale_fit(kernel: torch.Tensor, pull: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per output row, the factor s minimising ‖s w X̃ − w_i X‖²: s = w_i C wᵀ / w H wᵀ (G, O),
    with `pull` = W_i C."""
    kernel = kernel.double()
    top = (pull.double() * kernel).sum(-1)
    bottom = (kernel @ gram.double() * kernel).sum(-1)
    return top / bottom.clamp_min(1e-30)


def whitened_lowrank(residual_target: torch.Tensor, gram: torch.Tensor, rank: int, damp: float = 0.01
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-`rank` delta D (as factors A, B per block) minimising ‖D X̃ − T‖², given the full
    least-squares delta E = T X̃ᵀ (X̃ X̃ᵀ)⁻¹ as `residual_target` (G, O, F) and H = X̃ X̃ᵀ: the
    truncated SVD of E L in the whitened space (H = L Lᵀ), mapped back by L⁻¹. Each rank goes
    where outputs change most, not where weights do."""
    factor = torch.linalg.cholesky(damped(gram, damp))
    u, s, vh = torch.linalg.svd(residual_target.double() @ factor, full_matrices=False)
    root = s[..., :rank].sqrt()
    a = u[..., :rank] * root[..., None, :]
    b_white = root[..., :, None] * vh[..., :rank, :]
    b = torch.linalg.solve_triangular(factor, b_white, upper=False, left=False)  # B = B̃ L⁻¹
    return a, b


def whitened_spectrum(residual_target: torch.Tensor, gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The squared singular values of E L, largest first: the output error each further rank of a
    delta removes (what a `lora:auto` allocation by output error spends its budget on)."""
    factor = torch.linalg.cholesky(damped(gram, damp))
    values = torch.linalg.svdvals(residual_target.double() @ factor).square()
    return values.flatten().sort(descending=True).values
