"""Feeding a model as it was trained: pretrained configs become input recipes, image folders are
cut (shorter side, centre crop) as the recipe says, the user can override it, and the recipe
followed goes into the checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import kshare
from kshare.cli import app
from kshare.data import Decoding, adapter_for, decoding_for, load_data, override_recipe
from kshare.models.pretrained import TIMM_SOURCE, TORCHVISION_SOURCE, pretrained_recipe
from kshare.models.recipe import recipe_of
from kshare.models.zoo import load_model


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def _pictures(folder: Path, n: int = 12) -> Path:
    """`n` random RGB pictures of different, non-square sizes."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (30 + i, 50, 3), dtype=np.uint8)).save(folder / f"{i:02}.png")
    return folder


def test_folders_are_cut_like_torchvision_resize_and_centre_crop(tmp_path: Path) -> None:
    """The shorter side resized to size / crop_pct, then the centre crop: pixel for pixel what
    torchvision's Resize + CenterCrop give (no squash of a non-square picture)."""
    from torchvision.transforms import CenterCrop, InterpolationMode, PILToTensor, Resize

    folder = _pictures(tmp_path / "pics", 3)
    data = load_data(f"images:{folder}", "train", image_size=Decoding(16, 0.875, "bicubic"))
    assert data.images.shape == (3, 3, 16, 16) and data.decoding == Decoding(16, 0.875, "bicubic") and data.photos
    for i, f in enumerate(sorted(folder.iterdir())):
        with Image.open(f) as img:
            want = PILToTensor()(CenterCrop(16)(Resize(18, InterpolationMode.BICUBIC, antialias=True)(img)))
        assert (data.images[i].int() - want.int()).abs().max() <= 1  # resampler rounding only
    assert "shorter side resized to 18 (bicubic), centre 16x16 crop" == data.decoding.describe()


def test_a_timm_model_with_mean_half_is_fed_half(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, _ = load_model("timm:tf_efficientnet_lite0", {}, None)
    recipe = pretrained_recipe(model)
    assert recipe is not None and recipe.mean == (0.5, 0.5, 0.5) and recipe.std == (0.5, 0.5, 0.5)
    assert recipe.crop_pct == pytest.approx(0.875) and recipe.interpolation == "bicubic" and recipe.size == (224, 224)
    assert decoding_for(model, None) == Decoding(224, 0.875, "bicubic")
    data = load_data(f"images:{_pictures(tmp_path / 'pics')}", "train", image_size=decoding_for(model, 24))
    with caplog.at_level(logging.INFO, logger="kshare"):
        adapter = adapter_for(model, data, announce=True)
    assert adapter.mean == (0.5, 0.5, 0.5) and adapter.std == (0.5, 0.5, 0.5) and adapter.interpolation == "bicubic"
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("feeding"))
    assert TIMM_SOURCE in line and "mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5)" in line and "centre 24x24 crop" in line
    x = adapter(data.images[:2])
    assert torch.allclose(x, data.images[:2].float() / 255 * 2 - 1, atol=1e-6)  # (x - 0.5) / 0.5: no resize
    fashion = load_data("fake", "train")  # a dataset with statistics of its own keeps them
    assert adapter_for(model, fashion).mean == fashion.mean


def test_a_torchvision_model_is_fed_as_its_weights_transforms_say(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    model, _ = load_model("resnet18", {}, None)
    recipe = pretrained_recipe(model)
    assert recipe is not None and recipe.source == TORCHVISION_SOURCE
    assert recipe.crop_pct == pytest.approx(224 / 256) and recipe.mean == (0.485, 0.456, 0.406)
    data = load_data(f"images:{_pictures(tmp_path / 'pics')}", "train", image_size=decoding_for(model, 20))
    with caplog.at_level(logging.INFO, logger="kshare"):
        adapter = adapter_for(model, data, announce=True)
    assert adapter.std == (0.229, 0.224, 0.225)
    assert any(TORCHVISION_SOURCE in r.getMessage() for r in caplog.records)


def test_a_user_module_says_nothing_and_gets_imagenet_statistics(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    assert pretrained_recipe(model) is None and decoding_for(model, 20) == Decoding(20)
    data = load_data(f"images:{_pictures(tmp_path / 'pics')}", "train", image_size=decoding_for(model, 20))
    assert adapter_for(model, data).mean == (0.485, 0.456, 0.406)


def test_override_replaces_what_is_given_and_rejects_bad_values() -> None:
    model, _ = load_model("timm:tf_efficientnet_lite0", {}, None)
    recipe = override_recipe(model, mean=[0.1], crop_pct=1.0)
    assert recipe is not None and recipe_of(model) == recipe and recipe.mean == (0.1,) * 3
    assert recipe.std == (0.5,) * 3 and recipe.crop_pct == 1.0 and recipe.interpolation == "bicubic"
    assert "mean" in recipe.source and TIMM_SOURCE in recipe.source
    assert override_recipe(model) is None  # nothing given: nothing changes
    for bad in ({"std": [0.1, 0.0, 0.1]}, {"mean": [0.1, 0.2]}, {"crop_pct": 1.5}, {"interpolation": "lanczos"}):
        with pytest.raises(kshare.DataError):
            override_recipe(model, **bad)  # type: ignore[arg-type]


def test_cli_retrofit_feeds_the_pretrained_recipe_and_saves_it(tmp_path: Path) -> None:
    folder = _pictures(tmp_path / "pics", 16)
    out = tmp_path / "r.pt"
    code, text = cli("retrofit", "timm:tf_efficientnet_lite0", "-g", "stage", "--data", f"images:{folder}",
                     "--image-size", "32", "--fit-mode", "oneshot", "--fit-images", "8", "--held-out", "4",
                     "--out", out)
    assert code == 0, text
    assert f"feeding images:{folder} as {TIMM_SOURCE} says" in text and "mean (0.5, 0.5, 0.5)" in text
    saved = recipe_of(kshare.load(out))
    assert saved is not None and saved.source == TIMM_SOURCE and saved.size == (32, 32)
    assert saved.mean == (0.5,) * 3 and saved.interpolation == "bicubic"
    code, text = cli("retrofit", "timm:tf_efficientnet_lite0", "-g", "stage", "--data", f"images:{folder}",
                     "--image-size", "32", "--fit-mode", "oneshot", "--fit-images", "8", "--held-out", "4",
                     "--mean", "0.4", "--std", "0.3,0.3,0.3", "--interpolation", "bilinear", "--out", out)
    assert code == 0, text
    assert "mean (0.4, 0.4, 0.4), std (0.3, 0.3, 0.3)" in text and "(bilinear)" in text
    saved = recipe_of(kshare.load(out))
    assert saved is not None and saved.mean == (0.4,) * 3 and saved.interpolation == "bilinear"


@pytest.mark.parametrize("flags, words", [(["--crop-pct", "1.5"], "--crop-pct"),
                                          (["--interpolation", "lanczos"], "--interpolation"),
                                          (["--mean", "a,b"], "--mean"), (["--std", "0.2,0.2"], "--std")])
def test_cli_bad_feed_options_are_one_error_line(tmp_path: Path, flags: list[str], words: str) -> None:
    folder = _pictures(tmp_path / "pics", 4)
    code, text = cli("retrofit", "timm:tf_efficientnet_lite0", "--data", f"images:{folder}", *flags,
                     "--out", tmp_path / "r.pt")
    assert code == 2 and text.strip().startswith("error:") and len(text.strip().splitlines()) == 1, text
    assert words in text and not (tmp_path / "r.pt").exists()
