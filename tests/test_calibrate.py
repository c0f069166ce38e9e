"""BatchNorm recalibration after tying: exact statistics, nothing else touched, accuracy back."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import kshare
from kshare.cli import app
from kshare.data import Adapter
from kshare.fit.batchnorm import batch_norms, recalibrate_bn
from kshare.sweep import SweepConfig, run_sweep


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model, _ = kshare.load_model("kshare:convmixer_32_4", {"in_chans": 1})
    path = tmp_path_factory.mktemp("calibrate") / "base.pt"
    kshare.finetune(model, kshare.load_data("digits", "train"), kshare.load_data("digits", "test"),
                    kshare.TrainConfig(epochs=3, lr=3e-3, batch_size=64), path)
    return path


def test_running_statistics_are_those_of_the_calibration_images(trained: Path) -> None:
    model = kshare.tie(kshare.load(trained), "all", init="mean")
    data = kshare.load_data("digits", "train")
    adapter = Adapter.for_model(data, 1, None, augment=False)
    first = batch_norms(model)[0]
    momentum = first.momentum
    seen: list[torch.Tensor] = []
    hook = first.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    assert recalibrate_bn(model, data, images=256, batch_size=64, adapter=adapter) == len(batch_norms(model))
    hook.remove()
    assert len(seen) == 4 and all(len(x) == 64 for x in seen)  # 256 images in equal batches
    x = torch.cat(seen)
    torch.testing.assert_close(first.running_mean, x.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    per_batch_var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in seen])
    torch.testing.assert_close(first.running_var, per_batch_var.mean(0), atol=1e-5, rtol=1e-4)
    assert int(first.num_batches_tracked) == 4
    assert first.momentum == momentum and not model.training and not first.training
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n  # statistics only: no weight moved
    plan = kshare.plan_of(model)
    assert plan is not None
    group = plan.groups[0]
    modules = dict(model.named_modules())
    assert all(modules[m].weight is modules[group.members[0]].weight for m in group.members)


def test_recalibration_recovers_accuracy_after_tying(trained: Path) -> None:
    base = kshare.load(trained)
    train, test = kshare.load_data("digits", "train"), kshare.load_data("digits", "test")
    tied = kshare.tie(copy.deepcopy(base), "chunk:2", init="mean")
    before = kshare.evaluate(tied, test)["acc"]
    recalibrate_bn(tied, train)
    after = kshare.evaluate(tied, test)["acc"]
    assert after > before + 0.05, (before, after)


def test_a_model_without_batchnorm_is_left_alone(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    state = copy.deepcopy(model.state_dict())
    assert recalibrate_bn(model, kshare.load_data("digits", "train"), images=64) == 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    path = tmp_path / "plain.pt"
    kshare.save(kshare.load_model("squeezenet1_0", {"num_classes": 10})[0], path)  # no BatchNorm at all
    result = CliRunner().invoke(app, ["recalibrate", str(path), "--data", "digits"])
    assert result.exit_code == 2 and "no BatchNorm" in result.output
    result = CliRunner().invoke(app, ["recalibrate", str(path), "--data", "digits", "--images", "0"])
    assert result.exit_code == 2 and "--images" in result.output


def test_cli_calibrate_writes_the_recalibrated_checkpoint(trained: Path, tmp_path: Path) -> None:
    tied_path, out = tmp_path / "tied.pt", tmp_path / "cal.pt"
    kshare.save(kshare.tie(kshare.load(trained), "chunk:2", init="mean"), tied_path)
    result = CliRunner().invoke(app, ["recalibrate", str(tied_path), "--data", "digits", "--images", "512",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "recalibrated" in result.output and "512 digits images" in result.output
    direct = kshare.load(tied_path)
    recalibrate_bn(direct, kshare.load_data("digits", "train"), images=512)
    loaded = kshare.load(out)
    for a, b in zip(batch_norms(direct), batch_norms(loaded), strict=True):
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
    assert kshare.plan_of(loaded) is not None
    before, after = (float(x) for x in result.output.split("test acc ")[1].split(";")[0].split(" → "))
    assert after == pytest.approx(kshare.evaluate(loaded, kshare.load_data("digits", "test"))["acc"], abs=1e-4)
    assert before == pytest.approx(kshare.evaluate(kshare.load(tied_path), kshare.load_data("digits", "test"))["acc"],
                                   abs=1e-4)


def test_sweep_calibrates_each_tied_copy(trained: Path, tmp_path: Path) -> None:
    model = kshare.load(trained)
    train, test = kshare.load_data("digits", "train"), kshare.load_data("digits", "test")
    plain = run_sweep(model, train, test, SweepConfig(policies=("chunk:2",)), tmp_path / "a.json")
    calibrated = run_sweep(model, train, test, SweepConfig(policies=("chunk:2",), calibrate=512), tmp_path / "b.json")
    manual = kshare.tie(copy.deepcopy(model), "chunk:2", init="mean")
    recalibrate_bn(manual, train, images=512)
    assert calibrated[1].acc_tied == pytest.approx(kshare.evaluate(manual, test)["acc"])
    assert calibrated[1].acc_tied != plain[1].acc_tied
    with pytest.raises(kshare.KShareError, match="calibration"):
        SweepConfig(calibrate=-1)
