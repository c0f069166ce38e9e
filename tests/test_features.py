"""Feature matching in the fine-tune: which block outputs are matched, the loss by value, and a
run that really pulls the tied student's blocks towards the untied teacher's."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import kshare
from kshare.data import load_data
from kshare.errors import TrainingError
from kshare.fit.features import FeatureTaps, feature_loss, feature_points, matched_features
from kshare.models.zoo import load_model
from kshare.training.config import TrainConfig
from kshare.training.loop import finetune


def small_mixer() -> nn.Module:
    torch.manual_seed(0)
    return load_model("kshare:convmixer_64_4", kwargs={"in_chans": 1, "kernel_size": 5, "patch_size": 2})[0]


def test_points_are_the_blocks_holding_tied_convs() -> None:
    resnet = kshare.tie(load_model("resnet18", kwargs={"num_classes": 10})[0], "stage")
    assert feature_points(resnet) == [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    flat = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    # a flat stack: the parent of each tied conv is the whole network, so the convs themselves are matched
    assert feature_points(kshare.tie(flat, "all")) == ["2", "4"]
    with pytest.raises(TrainingError, match="not tied"):
        feature_points(small_mixer())


def test_feature_loss_by_value() -> None:
    torch.manual_seed(0)
    t = {"a": torch.randn(4, 3, 5, 5), "b": 10 * torch.randn(4, 7)}
    s = {"a": t["a"] + 0.1 * torch.randn(4, 3, 5, 5), "b": t["b"] * 1.5}
    expected = ((s["a"] - t["a"]).pow(2).mean() / t["a"].pow(2).mean() + 0.25) / 2  # b: (0.5 t)² / t² = 0.25
    assert feature_loss(s, t).item() == pytest.approx(expected.item(), rel=1e-5)
    assert feature_loss(t, t).item() == 0.0
    with pytest.raises(TrainingError, match="untied original"):
        feature_loss({"a": torch.zeros(4, 3)}, {"a": torch.zeros(4, 4)})


def _block_error(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    points = feature_points(student)
    taps = FeatureTaps(student, points, "student"), FeatureTaps(teacher, points, "teacher")
    for tap in taps:
        tap.on = True
    with torch.no_grad():
        student.eval()(x)
        teacher.eval()(x)
    error = feature_loss(taps[0].take(), taps[1].take()).item()
    for tap in taps:
        tap.remove()
    return error


def test_feature_matching_pulls_blocks_towards_the_teacher(tmp_path: Path) -> None:
    train, test = load_data("digits", "train"), load_data("digits", "test")
    teacher = small_mixer()  # trained, with BatchNorm statistics that describe its own activations (as a
    finetune(teacher, train, test, TrainConfig(epochs=2, lr=3e-3, batch_size=128), tmp_path / "teacher.pt")
    kshare.recalibrate_bn(teacher, train)  # converged network has them: the teacher runs in eval mode)
    x = ((test.images[:256].float() / 255 - 0.5) / 0.5)
    tied = kshare.tie(copy.deepcopy(teacher), "all")
    start = _block_error(tied, teacher, x)
    errors = {}
    for weight in (0.0, 5.0):
        student = copy.deepcopy(tied)
        config = TrainConfig(epochs=8, lr=1e-2, batch_size=128, feature_weight=weight, seed=0)
        finetune(student, train, test, config, tmp_path / f"w{weight:g}.pt", teacher=teacher)
        errors[weight] = _block_error(student, teacher, x)
        # the taps are gone: nothing the run added stays on the user's modules
        assert not any(m._forward_hooks for m in [*student.modules(), *teacher.modules()])
    # cross-entropy alone moves the blocks anywhere; matching brings them closer than they started
    # (measured: 1.19 at the start, 1.64 after cross-entropy alone, 0.94 with matching)
    assert errors[5.0] < 0.9 * start and errors[5.0] < 0.7 * errors[0.0], (start, errors)


def test_feature_matching_needs_a_teacher_and_a_tied_student(tmp_path: Path) -> None:
    data = load_data("digits", "test")
    with pytest.raises(TrainingError, match="teacher"):
        finetune(kshare.tie(small_mixer(), "all"), data, data, TrainConfig(feature_weight=1.0), tmp_path / "x.pt")
    with pytest.raises(TrainingError, match="not tied"):
        finetune(small_mixer(), data, data, TrainConfig(feature_weight=1.0), tmp_path / "x.pt",
                 teacher=small_mixer())
    with pytest.raises(TrainingError, match="feature_weight"):
        TrainConfig(feature_weight=-1.0)
    tied = kshare.tie(small_mixer(), "all")
    with pytest.raises(TrainingError, match="layout"):
        with matched_features(tied, nn.Linear(2, 2), feature_points(tied)):
            pass
