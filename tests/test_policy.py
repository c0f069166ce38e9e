"""Policy semantics on real models: scopes, chunks, globs, min_size, match modes."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import kshare
from kshare.analysis.inspect import inspect_model
from kshare.planning import BudgetConfig, Policy, PositionalConfig, build_plan, parse_config


@pytest.fixture(scope="module")
def resnet50_inspection() -> kshare.Inspection:
    return inspect_model(torchvision.models.resnet50(), (3, 224, 224))


def _check_partition(insp: kshare.Inspection, plan: kshare.SharingPlan) -> None:
    """Every conv is in exactly one group or listed as unshared, and groups are isomorphic."""
    grouped = [m for g in plan.groups for m in g.members]
    left = [u.name for u in plan.unshared]
    assert sorted(grouped + left) == sorted([s.name for s in insp.sites] + list(insp.unused))
    sites = {s.name: s for s in insp.sites}
    for g in plan.groups:
        keys = {sites[m].signature.key(plan.match) for m in g.members}
        assert len(keys) == 1 and len(g.members) >= 2


def test_stage_never_mixes_resolutions(resnet50_inspection: kshare.Inspection) -> None:
    plan = build_plan(resnet50_inspection, "stage")
    sites = {s.name: s for s in resnet50_inspection.sites}
    for g in plan.groups:
        assert len({sites[m].resolution for m in g.members}) == 1
        assert len(g.stages) == 1
    _check_partition(resnet50_inspection, plan)


def test_all_saves_at_least_as_much_as_stage(resnet50_inspection: kshare.Inspection) -> None:
    every, stage = build_plan(resnet50_inspection, "all"), build_plan(resnet50_inspection, "stage")
    assert every.totals.params_after <= stage.totals.params_after < stage.totals.params_before
    _check_partition(resnet50_inspection, every)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_chunk_groups_have_at_most_k_members(resnet50_inspection: kshare.Inspection, k: int) -> None:
    plan = build_plan(resnet50_inspection, f"chunk:{k}")
    assert plan.groups and all(len(g.members) <= k for g in plan.groups)
    order = {s.name: s.order for s in resnet50_inspection.sites}
    for g in plan.groups:  # consecutive runs: members keep execution order
        assert [order[m] for m in g.members] == sorted(order[m] for m in g.members)
    _check_partition(resnet50_inspection, plan)
    staged = build_plan(resnet50_inspection, f"stage+chunk:{k}")
    assert all(len(g.members) <= k and len(g.stages) == 1 for g in staged.groups)


def test_chunks_are_even() -> None:
    net = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(5)])
    plan = kshare.plan(net, "chunk:4", input_size=(8, 8, 8))
    assert [len(g.members) for g in plan.groups] == [3, 2]


def test_exclude_and_include_are_honoured(resnet50_inspection: kshare.Inspection) -> None:
    plan = build_plan(resnet50_inspection, Policy(exclude=("layer4.*", "layer1.0.*")))
    members = [m for g in plan.groups for m in g.members]
    assert not any(m.startswith(("layer4.", "layer1.0.")) for m in members)
    reasons = {u.name: u.reason for u in plan.unshared}
    assert reasons["layer4.1.conv2"] == "excluded by 'layer4.*'"
    only = build_plan(resnet50_inspection, Policy(include=("layer3.*",)))
    assert only.groups and all(m.startswith("layer3.") for g in only.groups for m in g.members)
    assert {u.reason for u in only.unshared if not u.name.startswith("layer3.")} == {"not matched by the include globs"}


def test_glob_that_matches_nothing_is_an_error(resnet50_inspection: kshare.Inspection) -> None:
    with pytest.raises(kshare.PolicyError, match="matches no convolution"):
        build_plan(resnet50_inspection, Policy(exclude=("layr4.*",)))


def test_min_size(resnet50_inspection: kshare.Inspection) -> None:
    plan = build_plan(resnet50_inspection, Policy(scope="stage", min_size=4))
    assert all(len(g.members) >= 4 for g in plan.groups)
    assert any("below min_size 4" in u.reason for u in plan.unshared)


def test_policy_that_matches_nothing_says_so() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3), nn.Conv2d(16, 32, 3))
    plan = kshare.plan(net, "all", input_size=(3, 16, 16))
    assert plan.is_empty and plan.totals.params_after == plan.totals.params_before
    assert any("forms no sharing group" in n for n in plan.notes)
    assert {u.reason for u in plan.unshared} == {"alone in its signature"}


def test_shape_match_lets_strides_share() -> None:
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1))
    assert kshare.plan(net, "all", input_size=(8, 16, 16)).is_empty
    shape = kshare.plan(net, "all", match="shape", input_size=(8, 16, 16))
    assert [g.members for g in shape.groups] == [("0", "1")]
    assert shape.totals.params_before - shape.totals.params_after == 8 * 8 * 9 + 8


def test_share_bias_off_counts_only_kernels() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Conv2d(4, 4, 3, padding=1) for _ in range(3)])
    with_bias = kshare.plan(net, input_size=(4, 8, 8))
    without = kshare.plan(net, input_size=(4, 8, 8), share_bias=False)
    assert with_bias.groups[0].params_saved == 2 * (4 * 4 * 9 + 4)
    assert without.groups[0].params_saved == 2 * (4 * 4 * 9)


@pytest.mark.parametrize("spec", ["stag", "chunk:1", "chunk:x", "all+all", "stage+chunk:2+chunk:3", "",
                                  "chunk:\u0663", "budget:\u0660.5", "budget:0.5+stage", "stage+budget:0.5",
                                  "budget:0", "budget:1.5", "budget:nan", "budget:inf", "budget:"])
def test_bad_policy_strings(spec: str) -> None:
    with pytest.raises(kshare.PolicyError):
        parse_config(spec)


def test_policy_names_round_trip() -> None:
    for spec in ("all", "stage", "chunk:3", "stage+chunk:5", "budget:0.5", "budget:1"):
        config = parse_config(spec)
        assert parse_config(config.name) == config
    assert parse_config("chunk:3").name == "all+chunk:3"
    assert parse_config("budget:0.25") == BudgetConfig(fraction=0.25)


def test_one_parser_options_override_and_types() -> None:
    config = parse_config("stage+chunk:3", match="shape", exclude=["layer4.*"], relax="lora:2", min_size=None)
    assert config == PositionalConfig(scope="stage", chunk=3, match="shape", exclude=("layer4.*",),
                                      relax=kshare.Relaxation(rank=2))
    assert parse_config(config) is not config and parse_config(config) == config
    assert parse_config(config, share_bias=False).share_bias is False
    with pytest.raises(kshare.PolicyError, match="unknown sharing option"):
        parse_config("all", scope="stage", colour="red")
    with pytest.raises(kshare.PolicyError, match="min_size"):
        parse_config("all", min_size=1)


def test_build_plan_accepts_every_config(resnet50_inspection: kshare.Inspection) -> None:
    """The one planner entry point takes positional and budget configs alike, as strings or typed."""
    model = nn.Sequential(*[nn.Conv2d(4, 4, 3, padding=1) for _ in range(4)])
    for config in ("all", "stage+chunk:2", "budget:0.5", BudgetConfig(fraction=0.6, relax="lora:1"),
                   PositionalConfig(scope="stage")):
        plan = build_plan(model, config, input_size=(4, 8, 8))
        assert plan.groups and plan.totals.conv_params_after < plan.totals.conv_params_before
        assert all(g.error is not None for g in plan.groups)  # every plan reports its reconstruction error
    assert build_plan(resnet50_inspection, "stage").groups  # positional plans need no weights
    with pytest.raises(kshare.PolicyError, match="reads the kernels"):
        build_plan(resnet50_inspection, "budget:0.5")


def test_squeeze_excitation_convs_do_not_split_stages() -> None:
    """EfficientNet's SE convs run on 1x1 pooled tensors; they must not cut every block into
    its own stage (which would leave `stage` nothing to share)."""
    insp = inspect_model(torchvision.models.efficientnet_b0(), (3, 224, 224))
    main = {s.resolution for s in insp.sites if s.resolution != (1, 1)}
    assert len({s.stage for s in insp.sites}) == len(main)
    plan = build_plan(insp, "stage")
    assert plan.totals.ratio > 1.0
    sites = {s.name: s for s in insp.sites}
    assert all(len({sites[m].resolution for m in g.members}) == 1 for g in plan.groups)
