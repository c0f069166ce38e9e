"""Label-free recovery: distillation from the untied model on unlabelled images, judged on
held-out images after every epoch, the best epoch kept."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

import kshare
from kshare.cli import app
from kshare.data.feed import Adapter
from kshare.errors import DataError, TrainingError
from kshare.fit.fidelity import measure_fidelity
from kshare.models.zoo import load_model
from kshare.training.distill import DistillConfig, distill, random_views


def small_net() -> nn.Module:
    """A classifier with trained-like BatchNorm statistics and two isomorphic convs to share."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    gen = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(16, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(16, generator=gen) + 0.5)
    return net.eval()


def images(n: int, seed: int) -> torch.Tensor:
    return (torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


ADAPT = Adapter(3, None, (0.5,) * 3, (0.25,) * 3)


def test_settings_are_checked() -> None:
    for bad in ({"epochs": 0}, {"lr": 0.0}, {"crop_scale": 1.5}, {"batch_size": 1}, {"patience": True},
                {"temperature": float("nan")}):
        with pytest.raises(TrainingError):
            DistillConfig(**bad)  # type: ignore[arg-type]


def test_random_views_crop_and_flip_each_image_reproducibly() -> None:
    x = torch.rand(6, 3, 16, 20)
    a = random_views(x, torch.Generator().manual_seed(0), 0.5)
    b = random_views(x, torch.Generator().manual_seed(0), 0.5)
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.allclose(a, x)
    assert not torch.equal(a, random_views(x, torch.Generator().manual_seed(1), 0.5))


def test_distillation_brings_the_tied_model_back_and_keeps_the_best_epoch() -> None:
    teacher = small_net()
    student = kshare.tie(copy.deepcopy(teacher), "all", input_size=(3, 16, 16), init="mean")
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    held = [ADAPT(images(24, 99))]
    start = measure_fidelity(student, teacher, held)
    history = distill(student, teacher, images(96, 0), ADAPT, held,
                      DistillConfig(epochs=6, lr=3e-3, batch_size=16, patience=6))
    assert history[0].epoch == 0 and history[0].fidelity.kl == pytest.approx(start.kl)
    kept = max((e for e in history if e.best), key=lambda e: e.epoch)
    now = measure_fidelity(student, teacher, held)
    assert now.kl == pytest.approx(kept.fidelity.kl, rel=1e-5, abs=1e-7)  # the kept epoch's weights are the model's
    assert kept.epoch > 0 and now.kl < 0.5 * start.kl  # it learned: half the KL gone at least
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_teacher.items())  # teacher untouched
    assert all(p.requires_grad for p in teacher.parameters())
    assert kshare.plan_of(student) is not None and student[3].weight is student[6].weight  # still tied


def test_an_epoch_that_makes_things_worse_is_not_kept() -> None:
    teacher = small_net()
    student = kshare.tie(copy.deepcopy(teacher), "all", input_size=(3, 16, 16), init="mean")
    held = [ADAPT(images(16, 98))]
    start = measure_fidelity(student, teacher, held)
    history = distill(student, teacher, images(32, 0), ADAPT, held,
                      DistillConfig(epochs=4, lr=1.0, batch_size=8, patience=2))  # far too large a step
    assert not any(e.best for e in history[1:]) and len(history) == 3  # stopped after 2 epochs without a better one
    assert measure_fidelity(student, teacher, held).kl == pytest.approx(start.kl, rel=1e-6)


def test_retrofit_distils_from_a_dataloader_of_unlabelled_images() -> None:
    model = small_net()
    loader = DataLoader(TensorDataset(images(120, 3)), batch_size=40)  # (images,) batches: no labels
    report = kshare.retrofit(model, "all", loader, input_size=(3, 16, 16), held_out=24, costs_of_groups=False,
                             distill=DistillConfig(epochs=3, lr=3e-3, batch_size=16))
    names = [s.name for s in report.steps]
    assert names[-1].startswith("distilled (epoch") and len(report.distillation) >= 2
    fitted, distilled = report.step("fitted").fidelity, report.final.fidelity  # type: ignore[union-attr]
    assert distilled.kl <= fitted.kl  # never worse on the held-out images than before it
    record = report.record()["distillation"]
    assert record[0]["epoch"] == 0 and record[0]["loss"] is None and json.dumps(record)
    with pytest.raises(DataError, match="held-out"):
        kshare.retrofit(small_net(), "all", images(40, 4), input_size=(3, 16, 16), held_out=0,
                        distill=DistillConfig(epochs=1))
    detector, _ = load_model("ssdlite320_mobilenet_v3_large")
    with pytest.raises(DataError, match="detector"):
        kshare.retrofit(detector, "stage", images(8, 5), distill=DistillConfig(epochs=1))


def test_the_cli_retrofits_from_unlabelled_photos_with_distillation(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, picture in enumerate(images(40, 7)):
        Image.fromarray(picture.permute(1, 2, 0).numpy()).resize((40, 32)).save(folder / f"{i}.png")
    out = tmp_path / "r.pt"
    result = CliRunner().invoke(app, ["retrofit", "resnet18", "-k", "num_classes=10", "-g", "stage", "--data",
                                      f"images:{folder}", "--image-size", "32", "--held-out", "10",
                                      "--fit-images", "30", "--distill-epochs", "2", "--distill-batch", "10",
                                      "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "distillation, held-out KL by epoch" in result.output
    result = CliRunner().invoke(app, ["info", str(out), "--json"])
    steps = json.loads(result.stdout)["retrofit"]["steps"]
    assert steps[-1]["name"].startswith("distilled") and steps[-1]["fidelity"]["images"] == 10
    bad = CliRunner().invoke(app, ["retrofit", "resnet18", "--data", f"images:{folder}", "--distill-epochs", "-1",
                                   "--out", str(out)])
    assert bad.exit_code == 2 and bad.output.count("error:") == 1
    for flags, named in ((["--distill-lr", "0"], "--distill-lr"), (["--distill-batch", "1"], "--distill-batch"),
                         (["--patience", "0"], "--patience")):  # the distillation's own flags, not the fine-tune's
        bad = CliRunner().invoke(app, ["retrofit", "resnet18", "--data", f"images:{folder}", "--distill-epochs", "2",
                                       *flags, "--out", str(out)])
        assert bad.exit_code == 2 and bad.output.count("error:") == 1 and named in bad.output, bad.output
