"""tie/untie: forward equality, gradient sums, optimiser steps, compile, counts, refusals.

Every numeric claim is checked against an untied copy of the original model in which each
member was given the shared kernel as its own, independent parameter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kshare
from kshare.models.zoo import load_model

CASES = [
    ("resnet18", "stage", "first"),
    ("resnet18", "all", "mean"),
    ("mobilenet_v2", "chunk:3", "medoid"),
    ("timm:convnext_atto", "stage", "mean"),
    ("kshare:convmixer_64_4", "all", "first"),
    ("kshare:se_resnet_cifar_d2", "stage", "medoid"),
]


def _size(name: str) -> tuple[int, int, int]:
    return (3, 32, 32) if name.startswith("kshare:") else (3, 64, 64)


def tied_and_reference(name: str, policy: str, init: str) -> tuple[nn.Module, nn.Module, kshare.SharingPlan]:
    """The tied model, and an independent untied copy whose members hold the shared values."""
    torch.manual_seed(0)
    original, _ = load_model(name)
    reference = copy.deepcopy(original)
    tied = kshare.tie(original, policy, init=init, input_size=_size(name))
    plan = kshare.plan_of(tied)
    assert plan is not None and plan.groups
    modules, ref_modules = dict(tied.named_modules()), dict(reference.named_modules())
    for group in plan.groups:
        shared = modules[group.members[0]]
        for member in group.members:
            conv = ref_modules[member]
            conv.weight = nn.Parameter(shared.weight.detach().clone())
            if plan.share_bias and conv.bias is not None:
                conv.bias = nn.Parameter(shared.bias.detach().clone())
    return tied, reference, plan


@pytest.mark.parametrize(("name", "policy", "init"), CASES)
def test_forward_equals_untied_copy(name: str, policy: str, init: str) -> None:
    tied, reference, _ = tied_and_reference(name, policy, init)
    tied.eval(), reference.eval()
    x = torch.randn(2, *_size(name))
    with torch.no_grad():
        torch.testing.assert_close(tied(x), reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "policy", "init"), CASES)
def test_gradient_is_the_sum_of_member_gradients(name: str, policy: str, init: str) -> None:
    tied, reference, plan = tied_and_reference(name, policy, init)
    tied.train(), reference.train()
    x = torch.randn(2, *_size(name))
    target = torch.randint(0, 10, (2,))
    for model in (tied, reference):
        torch.manual_seed(1)  # the same dropout masks in both
        nn.functional.cross_entropy(model(x), target).backward()
    modules, ref_modules = dict(tied.named_modules()), dict(reference.named_modules())
    for group in plan.groups:
        shared = modules[group.members[0]].weight
        summed = torch.stack([ref_modules[m].weight.grad for m in group.members]).sum(0)
        torch.testing.assert_close(shared.grad, summed, rtol=1e-4, atol=1e-6)


def test_init_strategies_compute_from_the_members() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Conv2d(4, 4, 3, padding=1) for _ in range(3)])
    kernels = torch.stack([c.weight.detach().clone() for c in net])
    for init, expected in (
        ("first", kernels[0]),
        ("mean", kernels.mean(0)),
        ("medoid", kernels[int(torch.cdist(kernels.flatten(1), kernels.flatten(1)).sum(1).argmin())]),
        ("norm_mean", torch.stack([kernels.mean(0)[o] * kernels[:, o].flatten(1).norm(dim=1).mean()
                                   / kernels.mean(0)[o].norm() for o in range(4)])),
    ):
        tied = kshare.tie(copy.deepcopy(net), "all", init=init, input_size=(4, 8, 8))
        torch.testing.assert_close(tied[0].weight.detach(), expected)
        assert all(c.weight is tied[0].weight and c.bias is tied[0].bias for c in tied)
        if init in ("mean", "norm_mean"):  # biases are averaged, never rescaled
            torch.testing.assert_close(tied[0].bias.detach(), torch.stack([c.bias.detach() for c in net]).mean(0))


def test_optimizer_step_keeps_members_identical() -> None:
    tied, _, plan = tied_and_reference("resnet18", "stage", "mean")
    opt = torch.optim.SGD(tied.parameters(), lr=0.1, momentum=0.9)
    before = {g.name: dict(tied.named_modules())[g.members[0]].weight.detach().clone() for g in plan.groups}
    for _ in range(2):
        opt.zero_grad()
        tied(torch.randn(2, 3, 64, 64)).sum().backward()
        opt.step()
    modules = dict(tied.named_modules())
    for g in plan.groups:
        weights = [modules[m].weight for m in g.members]
        assert all(w is weights[0] for w in weights)
        assert not torch.equal(weights[0].detach(), before[g.name])  # it did train


def test_parameters_and_counts_see_shared_tensors_once() -> None:
    torch.manual_seed(0)
    model, _ = load_model("resnet50")
    before = sum(p.numel() for p in model.parameters())
    tied = kshare.tie(model, "all")
    plan = kshare.plan_of(tied)
    assert plan is not None and plan.totals.params_before == before
    assert sum(p.numel() for p in tied.parameters()) == plan.totals.params_after
    again = kshare.plan(tied, "all")  # analysing a tied model counts what it stores
    assert again.totals.params_before == plan.totals.params_after
    assert again.totals.params_after == plan.totals.params_after


def test_untie_restores_independent_parameters_with_unchanged_outputs() -> None:
    tied, _, plan = tied_and_reference("resnet18", "all", "mean")
    tied.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = tied(x)
    kshare.untie(tied)
    assert kshare.plan_of(tied) is None
    modules = dict(tied.named_modules())
    for g in plan.groups:
        ptrs = {modules[m].weight.data_ptr() for m in g.members}
        assert len(ptrs) == len(g.members)
    assert sum(p.numel() for p in tied.parameters()) == plan.totals.params_before
    with torch.no_grad():
        torch.testing.assert_close(tied(x), out, rtol=0, atol=0)


def test_tie_twice_is_refused_and_changes_nothing() -> None:
    tied, _, _ = tied_and_reference("resnet18", "stage", "first")
    params = [id(p) for p in tied.parameters()]
    with pytest.raises(kshare.PlanError, match="already tied"):
        kshare.tie(tied, "all")
    assert params == [id(p) for p in tied.parameters()]
    with pytest.raises(kshare.PlanError, match="not tied"):
        kshare.untie(nn.Conv2d(1, 1, 1))


def test_bad_init_and_misfitting_plan() -> None:
    model, _ = load_model("resnet18")
    with pytest.raises(kshare.PlanError, match="unknown init"):
        kshare.tie(model, "all", init="median")
    other = kshare.plan(load_model("mobilenet_v2")[0], "all")
    with pytest.raises(kshare.PlanError):
        kshare.tie(model, other)
    assert kshare.plan_of(model) is None


def test_share_bias_off_keeps_biases_apart() -> None:
    net = nn.Sequential(*[nn.Conv2d(4, 4, 3, padding=1) for _ in range(3)])
    kshare.tie(net, "all", share_bias=False, input_size=(4, 8, 8))
    assert net[0].weight is net[2].weight and net[0].bias is not net[2].bias


def test_torch_compile_matches_eager() -> None:
    tied, _, _ = tied_and_reference("kshare:convmixer_32_2", "all", "mean")
    tied.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = tied(x)
        compiled = torch.compile(tied)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_dtype_and_device_moves_keep_aliasing() -> None:
    tied, _, plan = tied_and_reference("resnet18", "stage", "first")
    tied.double()
    modules = dict(tied.named_modules())
    for g in plan.groups:
        weights = [modules[m].weight for m in g.members]
        assert all(w is weights[0] for w in weights) and weights[0].dtype == torch.float64
