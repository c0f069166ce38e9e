"""`fold`: bake every member's kernel into a plain convolution, for runtimes that want
nothing but convolutions. The outputs stay the same; the sharing (and the file's savings) go."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from kshare.errors import PlanError
from kshare.kernels import shared_kernel
from kshare.surgery.tie import forget_plan, plan_of


def fold(model: nn.Module) -> nn.Module:
    """Bake every member's kernel into a plain convolution (in place): no parametrizations, no
    sharing, the same outputs. For runtimes that take only convolutions; the file grows."""
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
