"""How a pretrained model says it wants to be fed, as an `InputRecipe`.

A timm model carries a `pretrained_cfg` (input size, mean, std, crop_pct, interpolation); a
torchvision model's weights enum carries the transforms its weights were evaluated with
(resize, centre crop, mean, std, interpolation). Both are metadata of the model class: they
are read without downloading anything. Feeding EfficientNet-Lite0 (trained on mean/std 0.5)
with ImageNet's mean/std shifts every input by about a standard deviation; that alone moves
its answers on photos.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from kshare.errors import KShareError
from kshare.models.recipe import INTERPOLATIONS, InputRecipe
from kshare.models.zoo import spec_of

log = logging.getLogger(__name__)

TIMM_SOURCE, TORCHVISION_SOURCE = "timm pretrained_cfg", "torchvision weights transforms"


def pretrained_recipe(model: nn.Module) -> InputRecipe | None:
    """The recipe a timm model's `pretrained_cfg` or a torchvision model's default weights give,
    or None when the model says nothing (a user's own module, a kshare model)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict):
        return _from_timm(cfg, model)
    spec = spec_of(model)
    if spec is not None and spec.source == "torchvision":
        return _from_torchvision(spec.name, model)
    return None


def _from_timm(cfg: dict[str, Any], model: nn.Module) -> InputRecipe | None:
    try:
        size = tuple(int(d) for d in cfg["input_size"])
        mean, std = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    except (KeyError, TypeError, ValueError):
        return None
    size = _own_size(model, size)
    if len(size) != 3 or len(mean) != size[0] or len(std) != size[0]:
        mean, std = (sum(mean) / len(mean),) * size[0], (sum(std) / len(std),) * size[0]
    crop = cfg.get("crop_pct", 1.0)
    interpolation = cfg.get("interpolation", "bilinear")
    return _recipe(size, mean, std, crop if isinstance(crop, (int, float)) else 1.0, interpolation, TIMM_SOURCE)


def _own_size(model: nn.Module, size: tuple[int, ...]) -> tuple[int, ...]:
    """The config's size with the channels of the model's first convolution (`in_chans=1`)."""
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return (int(first.in_channels), *size[1:]) if first is not None and size else size


def _from_torchvision(name: str, model: nn.Module) -> InputRecipe | None:
    try:
        from torchvision.models import get_model_weights

        transforms = get_model_weights(name).DEFAULT.transforms()  # type: ignore[attr-defined]
        crop, resize = int(transforms.crop_size[0]), int(transforms.resize_size[0])
        mean, std = tuple(map(float, transforms.mean)), tuple(map(float, transforms.std))
        interpolation = transforms.interpolation.value
    except (ValueError, KeyError, AttributeError, TypeError, IndexError):  # no weights, or not a classifier's
        return None
    size = _own_size(model, (3, crop, crop))
    if size[0] != len(mean):
        mean, std = (sum(mean) / len(mean),) * size[0], (sum(std) / len(std),) * size[0]
    return _recipe(size, mean, std, min(1.0, crop / resize), interpolation, TORCHVISION_SOURCE)


def _recipe(size: tuple[int, ...], mean: tuple[float, ...], std: tuple[float, ...], crop: float, interpolation: Any,
            source: str) -> InputRecipe | None:
    if interpolation not in INTERPOLATIONS:
        interpolation = "bicubic" if str(interpolation).startswith("bicubic") else "bilinear"
    try:
        return InputRecipe(size, mean, std, source=source, crop_pct=float(min(max(crop, 0.05), 1.0)),
                           interpolation=interpolation)
    except KShareError:  # a config kshare cannot use: fed as the data says
        log.debug(f"{source}: {size} {mean} {std} is not a recipe kshare can use")
        return None
