"""Every torchvision classifier and 40 timm models across families are analysed; FX and the
hook fallback agree exactly; models plain torch.fx cannot trace still work."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from helpers import check_plan
from torch import fx

import kshare.analysis.inspect
from kshare.analysis.inspect import inspect_model
from kshare.models.zoo import default_input_size, load_model
from kshare.planning import build_plan

TORCHVISION = torchvision.models.list_models(module=torchvision.models)

# timm models plain torch.fx.symbolic_trace fails on (asserted below). kshare traces most
# of them with timm's do-not-trace lists; without those lists they all need the fallback.
TIMM_PLAIN_FX_FAILS = [
    "convit_tiny",
    "cpubone_s0",
    "crossvit_9_240",
    "efficientvit_b0",
    "efficientvit_m0",
    "hiera_tiny_224",
    "mobilevit_xxs",
    "mvitv2_tiny",
    "nest_tiny",
    "tiny_vit_5m_224",
    "twins_svt_small",
    "vit_tiny_r_s16_p8_224",
]
# ... and of those, the ones that even timm-aware FX cannot run: always the hook fallback.
TIMM_FALLBACK = ["hiera_tiny_224"]
TIMM_TRACEABLE = [
    "caformer_s18",
    "convnext_atto",
    "cs3darknet_s",
    "cspnext_s",
    "densenet121",
    "dla34",
    "dpn68",
    "edgenext_small",
    "efficientformer_l1",
    "efficientvim_m1",
    "ese_vovnet19b_slim",
    "fastvit_s12",
    "gernet_s",
    "ghostnet_050",
    "halonet26t",
    "hardcorenas_a",
    "hgnet_tiny",
    "inception_next_atto",
    "lcnetv2_small",
    "mambaout_tiny",
    "mixnet_s",
    "mobilenetv3_small_050",
    "nf_regnet_b0",
    "pvt_v2_b0",
    "regnetx_002",
    "repghostnet_050",
    "repvit_m1",
    "resnest14d",
    "resnet18",
    "resnetv2_18",
    "rexnet_100",
    "selecsls42",
    "shvit_s1",
    "skresnet18",
    "starnet_s1",
    "swiftformer_s",
    "visformer_tiny",
]
TIMM = TIMM_TRACEABLE + TIMM_PLAIN_FX_FAILS


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore")


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION)
def test_every_torchvision_classifier(name: str) -> None:
    model, spec = load_model(f"torchvision:{name}")
    insp = inspect_model(model, default_input_size(model, spec))
    assert insp.sites, "every torchvision classifier has at least one conv"
    for policy in ("all", "stage"):
        check_plan(model, insp, build_plan(insp, policy))


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM)
def test_timm_models_fx_and_hooks_agree(name: str) -> None:
    torch.manual_seed(0)
    model, spec = load_model(f"timm:{name}")
    size = default_input_size(model, spec)
    auto = inspect_model(model, size)
    hooks = inspect_model(model, size, method="hooks")
    assert auto.method == ("hooks" if name in TIMM_FALLBACK else "fx"), auto.fallback_reason
    assert auto.sites == hooks.sites and auto.unused == hooks.unused
    for policy in ("all", "stage"):
        plan = build_plan(auto, policy)
        check_plan(model, auto, plan)
        assert plan.groups == build_plan(hooks, policy).groups


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_PLAIN_FX_FAILS)
def test_plain_fx_failures_go_through_the_fallback(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without timm's do-not-trace lists, tracing fails; the fallback gives the same groups."""
    model, spec = load_model(f"timm:{name}")
    size = default_input_size(model, spec)
    with pytest.raises(Exception):  # noqa: B017 - any trace error: the claim is "plain FX fails"
        fx.symbolic_trace(model)
    reference = inspect_model(model, size)
    monkeypatch.setattr(kshare.analysis.inspect, "_timm_fx_lists", lambda: ((), ()))
    plain = inspect_model(model, size)
    assert plain.method == "hooks" and plain.fallback_reason
    assert plain.sites == reference.sites
    for policy in ("all", "stage"):
        assert build_plan(plain, policy).groups == build_plan(reference, policy).groups
