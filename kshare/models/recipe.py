"""`InputRecipe`: how a model must be fed, kept with it (timm's `pretrained_cfg` convention).

A model trained at 32x32 on normalised grayscale digits computes nonsense on 28x28 images
normalised another way. `kshare finetune` records what the model saw (input size, channels,
normalisation, class names, the dataset's name); a pretrained timm or torchvision model says
it in its `pretrained_cfg` or weights transforms (`kshare.models.pretrained`), which adds how
pictures are cut to size (the centre crop's share of the shorter side, the interpolation).
Checkpoints carry the recipe, and every command that feeds the model uses it as the default
and says when the data differs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from kshare.errors import CheckpointError

_RECIPE_ATTR = "_kshare_input"
MAX_CLASSES = 1_000_000
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class InputRecipe:
    """What the model was trained on: `input_size` (C, H, W), per-channel `mean`/`std` of the
    normalisation, `classes` in output order, the dataset's name, and the `source` of a recipe
    kshare did not write itself (`timm pretrained_cfg`, `--mean/--std`, ...). Pictures are
    resized so that the `input_size` centre crop is `crop_pct` of their shorter side, with
    `interpolation` (timm's convention; 1.0: the whole shorter side)."""

    input_size: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()
    data: str = ""
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    source: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.crop_pct, (int, float)) and not isinstance(self.crop_pct, bool)
                and 0.05 <= self.crop_pct <= 1.0):
            raise CheckpointError(f"an input recipe's crop share must be in [0.05, 1], got {self.crop_pct!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise CheckpointError(f"an input recipe's interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                                  f"got {self.interpolation!r}")

    @property
    def channels(self) -> int:
        return self.input_size[0]

    @property
    def size(self) -> tuple[int, ...]:
        return self.input_size[1:]

    def to_dict(self) -> dict[str, Any]:
        return {"input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std),
                "classes": list(self.classes), "data": self.data,
                "crop_pct": self.crop_pct, "interpolation": self.interpolation, "source": self.source}

    @classmethod
    def from_dict(cls, data: Any, what: str = "checkpoint") -> InputRecipe:
        """Read a recipe, refusing anything that is not one (a file may hold anything)."""
        bad = CheckpointError(f"{what} is a damaged kshare checkpoint: its input recipe is malformed")
        if not isinstance(data, Mapping):
            raise bad
        size, mean, std = data.get("input_size"), data.get("mean"), data.get("std")
        classes, name = data.get("classes", []), data.get("data", "")
        crop, interpolation = data.get("crop_pct", 1.0), data.get("interpolation", "bilinear")  # older files: none
        source = data.get("source", "")
        if not (isinstance(size, list) and 2 <= len(size) <= 4
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1_000_000 for d in size)):
            raise bad
        for values in (mean, std):
            if not (isinstance(values, list) and len(values) == size[0]
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                            for v in values)):
                raise bad
        if any(v <= 0 for v in std) or not isinstance(name, str) or not isinstance(classes, list) \
                or len(classes) > MAX_CLASSES or not all(isinstance(c, str) for c in classes):
            raise bad
        if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0.05 <= crop <= 1.0 \
                or interpolation not in INTERPOLATIONS or not isinstance(source, str):
            raise bad
        return cls(tuple(size), tuple(float(v) for v in mean), tuple(float(v) for v in std), tuple(classes), name,
                   float(crop), interpolation, source)


def recipe_of(model: nn.Module) -> InputRecipe | None:
    """How `model` was trained to be fed, if kshare knows."""
    return getattr(model, _RECIPE_ATTR, None)


def attach_recipe(model: nn.Module, recipe: InputRecipe | None) -> nn.Module:
    """Record (or, with None, forget) how `model` is fed."""
    if recipe is None:
        if hasattr(model, _RECIPE_ATTR):
            object.__delattr__(model, _RECIPE_ATTR)
    else:
        object.__setattr__(model, _RECIPE_ATTR, recipe)
    return model
