"""Checks shared by the zoo sweeps: properties every plan must have, computed independently."""

from __future__ import annotations

import torch
from torch import nn

from kshare.analysis.inspect import Inspection
from kshare.planning.plan import SharingPlan


def check_plan(model: nn.Module, insp: Inspection, plan: SharingPlan) -> None:
    """Partition, isomorphism, stage purity, and savings recomputed from the modules."""
    grouped = [m for g in plan.groups for m in g.members]
    left = [u.name for u in plan.unshared]
    assert sorted(grouped + left) == sorted([s.name for s in insp.sites] + list(insp.unused))
    assert len(set(grouped)) == len(grouped)
    sites = {s.name: s for s in insp.sites}
    modules = dict(model.named_modules())
    expected_saved = 0
    for g in plan.groups:
        assert len(g.members) >= 2
        assert len({sites[m].signature.key(plan.match) for m in g.members}) == 1
        if plan.policy.startswith("stage"):
            assert len({sites[m].resolution for m in g.members}) == 1, g
        convs = [modules[m] for m in g.members]
        tensors = [c.weight for c in convs] + ([c.bias for c in convs if c.bias is not None] if plan.share_bias else [])
        by_storage = {t.data_ptr(): t.numel() for t in tensors}
        # after tying: one weight (and one bias) per group
        kept = convs[0].weight.numel() + (convs[0].bias.numel() if plan.share_bias and convs[0].bias is not None else 0)
        expected_saved += sum(by_storage.values()) - kept
        assert g.params_saved == sum(by_storage.values()) - kept
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert plan.totals.params_before == sum(unique.values())
    assert plan.totals.params_after == plan.totals.params_before - expected_saved


def trained_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics and affine parameters as a trained network has them (random init
    leaves them at 0/1, which hides every bug that folds BatchNorm into a kernel)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.2)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model
