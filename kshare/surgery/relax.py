"""Relaxed members: each computes its kernel from the shared one plus a small delta.

A `MemberDelta` parametrization (`torch.nn.utils.parametrize`) sits on a tied member's
`weight`, so the module keeps its class, name and `weight` attribute and the shared kernel
stays a single `nn.Parameter` (each member's `parametrizations.weight.original`). What a
relaxation is and costs is plan data (`kshare.planning.relaxation`); this is the mechanism.

When tying a trained model, each member's delta starts from its own original kernel: the
scale is the least-squares factor per output channel, and the low-rank delta the truncated
SVD of what the scaled shared kernel still misses (the relaxed-recursive recipe).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from kshare.kernels import fan_in, fit_residual, lowrank_factors


class MemberDelta(nn.Module):
    """The parametrization: shared kernel in, this member's kernel out."""

    def __init__(self, weight_shape: Sequence[int], scale: bool, rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        out, width = weight_shape[0], fan_in(weight_shape)
        self.scale = nn.Parameter(torch.ones(out, dtype=dtype, device=device)) if scale else None
        if rank:
            self.lora_a = nn.Parameter(torch.zeros(out, rank, dtype=dtype, device=device))
            self.lora_b = nn.Parameter(torch.zeros(rank, width, dtype=dtype, device=device))
        else:
            self.lora_a = self.lora_b = None

    def forward(self, shared: torch.Tensor) -> torch.Tensor:
        weight = shared
        if self.scale is not None:
            weight = weight * self.scale.view(-1, *([1] * (shared.ndim - 1)))
        if self.lora_a is not None and self.lora_b is not None:
            weight = weight + (self.lora_a @ self.lora_b).view_as(shared)
        return weight

    @torch.no_grad()
    def fit(self, shared: torch.Tensor, original: torch.Tensor) -> None:
        """Start from the member's own kernel: least-squares scales, then SVD of the residual."""
        scale, residual = fit_residual(shared, original, self.scale is not None)
        if self.scale is not None:
            self.scale.copy_(scale.to(self.scale.dtype))
        if self.lora_a is not None and self.lora_b is not None:
            a, b = lowrank_factors(residual, self.lora_a.shape[1])
            self.lora_a.copy_(a.to(self.lora_a.dtype))
            self.lora_b.copy_(b.to(self.lora_b.dtype))


def relax_member(conv: nn.Module, scale: bool, rank: int, original: torch.Tensor | None = None) -> None:
    """Give one tied member a scale and/or a rank-`rank` delta (none of either: left plainly tied);
    fit them to `original` (its kernel before tying) if given."""
    if not (scale or rank):
        return
    shared = conv.weight
    delta = MemberDelta(shared.shape, scale, rank, shared.dtype, shared.device)
    if original is not None:
        delta.fit(shared, original)
    parametrize.register_parametrization(conv, "weight", delta, unsafe=True)


def is_relaxed(model: nn.Module) -> bool:
    """Whether any convolution of `model` computes its kernel through a `MemberDelta`."""
    return any(parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], MemberDelta)
               for m in model.modules())


@torch.no_grad()
def set_member_delta(conv: nn.Module, scale: torch.Tensor | None, lora: tuple[torch.Tensor, torch.Tensor] | None
                     ) -> None:
    """Overwrite a relaxed member's delta with values fitted elsewhere (e.g. to data); a part the
    member lacks, or None, is left as it is."""
    if not parametrize.is_parametrized(conv, "weight"):
        return
    delta = conv.parametrizations.weight[0]
    if not isinstance(delta, MemberDelta):
        return
    if scale is not None and delta.scale is not None:
        delta.scale.copy_(scale.reshape(delta.scale.shape).to(delta.scale.dtype))
    if lora is not None and delta.lora_a is not None and delta.lora_b is not None:
        delta.lora_a.copy_(lora[0].reshape(delta.lora_a.shape).to(delta.lora_a.dtype))
        delta.lora_b.copy_(lora[1].reshape(delta.lora_b.shape).to(delta.lora_b.dtype))
