"""`tie` and `untie`: make each sharing group's members alias one `nn.Parameter`, and back.

Aliasing (`conv_b.weight = conv_a.weight`) keeps the user's class, methods and hooks, adds
no FLOPs, and lets autograd sum the gradients of every use into the one leaf, which is what
the paper trains. `model.parameters()` yields the shared tensor once, so optimisers and
counts are right. Create the optimiser after tying.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from kshare.errors import PlanError
from kshare.plan import Group, SharingPlan
from kshare.policy import Policy
from kshare.relax import Relaxation, is_relaxed, relax_member, shared_kernel, with_relaxation

INITS = ("first", "mean", "medoid", "norm_mean")
_PLAN_ATTR = "_kshare_plan"


def plan_of(model: nn.Module) -> SharingPlan | None:
    """The plan `tie` applied to `model`, or None if kshare has not tied it."""
    return getattr(model, _PLAN_ATTR, None)


def _medoid(kernels: torch.Tensor) -> int:
    """Index of the member kernel closest (summed L2) to all the others."""
    flat = kernels.flatten(1).double()
    return int(torch.cdist(flat, flat).sum(1).argmin())


def _initial(tensors: Sequence[torch.Tensor], init: str, medoid: int) -> torch.Tensor:
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


def _tie_group(modules: dict[str, nn.Module], group: Group, init: str, share_bias: bool) -> None:
    convs = [modules[m] for m in group.members]
    weights = [c.weight for c in convs]
    medoid = _medoid(torch.stack([w.detach() for w in weights])) if init == "medoid" else 0
    weight = nn.Parameter(_initial(weights, init, medoid), requires_grad=weights[0].requires_grad)
    for conv in convs:
        conv.weight = weight
    biases = [c.bias for c in convs if c.bias is not None]
    if share_bias and len(biases) == len(convs):
        bias = nn.Parameter(_initial(biases, init, medoid), requires_grad=biases[0].requires_grad)
        for conv in convs:
            conv.bias = bias


def tie(
    model: nn.Module,
    plan: SharingPlan | Policy | str = "all",
    *,
    init: str | None = None,
    relax: str | None = None,
    input_size: Sequence[int] | str | None = None,
    **policy_options: object,
) -> nn.Module:
    """Tie `model` in place by a plan (or a policy, planned here) and return it.

    `init` says how each group's shared kernel is computed from the members' current
    kernels: `first` (the first member's, in execution order), `mean` (elementwise mean) or
    `medoid` (the member closest to all others) or `norm_mean` (the mean, each output
    channel rescaled to the members' average norm), so a pretrained model keeps what it can.
    With a ready plan and no `init`, each group uses the init the plan records. The plan
    is attached (`plan_of(model)`); tying a tied model is refused: `untie` first.

    `relax` (`scale`, `lora:R`, `scale+lora:R`; see `kshare.relax`) gives each member a few
    parameters of its own on top of the shared kernel, fitted to its kernel before tying; the
    plan's totals count them. With a ready plan and no `relax`, the plan's own is used.
    """
    if init is not None and init not in INITS:
        raise PlanError(f"unknown init {init!r}: expected one of {', '.join(INITS)}")
    if plan_of(model) is not None:
        raise PlanError("model is already tied by kshare: call kshare.untie(model) before tying it again")
    if not isinstance(plan, SharingPlan):
        from kshare.api import analyze

        plan = analyze(model, plan, input_size=input_size, relax=relax, **policy_options  # type: ignore[arg-type]
                       ).plan
    elif policy_options:
        raise PlanError(f"policy options {sorted(policy_options)} apply to a policy, not to a ready plan")
    plan.validate(model)
    groups = tuple(dataclasses.replace(g, init=init or g.init) for g in plan.groups)
    for group in groups:
        if group.init not in INITS:
            raise PlanError(f"plan group {group.name} has unknown init {group.init!r}")
    relaxation = Relaxation.parse(relax if relax is not None else plan.relax)
    ranks = {g.name: relaxation.member_ranks(g) for g in groups}  # before any change: it may refuse the plan
    modules = dict(model.named_modules())
    for group in groups:
        originals = [modules[m].weight.detach().clone() for m in group.members] if relaxation.active else []
        _tie_group(modules, group, group.init, plan.share_bias)
        for name, original, rank in zip(group.members, originals, ranks[group.name], strict=False):
            relax_member(modules[name], relaxation.scale, rank, original)  # `originals` is empty unless relaxed
    # a ready plan may count another relaxation (or none): count the one applied
    plan = with_relaxation(dataclasses.replace(plan, groups=groups), relaxation)
    object.__setattr__(model, _PLAN_ATTR, plan)
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
