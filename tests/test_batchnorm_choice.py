"""BatchNorm statistics are re-estimated only where that brings the model closer to the untied
original (`choose_batchnorm`, `RecalibrateConfig(choose="measure")`): a trained network keeps
the statistics it learned where images of another domain would move them, and stale statistics
are replaced where they hurt."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kshare
from kshare import FitConfig
from kshare.data import adapter_for, as_image_data
from kshare.fit.batchnorm import batch_norms, choose_batchnorm
from kshare.retrofit import RecalibrateConfig, batchnorm_mode


def _shifted(digits: tuple[kshare.ImageData, kshare.ImageData]) -> kshare.ImageData:
    """The digits, inverted and brightened: images the network's statistics were not measured on."""
    train, _ = digits
    return as_image_data((255 - train.images[:768]).clamp(min=40), name="inverted digits")


def _batches(model: nn.Module, data: kshare.ImageData, start: int, stop: int) -> list[torch.Tensor]:
    return [adapter_for(model, data)(data.images[start:stop])]


def test_stale_statistics_are_replaced_and_good_ones_kept(trained: nn.Module, digits) -> None:
    train, _ = digits
    model = copy.deepcopy(trained)
    for norm in batch_norms(model):  # statistics that no longer describe what the layers see
        norm.running_mean.add_(0.5)
        norm.running_var.mul_(4.0)
    fit, judge = _batches(trained, train, 0, 256), _batches(trained, train, 256, 512)
    choice = choose_batchnorm(model, trained, fit, judge)
    assert choice.kl_all < choice.kl_kept and len(choice.reestimated) == len(batch_norms(model))
    assert choice.kl_chosen == pytest.approx(choice.kl_all, abs=1e-12)
    untouched = copy.deepcopy(trained)
    same = choose_batchnorm(untouched, trained, _batches(trained, _shifted(digits), 0, 256), judge)
    assert same.kl_kept == pytest.approx(0.0, abs=1e-9) and same.reestimated == () and same.kl_chosen == same.kl_kept
    for a, b in zip(batch_norms(untouched), batch_norms(trained), strict=True):  # put back exactly
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)


def test_reestimation_that_lowers_held_out_fidelity_is_not_kept(trained: nn.Module, digits) -> None:
    """Fitted on images of another domain, re-estimating every BatchNorm there moves the network
    away from the original on held-out images of that domain; measured, those layers keep theirs."""
    data = _shifted(digits)
    runs = {}
    for mode in ("all", "measure", "keep"):
        model = copy.deepcopy(trained)
        fit, recal = batchnorm_mode(mode, FitConfig(images=256, compensate=False))  # the BatchNorm alone differs
        runs[mode] = kshare.retrofit(model, "all", data, fit=fit, recalibrate=recal, held_out=256,
                                     input_size=(1, 8, 8))
    kl = {mode: report.final.fidelity.kl for mode, report in runs.items()}  # type: ignore[union-attr]
    assert kl["all"] > kl["keep"], kl  # the premise: re-estimating everything here hurts
    choice = runs["measure"].batchnorm
    assert choice is not None and choice.kept and choice.kl_chosen <= min(choice.kl_all, choice.kl_kept)
    assert kl["measure"] < kl["all"], kl
    assert runs["measure"].recalibrated == len(choice.reestimated) and runs["keep"].batchnorm is None
    assert runs["measure"].record()["batchnorm"]["kept"] == list(choice.kept)  # the checkpoint says what was kept


def test_bad_batchnorm_modes_are_refused() -> None:
    with pytest.raises(kshare.KShareError, match="batchnorm"):
        batchnorm_mode("sometimes", FitConfig())
    with pytest.raises(kshare.KShareError, match="choose"):
        RecalibrateConfig(choose="sometimes")


def test_auto_fits_as_all_where_the_statistics_describe_the_images_and_as_measure_where_not(
        trained: nn.Module, digits) -> None:
    """`auto` (the default) checks whether re-estimating the untied model's statistics on the fit
    images keeps it close to itself, then retrofits exactly as `all` (they describe these images)
    or as `measure` (they were learned on others) would."""
    train, _ = digits
    for data, expected in ((train, "all"), (_shifted(digits), "measure")):
        runs = {}
        for mode in ("auto", expected):
            fit, recal = batchnorm_mode(mode, FitConfig(images=256))
            runs[mode] = kshare.retrofit(copy.deepcopy(trained), "all", data, fit=fit, recalibrate=recal,
                                         held_out=256, input_size=(1, 8, 8))
        check = runs["auto"].statistics
        assert check is not None and check.describes == (expected == "all"), check
        assert (check.fidelity.top1 >= 0.9) == check.describes
        assert "the untied model against itself: top-1 agreement" in check.line()
        assert runs["auto"].final.fidelity.kl == runs[expected].final.fidelity.kl  # the same retrofit
        assert runs["auto"].record()["statistics"]["describes"] == check.describes
        assert (runs["auto"].batchnorm is not None) == (expected == "measure")
