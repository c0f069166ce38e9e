"""How a model is fed: uint8 batches turned into its input (channels, size, normalisation,
flips), as it was trained (its recipe, `kshare.models.recipe`), or data that is already model
input (`ImageData.prepared`: a user's own transform did it) passed through as it is."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kshare.data.datasets import ImageData
from kshare.errors import DataError
from kshare.models.recipe import InputRecipe, recipe_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Adapter:
    """Turns uint8 batches into the model's input: channels, size, normalisation, flips.
    `prepared`: the batches already are model input (float, normalised); only flips apply."""

    channels: int
    size: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool = False
    prepared: bool = False

    @classmethod
    def for_model(cls, data: ImageData, channels: int, image_size: int | None, augment: bool) -> Adapter:
        mean, std = data.mean, data.std
        if channels != len(mean):
            mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
        size = (image_size, image_size) if image_size else None
        return cls(channels, size, mean, std, flip=augment and data.name not in ("fashion-mnist", "digits"))

    def describe(self, data: ImageData) -> str | None:
        """One line saying how the data is changed to fit the model, or None if it is not."""
        c, h, w = data.shape
        changes = []
        if c != self.channels:
            changes.append(f"channels {c}→{self.channels} ({'repeated' if c == 1 else 'averaged'})")
        if self.size and (h, w) != self.size:
            changes.append(f"size {h}x{w}→{self.size[0]}x{self.size[1]} (bilinear)")
        return f"adapting {data.name}: " + ", ".join(changes) if changes else None

    def __call__(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        if self.prepared:
            x = images.float()
            if train and self.flip:
                mask = torch.rand(x.shape[0], device=x.device) < 0.5
                x = torch.where(mask.view(-1, *(1,) * (x.ndim - 1)), x.flip(-1), x)
            return x.contiguous()
        x = images.float().div_(255.0)
        c = x.shape[1]
        if c != self.channels:
            x = x.expand(-1, self.channels, -1, -1) if c == 1 else x.mean(1, keepdim=True).expand(
                -1, self.channels, -1, -1)
        if self.size and tuple(x.shape[2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
        if train and self.flip:
            mask = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)
        return x.contiguous()


def adapter_for(model: nn.Module, data: ImageData, image_size: int | None = None, *, augment: bool = False,
                announce: bool = False) -> Adapter:
    """How `data` is fed to `model`: at the size and with the normalisation the model was trained
    on (its recipe, `kshare.models.recipe`), unless `image_size` says otherwise; channels matched
    to its first convolution. `announce`: log how the data is adapted, and warn where it differs
    from what the model was trained on."""
    channels = input_channels(model)
    if data.prepared:  # the user's transform made model input: passed through as it is
        if data.shape and data.shape[0] != channels:
            raise DataError(f"{data.name} gives {data.shape[0]}-channel inputs; the model's first convolution "
                            f"takes {channels}")
        if announce:
            log.info(f"feeding {data.name} as given (its own transform made the model's input)")
        return Adapter(channels, None, (), (), flip=augment, prepared=True)
    recipe = recipe_of(model)
    if recipe is not None and recipe.channels == channels and len(recipe.size) == 2:
        size = (image_size, image_size) if image_size else tuple(recipe.size)
        adapter = Adapter(channels, size, recipe.mean, recipe.std,  # type: ignore[arg-type]
                          flip=augment and data.name not in ("fashion-mnist", "digits"))
    else:
        adapter = Adapter.for_model(data, channels, image_size, augment)
    if announce:
        note = adapter.describe(data)
        if note:
            log.info(note)
        for warning in _differences(recipe, data, image_size):
            log.warning(warning)
    return adapter


def _differences(recipe: InputRecipe | None, data: ImageData, image_size: int | None) -> list[str]:
    """What about `data` differs from what the model was trained on."""
    if recipe is None:
        return []
    found = []
    if recipe.data and data.name != recipe.data:
        found.append(f"the model was trained on {recipe.data}; this is {data.name}")
    if image_size and len(recipe.size) == 2 and (image_size, image_size) != tuple(recipe.size):
        found.append(f"the model was trained at {recipe.size[0]}x{recipe.size[1]}; feeding it "
                     f"{image_size}x{image_size} as asked")
    if data.labelled and recipe.classes and len(recipe.classes) == len(data.classes) \
            and tuple(recipe.classes) != data.classes:
        found.append(f"{data.name} names its classes differently from the model's ({data.classes[0]!r} vs "
                     f"{recipe.classes[0]!r} first): outputs are read in the model's order")
    return found


def decode_size(model: nn.Module, image_size: int | None) -> int | None:
    """The size to decode pictures at for `model` (image folders are resized when read): the one
    asked for, else the one it was trained at, else None (the reader's default)."""
    recipe = recipe_of(model)
    if image_size is None and recipe is not None and len(recipe.size) == 2 and recipe.size[0] == recipe.size[1]:
        return recipe.size[0]
    return image_size


def recipe_for(adapter: Adapter, data: ImageData) -> InputRecipe:
    """What a model trained on `data` through `adapter` must be fed from now on."""
    size = adapter.size or tuple(data.shape[1:])
    return InputRecipe((adapter.channels, *size), adapter.mean, adapter.std,
                       data.classes if data.labelled else (), data.name)


def input_channels(model: nn.Module) -> int:
    """The channels the model's first convolution expects."""
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is None:
        raise DataError("the model has no convolution: kshare feeds images to CNNs")
    return conv.in_channels
