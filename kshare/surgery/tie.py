"""Apply a plan: make each sharing group's members alias one `nn.Parameter`, and back.

Aliasing (`conv_b.weight = conv_a.weight`) keeps the user's class, methods and hooks, adds
no FLOPs, and lets autograd sum the gradients of every use into the one leaf, which is what
the paper trains. `model.parameters()` yields the shared tensor once, so optimisers and
counts are right. Create the optimiser after tying.

This layer only applies plans: it reads the plan data and nothing else of planning. Choosing
a plan from a policy is the API's job (`kshare.tie`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from kshare.errors import PlanError
from kshare.kernels import FITTED, INITS, initial_kernel, medoid_index, shared_kernel
from kshare.planning.plan import Group, SharingPlan, with_relaxation
from kshare.planning.relaxation import Relaxation
from kshare.surgery.relax import is_relaxed, relax_member

_PLAN_ATTR = "_kshare_plan"


def plan_of(model: nn.Module) -> SharingPlan | None:
    """The plan applied to `model`, or None if kshare has not tied it."""
    return getattr(model, _PLAN_ATTR, None)


Kernels = Mapping[str, tuple[torch.Tensor, torch.Tensor | None]]  # group name → (shared weight, shared bias)


def _tie_group(modules: dict[str, nn.Module], group: Group, share_bias: bool,
               given: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> None:
    convs = [modules[m] for m in group.members]
    weights = [c.weight for c in convs]
    init = "mean" if group.init == FITTED and given is None else group.init  # a fitted plan's state comes after
    medoid = medoid_index(torch.stack([w.detach() for w in weights])) if init == "medoid" else 0
    start = given[0] if given is not None else initial_kernel(weights, init, medoid)
    weight = nn.Parameter(start.detach().to(weights[0].dtype).to(weights[0].device).reshape(weights[0].shape).clone(),
                          requires_grad=weights[0].requires_grad)
    for conv in convs:
        conv.weight = weight
    biases = [c.bias for c in convs if c.bias is not None]
    if share_bias and len(biases) == len(convs):
        fitted = given[1] if given is not None else None
        value = fitted if fitted is not None else initial_kernel(biases, "mean" if init == FITTED else init, medoid)
        bias = nn.Parameter(value.detach().to(biases[0].dtype).to(biases[0].device).clone(),
                            requires_grad=biases[0].requires_grad)
        for conv in convs:
            conv.bias = bias


def with_init(plan: SharingPlan, init: str | None) -> SharingPlan:
    """`plan` with every group's init set to `init` (None: each group keeps its own)."""
    if init is None:
        return plan
    if init not in INITS:
        raise PlanError(f"unknown init {init!r}: expected one of {', '.join(INITS)}")
    return dataclasses.replace(plan, groups=tuple(dataclasses.replace(g, init=init) for g in plan.groups))


def apply_plan(model: nn.Module, plan: SharingPlan, *, init: str | None = None,
               relax: str | Relaxation | None = None, kernels: Kernels | None = None) -> nn.Module:
    """Tie `model` in place by `plan` and return it.

    `init` overrides each group's recorded init (`first`, `mean`, `medoid`, `norm_mean`; see
    `kshare.kernels.initial_kernel`); `relax` overrides the plan's relaxation (None: the
    plan's own). Each relaxed member's delta is fitted to its kernel before tying. `kernels`
    gives groups their shared kernel (and bias) outright, e.g. fitted to data. The plan, with
    the relaxation applied counted in its totals, is attached (`plan_of(model)`); tying a tied
    model is refused: `untie` first.
    """
    if plan_of(model) is not None:
        raise PlanError("model is already tied by kshare: call kshare.untie(model) before tying it again")
    plan.validate(model)
    plan = with_init(plan, init)
    for group in plan.groups:
        if group.init not in (*INITS, FITTED):
            raise PlanError(f"plan group {group.name} has unknown init {group.init!r}")
    relaxation = Relaxation.parse(relax if relax is not None else plan.relax)
    ranks = {g.name: g.ranks_under(relaxation) for g in plan.groups}  # before any change: it may refuse the plan
    modules = dict(model.named_modules())
    for group in plan.groups:
        originals = [modules[m].weight.detach().clone() for m in group.members] if relaxation.active else []
        _tie_group(modules, group, plan.share_bias, (kernels or {}).get(group.name))
        for name, original, rank in zip(group.members, originals, ranks[group.name], strict=False):
            relax_member(modules[name], relaxation.scale, rank, original)  # `originals` is empty unless relaxed
    # a ready plan may count another relaxation (or none): count the one applied
    object.__setattr__(model, _PLAN_ATTR, with_relaxation(plan, relaxation))
    return model


def forget_plan(model: nn.Module) -> None:
    """Detach the plan (after `untie` or `fold`: the model no longer shares)."""
    object.__delattr__(model, _PLAN_ATTR)


def untie(model: nn.Module) -> nn.Module:
    """Give every member of every tied group its own copy of the shared tensors, in place."""
    plan = plan_of(model)
    if plan is None:
        raise PlanError("model is not tied by kshare: nothing to untie")
    if is_relaxed(model):
        raise PlanError("model is relaxed: kshare.fold(model) gives every member its own kernel")
    modules = dict(model.named_modules())
    for group in plan.groups:
        for name in group.members:
            conv = modules[name]
            conv.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=conv.weight.requires_grad)
            if conv.bias is not None:
                conv.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad)
    forget_plan(model)
    return model


def verify_tied(model: nn.Module) -> None:
    """Raise `PlanError` if a group of the attached plan no longer aliases one tensor.

    Catches what silently unties a model: `load_state_dict(..., assign=True)`, replacing a
    conv's weight, or a wrapper that copies parameters.
    """
    plan = plan_of(model)
    if plan is None:
        return
    modules = dict(model.named_modules())
    for group in plan.groups:
        convs = [modules.get(m) for m in group.members]
        if any(c is None for c in convs):
            raise PlanError(f"group {group.name}: a member module is gone from the model")
        first = convs[0]
        for conv in convs[1:]:
            if shared_kernel(conv) is not shared_kernel(first) or (plan.share_bias and conv.bias is not first.bias):
                raise PlanError(f"group {group.name} is no longer tied: its members hold separate tensors")
