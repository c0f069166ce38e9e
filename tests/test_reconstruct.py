"""Block reconstruction after the closed-form fit: which blocks train together, that the
untied outputs are really approached (on a trained network, against the fit alone), that
nothing outside the units moves, and what the reconstructed model does on save and load."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import make_residual_bn_used
from torch import nn
from typer.testing import CliRunner

import kshare
from kshare import FitConfig, fit_and_tie
from kshare.cli import app
from kshare.data import adapter_for
from kshare.errors import TrainingError
from kshare.fit.blocks import held_out_images, reconstruct, reconstruction_units
from kshare.fit.features import FeatureTaps, feature_loss, feature_points
from kshare.fit.statistics import fit_batches
from kshare.models.zoo import load_model
from kshare.surgery.tie import verify_tied


class Blocks(nn.Module):
    """Blocks whose sharing groups interleave: 3x3 in blocks 0 and 2, 1x1 in 1 and 3, 5x5 in 4 and 5."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, k, padding=k // 2), nn.ReLU())
                                    for k in (3, 1, 3, 1, 5, 5))
        self.stem = nn.Conv2d(1, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return x.mean((1, 2, 3))


def test_units_hold_whole_groups() -> None:
    resnet = kshare.tie(load_model("resnet18", kwargs={"num_classes": 10})[0], "stage")
    assert reconstruction_units(resnet) == [[f"layer{s}.0", f"layer{s}.1"] for s in range(1, 5)]
    mixer = load_model("kshare:convmixer_64_4", kwargs={"in_chans": 1, "kernel_size": 5, "patch_size": 2})[0]
    mixer = kshare.tie(mixer, "all")
    assert len(feature_points(mixer)) == 8 and reconstruction_units(mixer) == [feature_points(mixer)]  # one group
    # 0–2 and 1–3 overlap, so blocks 0 to 3 train together; 4 and 5 on their own
    assert reconstruction_units(kshare.tie(Blocks(), "all", input_size=(1, 8, 8))) == [
        [f"blocks.{i}" for i in range(4)], ["blocks.4", "blocks.5"]]


def _block_error(model: nn.Module, original: nn.Module, batches: list[torch.Tensor]) -> float:
    points = feature_points(model)
    taps = FeatureTaps(model, points, "student"), FeatureTaps(original, points, "teacher")
    errors = []
    for x in batches:
        for tap in taps:
            tap.on = True
        with torch.no_grad():
            model.eval()(x)
            original.eval()(x)
        errors.append(feature_loss(taps[0].take(), taps[1].take()).item())
    for tap in taps:
        tap.remove()
    return sum(errors) / len(errors)


@torch.no_grad()
def _output_error(model: nn.Module, original: nn.Module, batches: list[torch.Tensor]) -> float:
    errors = [feature_loss({"out": model.eval()(x)}, {"out": original.eval()(x)}).item() for x in batches]
    return sum(errors) / len(errors)


def test_reconstruction_approaches_the_untied_outputs(trained: nn.Module, digits) -> None:
    train, test = digits
    plan = kshare.plan(trained, "all", input_size=(1, 8, 8))
    fitted = copy.deepcopy(trained)
    fit_and_tie(fitted, plan, train, FitConfig(images=256))
    rebuilt = copy.deepcopy(trained)
    rebuilt.stem[0].weight.requires_grad_(False)  # a frozen parameter stays frozen, and unchanged
    report = fit_and_tie(rebuilt, plan, train, FitConfig(images=256, reconstruct=60))
    assert [u.blocks for u in report.reconstructed] == [("blocks.0", "blocks.1", "blocks.2")]
    unit = report.reconstructed[0]
    assert unit.steps == 60 and unit.error < 0.9 * unit.start_error
    assert unit.kept and unit.network_error < 0.8 * unit.network_start_error  # the whole network's output came closer
    assert unit.parameters == sum(p.numel() for p in rebuilt.blocks.parameters())  # the shared kernel once
    calib = fit_batches(train, 256, 128, adapter_for(trained, train), torch.device("cpu"))
    held_out = [adapter_for(trained, test)(test.images[i:i + 128]) for i in range(0, 384, 128)]
    for batches in (calib, held_out):  # better than the closed form alone, on images it never saw too
        assert _block_error(rebuilt, trained, batches) < _block_error(fitted, trained, batches)
        assert _output_error(rebuilt, trained, batches) < 0.9 * _output_error(fitted, trained, batches)
    torch.testing.assert_close(rebuilt.stem[0].weight, fitted.stem[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(rebuilt.head.weight, fitted.head.weight, rtol=0, atol=0)  # outside every unit
    assert not rebuilt.stem[0].weight.requires_grad and rebuilt.blocks[0][0].weight.requires_grad
    assert all(p.grad is None for p in rebuilt.parameters())
    verify_tied(rebuilt)  # still one kernel per group
    assert rebuilt.blocks[0][0].weight is rebuilt.blocks[2][0].weight
    acc = {name: kshare.evaluate(m, test)["acc"] for name, m in (("fitted", fitted), ("rebuilt", rebuilt))}
    assert acc["rebuilt"] >= acc["fitted"] - 0.01, acc


def test_reconstructed_models_round_trip(trained: nn.Module, digits, tmp_path: Path) -> None:
    train, test = digits
    model = kshare.tie(copy.deepcopy(trained), "all", input_size=(1, 8, 8), calib=train,
                       fit=FitConfig(images=128, reconstruct=10), relax="lora:2")
    x = adapter_for(model, test)(test.images[:16])
    model.eval()
    with torch.no_grad():
        expected = model(x)
    kshare.save(model, tmp_path / "m.pt")
    loaded = kshare.load(tmp_path / "m.pt", make_residual_bn_used(in_chans=1, width=16, depth=3)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(kshare.fold(loaded)(x), expected, rtol=1e-5, atol=1e-5)


def test_training_mode_is_restored_and_bad_settings_are_refused(trained: nn.Module, digits) -> None:
    train, _ = digits
    model = kshare.tie(copy.deepcopy(trained), "all", input_size=(1, 8, 8)).train()
    batches = fit_batches(train, 64, 64, adapter_for(trained, train), torch.device("cpu"))
    running = model.blocks[0][1].running_mean.clone()
    reconstruct(model, trained, batches, steps=2)
    assert model.training and not trained.training
    torch.testing.assert_close(model.blocks[0][1].running_mean, running, rtol=0, atol=0)  # eval mode: stats kept
    for bad in ({"steps": 0}, {"steps": 2, "lr": float("nan")}, {"steps": 2, "batch_size": 0},
                {"steps": 2, "output_weight": -1.0}):
        with pytest.raises(TrainingError):
            reconstruct(model, trained, batches, **bad)  # type: ignore[arg-type]
    with pytest.raises(TrainingError, match="calibration images"):
        reconstruct(model, trained, [], steps=2)
    for bad_config in ({"reconstruct": -1}, {"reconstruct": True}, {"reconstruct_lr": 0.0},
                       {"reconstruct_lr": float("inf")}):
        with pytest.raises(TrainingError, match="reconstruct"):
            FitConfig(**bad_config)  # type: ignore[arg-type]


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_cli_apply_and_retrofit_reconstruct(trained: nn.Module, tmp_path: Path) -> None:
    base = tmp_path / "base.pt"
    kshare.save(trained, base)
    factory = f"{Path(__file__).parent / 'conftest.py'}:make_residual_bn_used"
    model = (factory, "-k", "in_chans=1", "-k", "width=16", "--weights", base, "-g", "all")
    code, out = cli("apply", *model, "--fit", "data", "--data", "digits", "--calib-images", "128",
                    "--reconstruct", "5", "--out", tmp_path / "a.pt")
    assert code == 0, out
    assert "reconstructed 1 unit(s) of blocks, 5 steps each on 128 images" in out and "block output error" in out
    code, out = cli("retrofit", *model, "--data", "digits", "--calib-images", "128", "--reconstruct", "20", "--json",
                    "--out", tmp_path / "r.pt")
    assert code == 0, out
    report = json.loads(out.strip().splitlines()[-1])
    steps = [s["step"] for s in report["steps"]]
    assert steps[-2:] == ["BatchNorm recalibrated", "blocks reconstructed"], steps
    (unit,) = report["fit"]["reconstructed"]
    assert unit["steps"] == 20 and unit["error"] < unit["start_error"] and unit["images"] == 128
    # more images for the reconstruction than for the fit: the same seeded order, extended
    code, out = cli("retrofit", *model, "--data", "digits", "--calib-images", "128", "--reconstruct", "5",
                    "--reconstruct-images", "700", "--json", "--out", tmp_path / "r2.pt")
    assert code == 0, out
    (unit,) = json.loads(out.strip().splitlines()[-1])["fit"]["reconstructed"]
    assert unit["images"] == 700 and unit["steps"] == 5
    for bad, words in ((("--reconstruct-images", "0", "--reconstruct", "5"), "--reconstruct-images"),
                       (("--reconstruct-images", "300"), "--reconstruct STEPS"),
                       (("--reconstruct-images", "100000", "--reconstruct", "5"), "reconstruction for more")):
        code, out = cli("retrofit", *model, "--data", "digits", "--calib-images", "128", *bad, "--out",
                        tmp_path / "bad.pt")
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and words in errors[0], (bad, out)
    for bad, flag in ((("--reconstruct", "-1", "--fit", "data", "--data", "digits"), "--reconstruct"),
                      (("--reconstruct", "5"), "--fit data")):
        code, out = cli("apply", *model, *bad, "--out", tmp_path / "bad.pt")
        assert code == 2 and out.strip().startswith("error:") and flag in out, out
        assert len(out.strip().splitlines()) == 1 and not (tmp_path / "bad.pt").exists()
    code, out = cli("retrofit", *model, "--data", "digits", "--reconstruct", "-3", "--out", tmp_path / "bad.pt")
    assert code == 2 and "--reconstruct" in out and "untied" not in out, out  # refused before any work


def test_steps_that_worsen_the_networks_output_are_undone(digits, tmp_path: Path, caplog) -> None:
    """A 16-channel ConvMixer tied `all` cannot come close to its blocks: matching them alone shrinks
    the outputs, every block's error falls and the network's output gets worse. The guard undoes
    that; with the network's output in the loss (the default) the steps help and are kept."""
    train, test = digits
    torch.manual_seed(0)
    model = load_model("kshare:convmixer_16_3", kwargs={"in_chans": 1, "kernel_size": 3, "patch_size": 1})[0]
    kshare.finetune(model, train, test, kshare.TrainConfig(epochs=4, lr=3e-3, batch_size=64), tmp_path / "m.pt",
                    device="cpu")
    model.eval()
    fitted = copy.deepcopy(model)
    fit_and_tie(fitted, kshare.plan(model, "all", input_size=(1, 8, 8)), train, FitConfig(images=128))
    batches = fit_batches(train, 128, 128, adapter_for(model, train), torch.device("cpu"))
    blocks_only = copy.deepcopy(fitted)
    with caplog.at_level("WARNING", logger="kshare.fit.blocks"):
        (unit,) = reconstruct(blocks_only, model, batches, steps=100, output_weight=0.0)
    assert unit.error < unit.start_error and unit.network_error > unit.network_start_error and not unit.kept
    assert "undone" in caplog.text
    for a, b in zip(blocks_only.state_dict().values(), fitted.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # exactly the fit it started from
    with_output = copy.deepcopy(fitted)
    (unit,) = reconstruct(with_output, model, batches, steps=100)
    assert unit.kept and unit.network_error < 0.8 * unit.network_start_error
    accuracy = {name: kshare.evaluate(m, test)["acc"] for name, m in (("fit", fitted), ("rebuilt", with_output))}
    assert accuracy["rebuilt"] > accuracy["fit"], accuracy


def test_units_are_judged_on_images_the_fit_never_saw(digits) -> None:
    train, _ = digits
    taken = train.subset(300, seed=4)
    rest = train.beyond(300, 200, seed=4)
    assert rest is not None and len(rest.labels) == 200
    assert torch.bincount(rest.labels).tolist() == [20] * 10  # still class-balanced
    seen = {bytes(x.numpy()) for x in taken.images}
    assert not any(bytes(x.numpy()) in seen for x in rest.images)  # disjoint from the calibration sample
    assert train.beyond(len(train.labels), 10) is None
    whole = train.subset(500, seed=4)  # a larger sample of the same seed holds the smaller one and the next
    assert {bytes(x.numpy()) for x in whole.images} >= seen
    batches = held_out_images(train, 300, adapter_for(make_residual_bn_used(in_chans=1, width=16, depth=3), train),
                              torch.device("cpu"), seed=4)
    assert batches is not None and sum(len(b) for b in batches) == 256
