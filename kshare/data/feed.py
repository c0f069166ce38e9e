"""How a model is fed: uint8 batches turned into its input (channels, size, normalisation,
flips), as it was trained (its recipe, `kshare.models.recipe`), or data that is already model
input (`ImageData.prepared`: a user's own transform did it) passed through as it is.

Photos (image folders, a user's uint8 pictures: `ImageData.photos`) carry no normalisation of
their own, so a pretrained model's own recipe wins over the assumed ImageNet one: timm's
`pretrained_cfg` or torchvision's weights transforms (`kshare.models.pretrained`), for the
decoding (size, crop, interpolation) as well as the mean and std. A dataset with its own
statistics (Fashion-MNIST, CIFAR) is fed with them unless the model has a kshare recipe."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kshare.data.datasets import Decoding, ImageData, photo_normalisation
from kshare.errors import DataError, param
from kshare.models.pretrained import pretrained_recipe
from kshare.models.recipe import INTERPOLATIONS, InputRecipe, attach_recipe, recipe_of

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
    interpolation: str = "bilinear"
    recipe: InputRecipe | None = None  # the recipe followed, when the model's (kshare's or its pretrained one)

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
            changes.append(f"size {h}x{w}→{self.size[0]}x{self.size[1]} ({self.interpolation})")
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
            mode = self.interpolation if self.interpolation != "nearest" else "nearest-exact"
            x = F.interpolate(x, size=self.size, mode=mode, align_corners=False if mode != "nearest-exact" else None,
                              antialias=mode != "nearest-exact").clamp_(0.0, 1.0)
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
    recipe = model_recipe(model, data)
    if recipe is not None and recipe.channels == channels and len(recipe.size) == 2:
        own = recipe_of(model) is not None  # a pretrained config's size cuts folders (`decoding_for`), not tensors
        size = (image_size, image_size) if image_size else tuple(recipe.size) if own else None
        adapter = Adapter(channels, size, recipe.mean, recipe.std,  # type: ignore[arg-type]
                          flip=augment and data.name not in ("fashion-mnist", "digits"),
                          interpolation=recipe.interpolation, recipe=recipe)
    else:
        adapter = Adapter.for_model(data, channels, image_size, augment)
    if announce:
        log.info(_feeding(adapter, data))
        note = adapter.describe(data)
        if note:
            log.info(note)
        for warning in _differences(recipe_of(model), data, image_size):
            log.warning(warning)
    return adapter


def model_recipe(model: nn.Module, data: ImageData | None = None) -> InputRecipe | None:
    """The recipe `model` is fed by: the one kshare recorded, else, for photos (or when no data is
    named), the one its pretrained config gives."""
    recipe = recipe_of(model)
    if recipe is None and (data is None or data.photos):
        recipe = pretrained_recipe(model)
    return recipe


def override_recipe(model: nn.Module, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    crop_pct: float | None = None, interpolation: str | None = None) -> InputRecipe | None:
    """Feed `model` otherwise than its recipe says (kshare's, its pretrained config's, or ImageNet's
    for photos at 224): the values given replace the recipe's, and the result is attached to the
    model, so every step and the checkpoint use it. None when nothing is given (nothing changes).
    One value of `mean`/`std` stands for every channel."""
    given = {k: v for k, v in (("mean", mean), ("std", std), ("crop_pct", crop_pct),
                               ("interpolation", interpolation)) if v is not None}
    if not given:
        return None
    channels = input_channels(model)
    base = model_recipe(model) or InputRecipe((channels, 224, 224), *photo_normalisation(channels))
    changes: dict[str, object] = {}
    for name in ("mean", "std"):
        if name in given:
            values = tuple(float(v) for v in given[name])  # type: ignore[attr-defined]
            if len(values) == 1:
                values *= channels
            if len(values) != channels or (name == "std" and any(v <= 0 for v in values)):
                raise DataError(f"{param(name)} takes one value or one per input channel ({channels})"
                                + (", each above 0" if name == "std" else "") + f", got {given[name]!r}")
            changes[name] = values
    if crop_pct is not None:
        if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0.05 <= crop_pct <= 1.0:
            raise DataError(f"{param('crop_pct')} must be in [0.05, 1] (the centre crop's share of the shorter side), "
                            f"got {crop_pct!r}")
        changes["crop_pct"] = float(crop_pct)
    if interpolation is not None:
        if interpolation not in INTERPOLATIONS:
            raise DataError(f"{param('interpolation')} must be one of {', '.join(INTERPOLATIONS)}, "
                            f"got {interpolation!r}")
        changes["interpolation"] = interpolation
    named = ", ".join(param(k) for k in given)
    recipe = dataclasses.replace(base, **changes, source=f"{base.source or 'the model'}, with {named} given")
    attach_recipe(model, recipe)
    return recipe


def _feeding(adapter: Adapter, data: ImageData) -> str:
    """One line: how the images reach the model, and who said so."""
    cut = f"{data.decoding.describe()}, " if data.decoding is not None else ""
    norm = f"mean {_short(adapter.mean)}, std {_short(adapter.std)}"
    recipe = adapter.recipe
    said = (f"as {recipe.source} says" if recipe is not None and recipe.source else
            "as the model's kshare recipe says" if recipe is not None else
            "with ImageNet's statistics (assumed for photos)" if data.photos else "with the data's own statistics")
    return f"feeding {data.name} {said}: {cut}{norm}"


def _short(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


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


def decoding_for(model: nn.Module, image_size: int | None) -> Decoding:
    """How to cut pictures to size for `model` when an image folder is decoded: at the size asked
    for, else the one its recipe says (kshare's, else its pretrained config's), else 224; with the
    recipe's centre crop and interpolation (none: the whole shorter side, bilinear)."""
    recipe = recipe_of(model) or pretrained_recipe(model)
    square = recipe is not None and len(recipe.size) == 2 and recipe.size[0] == recipe.size[1]
    size = image_size if image_size is not None else recipe.size[0] if square else 224  # type: ignore[union-attr]
    if recipe is None:
        return Decoding(size)
    return Decoding(size, recipe.crop_pct, recipe.interpolation)


def recipe_for(adapter: Adapter, data: ImageData) -> InputRecipe:
    """What a model trained on `data` through `adapter` must be fed from now on."""
    size = adapter.size or tuple(data.shape[1:])
    cut = adapter.recipe if adapter.recipe is not None else data.decoding
    return InputRecipe((adapter.channels, *size), adapter.mean, adapter.std,
                       data.classes if data.labelled else (), data.name,
                       crop_pct=cut.crop_pct if cut is not None else 1.0,
                       interpolation=cut.interpolation if cut is not None else "bilinear",
                       source=adapter.recipe.source if adapter.recipe is not None else "")


def input_channels(model: nn.Module) -> int:
    """The channels the model's first convolution expects."""
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is None:
        raise DataError("the model has no convolution: kshare feeds images to CNNs")
    return conv.in_channels
