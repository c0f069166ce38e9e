"""Relaxed sharing: each member computes its kernel from the shared one plus a small delta.

Hard sharing forces every member onto one kernel. A relaxation gives each member a few
parameters of its own, applied with `torch.nn.utils.parametrize` so the module keeps its
class, name and `weight` attribute and the shared kernel stays a single `nn.Parameter`:

- `scale`: one factor per output channel, `W_m = s_m ⊙ W` (per slice of the kernel's first
  dimension: for a transposed convolution, whose kernel is in × out/groups × k, that is per
  input channel);
- `lora:R`: a rank-R delta, `W_m = W + A_m B_m` (A: out × R, B: R × in·k·k);
- `scale+lora:R`: both;
- `lora:auto` (and `scale+lora:auto`): a budget plan gives each member its own rank, spending
  what the budget leaves after the shared kernels where it removes the most error.

When tying a trained model, each member's delta starts from its own original kernel: the
scale is the least-squares factor per output channel, and the low-rank delta the truncated
SVD of what the scaled shared kernel still misses (the relaxed-recursive recipe). `fold`
bakes every member's effective kernel into a plain convolution for runtimes that want
nothing but convolutions.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize

from kshare.errors import PlanError

if TYPE_CHECKING:  # plan.py imports graph.py, which imports this module
    from kshare.plan import Group, SharingPlan

RELAX_HELP = "none, scale, lora:R, scale+lora:R, or lora:auto / scale+lora:auto with a budget plan"


@dataclass(frozen=True)
class Relaxation:
    """Which per-member parameters sit on top of a shared kernel."""

    scale: bool = False
    rank: int = 0
    auto: bool = False  # ranks per member, chosen by a budget plan (`Group.ranks`)

    @classmethod
    def parse(cls, spec: str | None) -> Relaxation:
        if spec in (None, "", "none"):
            return cls()
        scale, rank, auto = False, 0, False
        for token in str(spec).split("+"):
            if token == "scale" and not scale:
                scale = True
            elif token == "lora:auto" and not (rank or auto):
                auto = True
            elif (m := re.fullmatch(r"lora:(\d+)", token)) and not (rank or auto):
                rank = int(m.group(1))
                if rank < 1:
                    raise PlanError(f"lora rank must be at least 1 in {spec!r}")
            else:
                raise PlanError(f"bad relaxation {spec!r}: expected {RELAX_HELP}")
        return cls(scale, rank, auto)

    @property
    def name(self) -> str:
        lora = "lora:auto" if self.auto else f"lora:{self.rank}" if self.rank else ""
        return "+".join(p for p in ("scale" if self.scale else "", lora) if p) or "none"

    @property
    def active(self) -> bool:
        return self.scale or self.rank > 0 or self.auto

    def rank_for(self, weight_shape: Sequence[int]) -> int:
        """The rank a member of this shape gets: no more than its kernel matrix has."""
        return min(self.rank, weight_shape[0], _fan_in(weight_shape))

    def params_per_member(self, weight_shape: Sequence[int], rank: int | None = None) -> int:
        """Parameters one member adds; `rank` overrides the relaxation's (a `lora:auto` member's own)."""
        out, fan_in = weight_shape[0], _fan_in(weight_shape)
        rank = self.rank_for(weight_shape) if rank is None else rank
        return (out if self.scale else 0) + rank * (out + fan_in)

    def member_ranks(self, group: Group) -> tuple[int, ...]:
        """The LoRA rank of each member of `group` under this relaxation."""
        if not self.auto:
            return (self.rank_for(group.signature.weight_shape),) * len(group.members)
        if len(group.ranks) != len(group.members):
            raise PlanError(f"{self.name} takes its ranks from a budget plan (policy budget:F), and plan group "
                            f"{group.name} records none: plan with a budget, or name a rank (lora:R)")
        return group.ranks


def with_relaxation(plan: SharingPlan, relaxation: Relaxation) -> SharingPlan:
    """`plan` counting `relaxation` (and no other) in its totals: the one place these figures move.

    Per-member ranks stay in the groups only under `lora:auto`, the relaxation they were chosen for."""
    extra = sum(relaxation.params_per_member(g.signature.weight_shape, rank)
                for g in plan.groups for rank in relaxation.member_ranks(g))
    groups = plan.groups if relaxation.auto else tuple(dataclasses.replace(g, ranks=()) for g in plan.groups)
    change = extra - plan.relax_params
    if change == 0 and plan.relax == relaxation.name and groups == plan.groups:
        return plan
    itemsize = plan.groups[0].signature.itemsize if plan.groups else 0
    t = plan.totals
    totals = dataclasses.replace(
        t, params_after=t.params_after + change, param_bytes_after=t.param_bytes_after + change * itemsize,
        conv_params_after=t.conv_params_after + change)
    return dataclasses.replace(plan, relax=relaxation.name, relax_params=extra, groups=groups, totals=totals)


def _fan_in(shape: Sequence[int]) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


class MemberDelta(nn.Module):
    """The parametrization: shared kernel in, this member's kernel out."""

    def __init__(self, weight_shape: Sequence[int], scale: bool, rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        out, fan_in = weight_shape[0], _fan_in(weight_shape)
        self.scale = nn.Parameter(torch.ones(out, dtype=dtype, device=device)) if scale else None
        if rank:
            self.lora_a = nn.Parameter(torch.zeros(out, rank, dtype=dtype, device=device))
            self.lora_b = nn.Parameter(torch.zeros(rank, fan_in, dtype=dtype, device=device))
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
            u, s, vh = torch.linalg.svd(residual, full_matrices=False)
            rank = self.lora_a.shape[1]
            root = s[:rank].sqrt()
            self.lora_a.copy_((u[:, :rank] * root).to(self.lora_a.dtype))
            self.lora_b.copy_((root[:, None] * vh[:rank]).to(self.lora_b.dtype))


def fit_residual(shared: torch.Tensor, original: torch.Tensor, scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares scale per output channel (ones unless `scale`) and what the scaled shared
    kernel still misses of `original`, as an out × fan-in float64 matrix: the low-rank delta's target."""
    w, target = shared.detach().double().flatten(1), original.detach().double().flatten(1)
    factor = (w * target).sum(1) / w.square().sum(1).clamp_min(1e-12) if scale else torch.ones_like(w[:, 0])
    return factor, target - w * factor[:, None]


def shared_kernel(conv: nn.Module) -> torch.Tensor:
    """The tensor a member's kernel is stored as: the shared original under a relaxation."""
    if parametrize.is_parametrized(conv, "weight"):
        return conv.parametrizations.weight.original
    return conv.weight


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
    return any(parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], MemberDelta)
               for m in model.modules())


def fold(model: nn.Module) -> nn.Module:
    """Bake every member's kernel into a plain convolution (in place): no parametrizations, no
    sharing, the same outputs. For runtimes that take only convolutions; the file grows."""
    from kshare.surgery import forget_plan, plan_of

    plan = plan_of(model)
    if plan is None:
        raise PlanError("model is not tied by kshare: nothing to fold")
    modules = dict(model.named_modules())
    members = [modules[name] for group in plan.groups for name in group.members]
    with torch.no_grad():  # every effective kernel first: removing one parametrization must not move the others
        kernels = [conv.weight.detach().clone() for conv in members]
    for conv, kernel in zip(members, kernels, strict=True):
        trainable = shared_kernel(conv).requires_grad
        if parametrize.is_parametrized(conv, "weight"):
            # leave_parametrized=True would write this member's kernel into the shared tensor
            parametrize.remove_parametrizations(conv, "weight", leave_parametrized=False)
        conv.weight = nn.Parameter(kernel, requires_grad=trainable)
        if conv.bias is not None:
            conv.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad)
    forget_plan(model)
    return model
