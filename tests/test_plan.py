"""SharingPlan: JSON round trip and validation against a model."""

from __future__ import annotations

import json

import pytest
import torchvision

import kshare
from kshare.planning.plan import SharingPlan


@pytest.fixture(scope="module")
def plan() -> SharingPlan:
    return kshare.plan(torchvision.models.resnet18(), "stage+chunk:2")


def test_json_round_trip(plan: SharingPlan) -> None:
    again = SharingPlan.from_json(plan.to_json())
    assert again == plan
    assert again.totals.ratio == pytest.approx(plan.totals.ratio)


def test_validate_accepts_the_same_architecture(plan: SharingPlan) -> None:
    plan.validate(torchvision.models.resnet18())


def test_validate_rejects_a_different_model(plan: SharingPlan) -> None:
    with pytest.raises(kshare.PlanError, match=r"no convolution named|expects"):
        plan.validate(torchvision.models.mobilenet_v2())


def test_validate_rejects_a_changed_signature(plan: SharingPlan) -> None:
    data = json.loads(plan.to_json())
    data["groups"][0]["signature"]["out_channels"] += 1
    with pytest.raises(kshare.PlanError, match="expects"):
        SharingPlan.from_dict(data).validate(torchvision.models.resnet18())


@pytest.mark.parametrize("text", ["not json", "[]", '{"format": "other"}', '{"format": "kshare.plan/1"}'])
def test_malformed_plans(text: str) -> None:
    with pytest.raises(kshare.PlanError):
        SharingPlan.from_json(text)
