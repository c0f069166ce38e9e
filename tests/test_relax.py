"""Relaxed sharing (scale, lora:R): counts, fitting, training, storage, export and fold."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import kshare
from kshare.cli import app
from kshare.errors import PlanError
from kshare.kernels import shared_kernel
from kshare.planning.relaxation import Relaxation
from kshare.surgery.fold import fold
from kshare.surgery.tie import verify_tied

RELAXATIONS = ["scale", "lora:4", "scale+lora:4"]


def mixer() -> nn.Module:
    torch.manual_seed(0)
    return kshare.load_model("kshare:convmixer_32_4")[0].eval()


def members(model: nn.Module) -> list[list[nn.Module]]:
    modules = dict(model.named_modules())
    plan = kshare.plan_of(model)
    assert plan is not None
    return [[modules[m] for m in g.members] for g in plan.groups]


def test_parse() -> None:
    assert Relaxation.parse("scale+lora:8") == Relaxation(True, 8)
    assert Relaxation.parse(None).name == "none" and Relaxation.parse("lora:2").name == "lora:2"
    assert Relaxation.parse("scale+lora:auto") == Relaxation(True, 0, True)
    assert Relaxation.parse("lora:auto").name == "lora:auto"
    for bad in ("lora:0", "lora:x", "scale+scale", "shift", "lora:auto+lora:2", "lora:2+lora:auto"):
        with pytest.raises(PlanError):
            Relaxation.parse(bad)


@pytest.mark.parametrize("relax", RELAXATIONS)
def test_counts_see_every_relaxation_parameter(relax: str) -> None:
    model = kshare.tie(mixer(), "all", init="mean", relax=relax)
    plan = kshare.plan_of(model)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert plan.totals.params_after == sum(unique.values())
    r = Relaxation.parse(relax)
    expected = sum(r.params_per_member(convs[0].weight.shape) for convs in members(model) for _ in convs)
    assert plan.relax == relax and plan.relax_params == expected > 0
    for convs in members(model):  # one stored kernel per group, but every member computes its own
        assert all(shared_kernel(c) is shared_kernel(convs[0]) for c in convs)


def test_fitted_deltas_reduce_reconstruction_error_monotonically() -> None:
    original = mixer()
    kernels = {n: m.weight.detach().clone() for n, m in original.named_modules() if isinstance(m, nn.Conv2d)}
    errors = []
    for relax in ("none", "scale", "scale+lora:2", "scale+lora:8", "scale+lora:32"):
        model = kshare.tie(copy.deepcopy(original), "all", init="mean", relax=relax, share_bias=False)
        modules = dict(model.named_modules())
        grouped = [m for g in kshare.plan_of(model).groups for m in g.members]
        with torch.no_grad():
            errors.append(sum(float((modules[m].weight - kernels[m]).square().sum()) for m in grouped))
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-8  # rank 32 is full rank for these 32-channel kernels: exact again
    full = kshare.tie(copy.deepcopy(original), "all", init="mean", relax="scale+lora:32", share_bias=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(full(x), original(x), rtol=1e-5, atol=1e-5)


def test_training_step_keeps_the_shared_kernel_shared() -> None:
    model = kshare.tie(mixer().train(), "all", init="mean", relax="scale+lora:4")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [shared_kernel(g[0]).detach().clone() for g in members(model)]
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,))).backward()
        opt.step()
    verify_tied(model)
    for convs, old in zip(members(model), before, strict=True):
        assert not torch.equal(shared_kernel(convs[0]), old)  # it trained
        assert all(shared_kernel(c) is shared_kernel(convs[0]) for c in convs)
        assert convs[0].parametrizations.weight[0].scale.grad is not None


@pytest.mark.parametrize("relax", RELAXATIONS)
def test_save_load_and_fold_round_trip(relax: str, tmp_path: Path) -> None:
    model = kshare.tie(mixer(), "all", init="mean", relax=relax)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    kshare.save(model, tmp_path / "r.pt")
    untied = copy.deepcopy(mixer())
    torch.save(untied.state_dict(), tmp_path / "plain.pt")
    assert (tmp_path / "r.pt").stat().st_size < 0.8 * (tmp_path / "plain.pt").stat().st_size
    loaded = kshare.load(tmp_path / "r.pt").eval()
    assert kshare.plan_of(loaded).relax == relax
    verify_tied(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    folded = fold(loaded)
    assert kshare.plan_of(folded) is None
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert all(type(c) is nn.Conv2d for c in convs)
    assert len({id(c.weight) for c in convs}) == len(convs)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-6)


def test_relaxed_onnx_keeps_one_shared_kernel(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    model = kshare.tie(mixer(), "all", init="mean", relax="scale+lora:4")
    kshare.export_onnx(model, tmp_path / "r.onnx", input_size=(3, 32, 32))
    graph = onnx.load(str(tmp_path / "r.onnx")).graph
    stored = sum(int(np.prod(i.dims)) for i in graph.initializer)
    unique = {id(t): t.numel() for t in [*model.parameters(), *model.buffers()] if t.dtype.is_floating_point}
    assert stored <= sum(unique.values())  # no member's kernel was precomputed into its own initializer
    x = torch.randn(2, 3, 32, 32)
    out = ort.InferenceSession(str(tmp_path / "r.onnx")).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_untie_refused_and_finetune_keeps_relaxation(tmp_path: Path) -> None:
    model = kshare.tie(mixer(), "all", init="mean", relax="scale")
    with pytest.raises(PlanError, match="fold"):
        kshare.untie(model)
    data = kshare.load_data("digits", "train").subset(256)
    kshare.finetune(model, data, data.subset(64), kshare.TrainConfig(epochs=1, batch_size=64),
                    tmp_path / "ft.pt")
    loaded = kshare.load(tmp_path / "ft.pt")
    assert kshare.plan_of(loaded).relax == "scale"
    verify_tied(loaded)


def test_cli_apply_relax_info_and_fold(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "r.pt"
    result = runner.invoke(app, ["apply", "kshare:convmixer_32_4", "--init", "mean", "--relax", "scale+lora:2",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "relaxation scale+lora:2 included" in result.output
    info = runner.invoke(app, ["info", str(out)], env={"COLUMNS": "200"})
    assert "relaxation scale+lora:2" in info.output
    folded = tmp_path / "f.pt"
    result = runner.invoke(app, ["fold", str(out), "--out", str(folded)])
    assert result.exit_code == 0, result.output
    assert kshare.plan_of(kshare.load(folded)) is None
    bad = runner.invoke(app, ["apply", "kshare:convmixer_32_4", "--relax", "lora:-1", "--out", str(out)])
    assert bad.exit_code == 2 and "bad relaxation" in bad.output
    plain = tmp_path / "plain.pt"
    kshare.save(mixer(), plain)
    bad = runner.invoke(app, ["fold", str(plain), "--out", str(folded)])
    assert bad.exit_code == 2 and "nothing to fold" in bad.output


def _stored(model: nn.Module) -> int:
    return sum({id(p): p.numel() for p in model.parameters()}.values())


def test_counts_stay_true_when_the_rank_is_clamped_or_the_plan_carried_another_relaxation() -> None:
    depthwise = nn.Sequential(*[nn.Conv2d(4, 4, 3, padding=1, groups=4) for _ in range(3)])  # kernel 4 × 9
    model = kshare.tie(copy.deepcopy(depthwise), "all", relax="lora:16", input_size=(4, 8, 8))
    assert kshare.plan_of(model).totals.params_after == _stored(model)  # rank 4 at most, counted as 4
    scaled = kshare.plan_of(kshare.tie(mixer(), "all", relax="scale"))
    for relax in ("lora:2", "none"):  # a ready plan counting `scale`, tied with something else
        model = kshare.tie(mixer(), scaled, relax=relax)
        plan = kshare.plan_of(model)
        assert plan.relax == relax and plan.totals.params_after == _stored(model), relax


@pytest.mark.parametrize("relax", ["scale", "lora:1"])
def test_a_budget_counts_the_relaxation(relax: str) -> None:
    model = mixer()
    conv_before = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    kshare.tie(model, "budget:0.5", relax=relax)
    plan = kshare.plan_of(model)
    conv_after = sum({id(p): p.numel() for m in model.modules() if isinstance(m, nn.Conv2d)
                      for p in m.parameters()}.values())
    assert plan.policy == "budget:0.5" and plan.relax == relax and plan.relax_params > 0
    assert conv_after == plan.totals.conv_params_after <= 0.5 * conv_before
    assert plan.totals.params_after == _stored(model)
    plain = kshare.plan(mixer(), "budget:0.5")
    assert plan.totals.conv_params_after - plan.relax_params <= plain.totals.conv_params_after  # kernels pay for it


def test_cli_budget_ties_with_the_mean_and_analyze_counts_relaxations(tmp_path: Path) -> None:
    out = tmp_path / "b.pt"
    result = CliRunner().invoke(app, ["apply", "kshare:convmixer_32_4", "-g", "budget:0.4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    torch.manual_seed(0)  # apply's default --seed: the same random init
    untied = kshare.load_model("kshare:convmixer_32_4")[0]
    tied = kshare.load(out)
    plan, ref = kshare.plan_of(tied), dict(untied.named_modules())
    modules = dict(tied.named_modules())
    for g in plan.groups:
        assert g.init == "mean"
        expected = torch.stack([ref[m].weight.detach() for m in g.members]).mean(0)
        torch.testing.assert_close(modules[g.members[0]].weight.detach(), expected)
    for relax in ("none", "lora:2"):
        args = ["analyze", "kshare:convmixer_32_4", "-g", "stage", "--relax", relax, "--json"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        shown = kshare.SharingPlan.from_json(result.output)
        model = kshare.tie(kshare.load_model("kshare:convmixer_32_4")[0], "stage", relax=relax)
        assert shown.relax == relax and shown.totals.params_after == _stored(model)


def test_lora_starts_as_the_truncated_svd_of_the_residual() -> None:
    original = mixer()
    kernels = {n: m.weight.detach().clone() for n, m in original.named_modules() if isinstance(m, nn.Conv2d)}
    model = kshare.tie(copy.deepcopy(original), "all", init="mean", relax="lora:3")
    modules = dict(model.named_modules())
    for group in kshare.plan_of(model).groups:
        shared = shared_kernel(modules[group.members[0]]).detach().double().flatten(1)
        for name in group.members:
            delta = modules[name].parametrizations.weight[0]
            residual = kernels[name].double().flatten(1) - shared
            u, s, vh = torch.linalg.svd(residual, full_matrices=False)
            best = (u[:, :3] * s[:3]) @ vh[:3]  # Eckart–Young: the best rank-3 approximation
            torch.testing.assert_close((delta.lora_a @ delta.lora_b).double(), best, rtol=1e-4, atol=1e-6)


def test_relaxed_model_through_safetensors_and_compile(tmp_path: Path) -> None:
    model = kshare.tie(mixer(), "stage", init="mean", relax="scale+lora:2")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    kshare.export_safetensors(model, tmp_path / "r.safetensors")
    loaded = kshare.load(tmp_path / "r.safetensors").eval()
    assert kshare.plan_of(loaded).relax == "scale+lora:2"
    verify_tied(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)

    compiled = torch.compile(loaded)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)
    eager = copy.deepcopy(loaded).train()
    loaded.train()
    grads = []
    for net, run in ((eager, eager), (loaded, torch.compile(loaded))):
        net.zero_grad()
        run(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():  # the shared kernel's and every delta's gradient, compiled as eager
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-3, atol=1e-5, msg=name)
