"""The paper's models: kshare's `all`/`stage` plans must save exactly what the paper's
hand-shared variants store, counted independently by building those variants."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kshare
from kshare.models.paper import convmixer, se_resnet_cifar


def unique_params(model: nn.Module) -> int:
    """Parameters counted once per storage, independent of kshare's own accounting."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel()
    return sum(seen.values())


def test_convmixer_256_16_counts_match_the_paper() -> None:
    plan = kshare.plan("kshare:convmixer_256_16", "all")
    shared = convmixer(256, 16, shared=True)
    assert plan.totals.params_before == unique_params(convmixer(256, 16))
    assert plan.totals.params_after == unique_params(shared)
    # The paper's code: about 1.41M unshared, 0.107M shared.
    assert plan.totals.params_before == pytest.approx(1.41e6, rel=0.005)
    assert plan.totals.params_after == pytest.approx(0.107e6, rel=0.005)
    assert [len(g.members) for g in plan.groups] == [16, 16]


@pytest.mark.parametrize("depth", [2, 3])
def test_se_resnet_stage_plan_matches_the_paper_sharing(depth: int) -> None:
    """The paper shares, per stage, every planes->planes 3x3 conv: that is kshare's `stage`."""
    plan = kshare.plan(f"kshare:se_resnet_cifar_d{depth}", "stage")
    assert plan.totals.params_after == unique_params(se_resnet_cifar(depth, shared=True))
    assert plan.totals.params_before == unique_params(se_resnet_cifar(depth))
    assert len(plan.groups) == 3


def test_shared_variants_alias_and_keep_layer_order() -> None:
    torch.manual_seed(0)
    plain, shared = convmixer(64, 4), convmixer(64, 4, shared=True)
    names = lambda m: [(n, type(x).__name__) for n, x in m.named_modules()]  # noqa: E731
    assert names(plain) == names(shared)
    dw = [shared[3 + i][0].fn[0] for i in range(4)]
    assert all(c.weight is dw[0].weight and c.bias is dw[0].bias for c in dw)
    # Analysing the already-shared model finds nothing more to save.
    again = kshare.plan(shared, "all")
    assert again.totals.params_after == again.totals.params_before == unique_params(shared)


def test_paper_models_run_on_cifar_shapes() -> None:
    x = torch.randn(2, 3, 32, 32)
    for model in (convmixer(32, 2, num_classes=10), se_resnet_cifar(2, num_classes=100)):
        model.eval()
        out = model(x)
        assert out.shape[0] == 2 and out.shape[1] in (10, 100)
