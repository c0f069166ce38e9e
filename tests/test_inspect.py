"""Inspection: FX and hook paths, shapes, stages, and the fallback for untraceable models."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import kshare
from kshare.analysis.inspect import inspect_model


def test_fallback_for_data_dependent_control_flow(data_dependent_net: nn.Module) -> None:
    insp = inspect_model(data_dependent_net, (3, 16, 16))
    assert insp.method == "hooks"
    assert insp.fallback_reason and "torch.fx" in insp.fallback_reason
    assert [s.name for s in insp.sites] == ["stem", "a", "b", "down", "c", "d"]
    assert insp.unused == ("unused",)
    assert insp.sites[3].output_shape == (1, 32, 8, 8)
    assert [s.stage for s in insp.sites] == [0, 0, 0, 1, 1, 1]
    with pytest.raises(kshare.InspectError, match="could not trace"):
        inspect_model(data_dependent_net, (3, 16, 16), method="fx")


def test_fallback_plan_groups_and_reasons(data_dependent_net: nn.Module) -> None:
    plan = kshare.plan(data_dependent_net, "stage", input_size=(3, 16, 16))
    assert [g.members for g in plan.groups] == [("a", "b"), ("c", "d")]
    reasons = {u.name: u.reason for u in plan.unshared}
    assert reasons["unused"] == "never called in the forward pass"
    assert reasons["stem"] == "alone in its signature"


def test_fx_and_hooks_agree_on_a_traceable_model(plain_net: nn.Module) -> None:
    fx = inspect_model(plain_net, (3, 16, 16), method="fx")
    hooks = inspect_model(plain_net, (3, 16, 16), method="hooks")
    assert fx.method == "fx" and hooks.method == "hooks"
    assert fx.sites == hooks.sites
    assert fx.unused == hooks.unused == ("body.unused",)


def test_analysis_does_not_change_the_model() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.train()
    model.layer2.eval()  # a mixed train/eval state must survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    kshare.analyze(model, "stage")
    kshare.analyze(model, "all", method="hooks")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [m.training for m in model.modules()]


def test_resnet18_sites_shapes_and_stages() -> None:
    insp = inspect_model(torchvision.models.resnet18(), (3, 224, 224))
    assert insp.method == "fx"
    assert len(insp.sites) == 20
    first = insp.sites[0]
    assert first.name == "conv1" and first.output_shape == (1, 64, 112, 112)
    resolutions = [s.resolution for s in insp.sites]
    for a, b in zip(insp.sites, insp.sites[1:], strict=False):
        # a new stage starts exactly where the output resolution changes
        assert (b.stage == a.stage) == (b.resolution == a.resolution)
    assert sorted(set(resolutions), reverse=True) == [(112, 112), (56, 56), (28, 28), (14, 14), (7, 7)]


def test_conv_called_twice_counts_once() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.conv(x))

    insp = inspect_model(Twice(), (4, 8, 8))
    assert len(insp.sites) == 1 and insp.sites[0].calls == 2


def test_convs_inside_timm_leaf_modules_are_found() -> None:
    """timm's do-not-trace modules are FX leaves; convs inside them must still be listed."""
    import timm

    model = timm.create_model("efficientvit_m0")
    fx = inspect_model(model, (3, 224, 224), method="fx")
    hooks = inspect_model(model, (3, 224, 224), method="hooks")
    assert fx.sites == hooks.sites
    assert len(fx.sites) + len(fx.unused) == sum(1 for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("bad", ["3,x,224", "0,224,224", "224", "", "-3,2,2"])
def test_bad_input_size(bad: str) -> None:
    with pytest.raises(kshare.InputSizeError):
        inspect_model(torchvision.models.resnet18(), bad)


def test_input_size_the_model_cannot_run() -> None:
    with pytest.raises(kshare.InspectError, match="failed on an example input"):
        kshare.analyze(torchvision.models.vit_b_16(), input_size=(3, 64, 64))
