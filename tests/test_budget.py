"""Budget plans: similarity clustering beats positional sharing at the same parameter count."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import kshare
from kshare.cli import app
from kshare.errors import PlanError, PolicyError
from kshare.planning.kernel_error import total_error
from kshare.planning.plan import SharingPlan
from kshare.training.config import TrainConfig
from kshare.training.loop import finetune


class TwoResolutions(nn.Module):
    """Eight isomorphic 3x3 convs, four at each of two resolutions (so `stage` differs from `all`)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.a = nn.ModuleList(nn.Conv2d(16, 16, 3, padding=1) for _ in range(4))
        self.b = nn.ModuleList(nn.Conv2d(16, 16, 3, padding=1) for _ in range(4))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for conv in self.a:
            x = x + torch.relu(conv(x))
        x = nn.functional.avg_pool2d(x, 2)
        for conv in self.b:
            x = x + torch.relu(conv(x))
        return self.head(x.mean((2, 3)))


def with_mean(plan: SharingPlan) -> SharingPlan:
    return dataclasses.replace(plan, groups=tuple(dataclasses.replace(g, init="mean") for g in plan.groups))


def compare(model: nn.Module, policy: str, size: tuple[int, ...]) -> tuple[float, float, SharingPlan]:
    """(positional error, budget error at the same conv parameter count, the budget plan)."""
    positional = kshare.analyze(model, policy, input_size=size)
    plan = with_mean(positional.plan)
    fraction = plan.totals.conv_params_after / plan.totals.conv_params_before
    budget = kshare.analyze(model, f"budget:{fraction}", input_size=size)
    assert budget.plan.totals.conv_params_after <= plan.totals.conv_params_after
    return total_error(model, plan, positional.inspection), total_error(model, budget.plan, budget.inspection), \
        budget.plan


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    torch.manual_seed(0)
    model = TwoResolutions()
    data = kshare.load_data("digits", "train")
    finetune(model, data, kshare.load_data("digits", "test"), TrainConfig(epochs=2, lr=3e-3, batch_size=32),
             Path(tempfile.mkdtemp()) / "m.pt")
    return model


def test_trained_model_budget_beats_stage_and_chunks(trained: nn.Module) -> None:
    stage_err, budget_err, _ = compare(trained, "stage", (1, 8, 8))
    assert budget_err < stage_err
    for policy in ("chunk:2", "chunk:3", "stage+chunk:2"):
        positional, budget, _ = compare(trained, policy, (1, 8, 8))
        assert budget <= positional + 1e-12, policy


def test_planted_families_are_found() -> None:
    torch.manual_seed(0)
    model, _ = kshare.load_model("kshare:convmixer_32_8")
    blocks = [m for m in model if isinstance(m, nn.Sequential)]
    pw_base, dw_base = torch.randn(2, 32, 32, 1, 1), torch.randn(2, 32, 1, 9, 9)
    with torch.no_grad():
        for i, block in enumerate(blocks):
            block[1].weight.copy_(pw_base[i % 2] + 0.01 * torch.randn(32, 32, 1, 1))
            block[0].fn[0].weight.copy_(dw_base[i % 2] + 0.01 * torch.randn(32, 1, 9, 9))
            block[1].bias.zero_()
            block[0].fn[0].bias.zero_()
    positional, budget, plan = compare(model, "chunk:4", (3, 32, 32))
    assert budget < 0.01 * positional
    families = {tuple(g.members) for g in plan.groups}
    assert ("3.1", "5.1", "7.1", "9.1") in families and ("4.1", "6.1", "8.1", "10.1") in families


def test_reported_errors_are_the_members_distance_to_the_mean(trained: nn.Module) -> None:
    plan = kshare.plan(trained, "budget:0.5", input_size=(1, 8, 8))
    assert plan.totals.conv_params_after <= 0.5 * plan.totals.conv_params_before
    modules = dict(trained.named_modules())
    for group in plan.groups:
        vecs = torch.stack([torch.cat([modules[m].weight.flatten(), modules[m].bias]).detach().double()
                            for m in group.members])
        expected = float((vecs - vecs.mean(0)).square().sum() / vecs.square().sum())
        assert group.error == pytest.approx(expected, rel=1e-9) and group.init == "mean"
    again = SharingPlan.from_json(plan.to_json())
    assert [g.error for g in again.groups] == [g.error for g in plan.groups]


def test_tie_by_budget_keeps_outputs_of_the_mean_kernels(trained: nn.Module) -> None:
    import copy

    model = copy.deepcopy(trained).eval()
    plan = kshare.plan(model, "budget:0.6", input_size=(1, 8, 8))
    reference = copy.deepcopy(model)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for g in plan.groups:
            mean_w = torch.stack([modules[m].weight for m in g.members]).mean(0)
            mean_b = torch.stack([modules[m].bias for m in g.members]).mean(0)
            for m in g.members:
                modules[m].weight.copy_(mean_w)
                modules[m].bias.copy_(mean_b)
    kshare.tie(model, plan)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)


def test_bad_budgets() -> None:
    model = TwoResolutions()
    with pytest.raises(PolicyError, match="budget"):
        kshare.plan(model, "budget:1.5", input_size=(1, 8, 8))
    with pytest.raises(PolicyError, match="budget"):
        kshare.plan(model, "budget:x", input_size=(1, 8, 8))
    with pytest.raises(PlanError, match="out of reach"):
        kshare.plan(model, "budget:0.05", input_size=(1, 8, 8))
    with pytest.raises(PlanError, match="sharing every isomorphic kernel keeps"):
        kshare.plan(model, "budget:0.05", input_size=(1, 8, 8), relax="lora:auto")
    floor = kshare.plan(model, "all", input_size=(1, 8, 8)).totals
    at_floor = f"budget:{floor.conv_params_after / floor.conv_params_before}"  # the kernels fit; no room for scales
    assert not kshare.plan(model, at_floor, input_size=(1, 8, 8), relax="lora:auto").relax_params
    with pytest.raises(PlanError, match="per-member scales exceed"):
        kshare.plan(model, at_floor, input_size=(1, 8, 8), relax="scale+lora:auto")
    shared, _ = kshare.load_model("kshare:convmixer_32_4_shared")
    with pytest.raises(PlanError, match="already"):
        kshare.plan(shared, "budget:0.5")


def test_cli_budget(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["analyze", "kshare:convmixer_32_4", "-g", "budget:0.4"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "budget:0.4" in result.output and "rel. error" in result.output
    out = tmp_path / "b.pt"
    result = runner.invoke(app, ["apply", "kshare:convmixer_32_4", "-g", "budget:0.4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    plan = kshare.plan_of(kshare.load(out))
    assert plan is not None and plan.policy == "budget:0.4"
    assert plan.totals.conv_params_after <= 0.4 * plan.totals.conv_params_before
    bad = runner.invoke(app, ["analyze", "kshare:convmixer_32_4", "-g", "budget:0.01"])
    assert bad.exit_code == 2 and "out of reach" in bad.output


def _grouped_error(model: nn.Module, reference: nn.Module, plan: SharingPlan) -> float:
    """Squared distance of every grouped member's effective kernel and bias from its own before tying."""
    tied, ref = dict(model.named_modules()), dict(reference.named_modules())
    with torch.no_grad():
        return sum(float((tied[m].weight.double() - ref[m].weight.double()).square().sum()
                         + (tied[m].bias.double() - ref[m].bias.double()).square().sum())
                   for g in plan.groups for m in g.members)


def test_auto_ranks_spend_the_budget_and_reconstruct_as_reported(trained: nn.Module) -> None:
    import copy
    import re

    reference = copy.deepcopy(trained).eval()
    model = kshare.tie(copy.deepcopy(trained).eval(), "budget:0.5", relax="lora:auto", input_size=(1, 8, 8))
    plan = kshare.plan_of(model)
    assert plan.relax == "lora:auto" and plan.totals.conv_params_after <= 0.5 * plan.totals.conv_params_before
    assert all(len(g.ranks) == len(g.members) for g in plan.groups) and any(r for g in plan.groups for r in g.ranks)
    assert plan.totals.params_after == sum({id(p): p.numel() for p in model.parameters()}.values())
    per_rank = 16 + 16 * 9  # out + fan-in of a 16→16 3x3 kernel
    assert plan.relax_params == per_rank * sum(r for g in plan.groups for r in g.ranks)
    assert plan.totals.conv_params_before * 0.5 - plan.totals.conv_params_after < per_rank  # nothing left to spend
    modules = dict(model.named_modules())
    for g in plan.groups:  # a member given no rank is plainly tied, not wrapped
        for name, rank in zip(g.members, g.ranks, strict=True):
            assert hasattr(modules[name], "parametrizations") == (rank > 0)
    norm = sum(float(m.weight.detach().double().square().sum() + m.bias.detach().double().square().sum())
               for m in reference.modules() if isinstance(m, nn.Conv2d))  # every conv, as the note
    reported = float(re.search(r"after the deltas ([0-9.]+)", plan.notes[-1]).group(1))
    measured = _grouped_error(model, reference, plan)
    assert measured / norm == pytest.approx(reported, abs=1e-4)
    plain = kshare.tie(copy.deepcopy(trained).eval(), "budget:0.5", input_size=(1, 8, 8))
    assert measured < _grouped_error(plain, reference, kshare.plan_of(plain))  # the deltas removed error


def test_auto_ranks_round_trip_and_need_a_budget(trained: nn.Module, tmp_path: Path) -> None:
    import copy

    model = kshare.tie(copy.deepcopy(trained).eval(), "budget:0.4", relax="lora:auto", input_size=(1, 8, 8))
    plan = kshare.plan_of(model)
    assert SharingPlan.from_json(plan.to_json()) == plan
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
    kshare.save(model, tmp_path / "auto.pt")
    loaded = kshare.load(tmp_path / "auto.pt", model=TwoResolutions()).eval()
    assert kshare.plan_of(loaded) == plan
    kshare.export_safetensors(model, tmp_path / "auto.safetensors")
    exported = kshare.load(tmp_path / "auto.safetensors", model=TwoResolutions()).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(exported(x), expected, rtol=0, atol=0)
        folded = kshare.fold(loaded)
        assert not any(hasattr(m, "parametrizations") for m in folded.modules())
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-6)
    info = CliRunner().invoke(app, ["info", str(tmp_path / "auto.pt")], env={"COLUMNS": "200"})
    assert info.exit_code == 0 and "delta ranks" in info.output, info.output
    assert all(",".join(map(str, g.ranks)) in info.output for g in plan.groups)
    with pytest.raises(PlanError, match="budget"):
        kshare.tie(copy.deepcopy(trained), "stage", relax="lora:auto", input_size=(1, 8, 8))
    with pytest.raises(PlanError, match="budget"):  # a plan whose ranks were not chosen for it
        kshare.tie(copy.deepcopy(trained), kshare.plan(trained, "budget:0.5", input_size=(1, 8, 8)),
                   relax="lora:auto")
    refit = kshare.tie(copy.deepcopy(trained), plan, relax="lora:1")  # another relaxation drops the ranks
    assert all(not g.ranks for g in kshare.plan_of(refit).groups)
    bad = CliRunner().invoke(app, ["analyze", "kshare:convmixer_32_4", "-g", "stage", "--relax", "lora:auto"])
    assert bad.exit_code == 2 and "budget" in bad.output


def test_cluster_squared_error_counts_every_cluster_and_no_lone_member() -> None:
    from kshare.planning.budget import _lloyd, _sse

    torch.manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64)
    labels = [-3, 4, -3, -1, 4, 4, 2]  # partitions label lone kernels with negative numbers
    naive = sum(float((x[[i for i, c in enumerate(labels) if c == k]] - x[[i for i, c in enumerate(labels) if c == k]]
                       .mean(0)).square().sum()) for k in set(labels))
    assert _sse(x, labels) == pytest.approx(naive, rel=1e-12) and naive > 0
    refined = _lloyd(x, labels)
    assert len(set(refined)) == len(set(labels)) and _sse(x, refined) <= _sse(x, labels) + 1e-12
