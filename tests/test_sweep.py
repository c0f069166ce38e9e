"""`kshare sweep`: the grid, size-matched relaxed plans, the JSON and the Pareto plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import kshare
from kshare.api import analyze
from kshare.cli import app
from kshare.planning import Policy
from kshare.planning.plan import SharingPlan
from kshare.planning.relaxation import Relaxation
from kshare.sweep import (
    SweepRow,
    aggregate,
    matched_budget,
    pareto,
    stored_size,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model, _ = kshare.load_model("kshare:convmixer_32_4", {"in_chans": 1})
    data = kshare.load_data("digits", "train")
    path = tmp_path_factory.mktemp("sweep") / "base.pt"
    kshare.finetune(model, data, kshare.load_data("digits", "test"), kshare.TrainConfig(epochs=2, lr=3e-3,
                                                                                          batch_size=64), path)
    return path


def stored(plan: SharingPlan, relax: str) -> int:
    """Parameters stored, recomputed from the groups (not from the totals)."""
    r = Relaxation.parse(relax)
    return plan.totals.params_before - sum(g.params_saved for g in plan.groups) + sum(
        r.params_per_member(g.signature.weight_shape) * len(g.members) for g in plan.groups)


def test_matched_budget_is_the_largest_plan_that_fits(baseline: Path) -> None:
    model = kshare.load(baseline)
    analysis = analyze(model, "chunk:2", input_size=(1, 8, 8))
    target, conv = analysis.plan.totals.params_after, analysis.plan.totals.conv_params_before
    step = min(math.prod(g.signature.weight_shape) for g in analysis.plan.groups)  # the smallest kernel
    for relax in ("none", "scale", "lora:1"):
        r = Relaxation.parse(relax)
        plan = matched_budget(model, analysis.inspection, target, r, Policy())
        assert plan is not None and plan.relax == relax
        assert plan.totals.params_after == stored(plan, relax) <= target
        kernels = plan.totals.conv_params_after - plan.relax_params
        for k in range(1, 12):  # any larger kernel budget, relaxed, no longer fits or stores no more
            richer = analyze(model, f"budget:{min(1.0, (kernels + k * step) / conv)}", input_size=(1, 8, 8)).plan
            assert stored(richer, relax) > target or stored(richer, relax) <= plan.totals.params_after, (relax, k)
    floor = analyze(model, "all", input_size=(1, 8, 8))
    assert matched_budget(model, floor.inspection, floor.plan.totals.params_after, Relaxation.parse("scale"),
                          Policy()) is None  # `all` is the most sharing there is: no room for a relaxation


def test_pareto_front() -> None:
    rows = [SweepRow("a", "", "", None, 1, 100, 0.5, 0.5, 0), SweepRow("b", "", "", None, 1, 200, 0.6, 0.6, 0),
            SweepRow("c", "", "", None, 1, 300, 0.55, 0.55, 0), SweepRow("d", "", "", None, 1, 100, 0.4, 0.4, 0)]
    assert [r.label for r in pareto(rows)] == ["a", "b"]


def test_cli_sweep_writes_json_and_plot(baseline: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    result = CliRunner().invoke(app, [
        "sweep", str(baseline), "--data", "digits", "--policies", "all,chunk:2", "--budgets", "0.6",
        "--relax", "none,scale,lora:auto", "--match", "chunk:2", "--epochs", "1", "--loss", "ce,kd", "--lr", "1e-3",
        "--seeds", "0,1", "--limit-train", "256", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["format"] == "kshare.sweep/1" and data["data"] == "digits"
    runs = {(r["label"], r["loss"], r["seed"]): r for r in data["rows"]}
    labels = {label for label, _, _ in runs}
    assert labels == {"untied", "all", "all+scale", "chunk:2", "chunk:2+scale", "budget:0.6", "budget:0.6+scale",
                      "budget:0.6+lora:auto", "budget≈chunk:2", "budget≈chunk:2+scale", "budget≈chunk:2+lora:auto"}
    assert runs[("budget≈chunk:2+lora:auto", "kd", 0)]["params"] <= runs[("chunk:2", "kd", 0)]["params"]
    for (label, loss, seed), r in runs.items():
        if label != "untied":
            assert loss in ("ce", "kd") and seed in (0, 1) and len(r["history"]) == 1 and 0 <= r["acc"] <= 1
            assert r["stored_bytes"] < runs[("untied", None, 0)]["stored_bytes"]
            assert r["acc_tied"] == runs[(label, "ce", 0)]["acc_tied"]  # one tying per point
    assert len(runs) == 1 + 2 * 2 * (len(labels) - 1)
    rows = {(r.label, r.loss): r for r in aggregate([SweepRow(**r) for r in data["rows"]])}
    matched, plain = rows[("budget≈chunk:2+scale", "kd")], rows[("chunk:2", "kd")]
    assert matched.params <= plain.params and matched.relax == "scale" and matched.runs == 2
    accs = [runs[("budget≈chunk:2+scale", "kd", s)]["acc"] for s in (0, 1)]
    assert matched.acc == pytest.approx(sum(accs) / 2) and matched.acc_sd == pytest.approx(abs(accs[0] - accs[1])
                                                                                           / 2 ** 0.5)
    assert rows[("all+scale", "ce")].params > rows[("all", "ce")].params
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == PNG_MAGIC and "Pareto front:" in result.output


def test_size_tolerance_admits_a_slightly_larger_plan(baseline: Path) -> None:
    model = kshare.load(baseline)
    analysis = analyze(model, "chunk:2", input_size=(1, 8, 8))
    target = analysis.plan.totals.params_after
    scale = Relaxation.parse("scale")
    strict = matched_budget(model, analysis.inspection, target, scale, Policy())
    loose = matched_budget(model, analysis.inspection, int(target * 1.3), scale, Policy())
    assert strict is not None and loose is not None
    assert stored(strict, "scale") <= target < stored(loose, "scale") <= target * 1.3


def test_matched_budget_fits_the_file_size_too(baseline: Path) -> None:
    model = kshare.load(baseline)
    analysis = analyze(model, "chunk:2", input_size=(1, 8, 8))
    target, limit = analysis.plan.totals.params_after, stored_size(model, analysis.plan)
    lora = Relaxation.parse("lora:1")
    by_params = matched_budget(model, analysis.inspection, target, lora, Policy())
    assert by_params is not None and stored_size(model, by_params) > limit  # each delta tensor costs a name too
    by_bytes = matched_budget(model, analysis.inspection, target, lora, Policy(), max_bytes=limit)
    assert by_bytes is not None and stored_size(model, by_bytes) <= limit
    assert by_bytes.totals.params_after < by_params.totals.params_after
    assert matched_budget(model, analysis.inspection, target, lora, Policy(), max_bytes=1000) is None


def test_auto_ranks_with_no_room_are_not_a_relaxed_point(baseline: Path) -> None:
    from kshare.sweep import SweepConfig, _points

    model = kshare.load(baseline)
    config = SweepConfig(policies=("all",), relaxations=("none", "lora:auto"), match=("all",), size_tolerance=0.01)
    points = {label: (plan, note) for label, plan, _, note in _points(model, config, (1, 8, 8))}
    assert "all+lora:auto" not in points  # a positional plan has no budget to spend on ranks
    plan, note = points["budget≈all+lora:auto"]  # `all` shares the most there is: nothing left for a delta
    assert plan is None and "no room for a delta" in note and points["budget≈all"][0] is not None


def test_cli_sweep_refuses_a_tied_checkpoint(tmp_path: Path) -> None:
    tied = tmp_path / "t.pt"
    kshare.save(kshare.tie(kshare.load_model("kshare:convmixer_32_4")[0], "all"), tied)
    result = CliRunner().invoke(app, ["sweep", str(tied), "--data", "digits"])
    assert result.exit_code == 2 and "already tied" in result.output
    result = CliRunner().invoke(app, ["sweep", "kshare:convmixer_32_4", "--data", "digits", "--loss", "mse"])
    assert result.exit_code == 2 and "unknown loss" in result.output
    result = CliRunner().invoke(app, ["sweep", "kshare:convmixer_32_4", "--data", "digits", "--seeds", "a"])
    assert result.exit_code == 2 and "--seeds" in result.output
    result = CliRunner().invoke(app, ["sweep", "kshare:convmixer_32_4", "--data", "digits", "--size-tolerance", "2"])
    assert result.exit_code == 2 and "tolerance" in result.output
