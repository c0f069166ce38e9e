"""Weight-space reconstruction error: how far a group's shared kernel is from its members'.

Relative squared error, ‖members − shared‖² / ‖members‖², over kernels (and biases when they
are shared). Budget plans minimise it; every plan reports it per group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from kshare.analysis.inspect import Inspection
from kshare.kernels import blocks, damped, initial_kernel, medoid_index
from kshare.planning.plan import Group, SharingPlan


def kernel_vector(module: nn.Module, share_bias: bool) -> torch.Tensor:
    """A conv's kernel (and bias, if shared) as one float64 vector."""
    parts = [module.weight.detach().double().flatten()]
    if share_bias and module.bias is not None:
        parts.append(module.bias.detach().double().flatten())
    return torch.cat(parts)


def group_error(model: nn.Module, group: Group, share_bias: bool) -> float:
    """Relative squared error of replacing each member's kernel (and bias) by the group's init."""
    modules = dict(model.named_modules())
    convs = [modules[m] for m in group.members]
    weights = [c.weight.detach() for c in convs]
    medoid = medoid_index(torch.stack(weights)) if group.init == "medoid" else 0
    tensors = [weights]
    if share_bias and all(c.bias is not None for c in convs):
        tensors.append([c.bias.detach() for c in convs])
    sse = norm = 0.0
    for members in tensors:
        centre = initial_kernel(members, group.init, medoid).double()
        sse += sum(float((m.double() - centre).square().sum()) for m in members)
        norm += sum(float(m.double().square().sum()) for m in members)
    return sse / max(norm, 1e-30)


def with_errors(model: nn.Module, plan: SharingPlan) -> SharingPlan:
    """The plan with each group's relative reconstruction error filled in (for its init)."""
    groups = tuple(dataclasses.replace(g, error=group_error(model, g, plan.share_bias)) for g in plan.groups)
    return dataclasses.replace(plan, groups=groups)


def kernel_norm(modules: dict[str, nn.Module], inspection: Inspection, share_bias: bool) -> float:
    """Squared norm of every conv kernel (and bias, if shared): what relative errors divide by."""
    return sum(float(kernel_vector(modules[s.name], share_bias).square().sum()) for s in inspection.sites)


def total_error(model: nn.Module, plan: SharingPlan, inspection: Inspection) -> float:
    """Squared reconstruction error of all groups over the squared norm of all conv kernels."""
    modules = dict(model.named_modules())
    norm = kernel_norm(modules, inspection, plan.share_bias)
    sse = 0.0
    for group in plan.groups:
        sse += group_error(model, group, plan.share_bias) * sum(
            float(kernel_vector(modules[m], plan.share_bias).square().sum()) for m in group.members)
    return sse / max(norm, 1e-30)


def output_vectors(weights: Sequence[torch.Tensor], stats: Sequence[tuple[torch.Tensor, float]],
                   damp: float = 0.01) -> torch.Tensor:
    """Isomorphic kernels as vectors whose squared distances are relative output errors: each
    kernel's blocks times L, with L Lᵀ the members' pooled input Gram (each member's divided by
    its output energy, so every member counts by its relative error). Clustering these groups
    the kernels that compute alike on real inputs, not the ones that look alike."""
    pooled = sum(gram.double() / max(energy, 1e-30) for gram, energy in stats) / len(stats)
    factor = torch.linalg.cholesky(damped(pooled, damp))  # type: ignore[arg-type]
    groups = pooled.shape[0]  # type: ignore[union-attr]
    return torch.stack([(blocks(w, groups).double() @ factor).flatten() for w in weights])
