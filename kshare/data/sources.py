"""Where images come from: any source a user has, turned into one `ImageData`.

A fit, a recalibration or a fidelity measure reads a few hundred images, so every source is
read into memory once, up to the images needed (`limit`: a DataLoader over a whole dataset is
not read to its end). Accepted:

- an `ImageData` (as it is);
- a dataset name (`kshare.data.datasets.NAMES`) or a folder path: a flat folder of pictures
  is unlabelled (`images:PATH`), a folder of class sub-folders is labelled (`imagefolder:PATH`);
- a tensor (N, C, H, W);
- any iterable: a `DataLoader`, a `Dataset`, a list, a generator, of image tensors (C, H, W) or
  batches (N, C, H, W), or of `(images, labels, ...)` pairs; `transform(item)` first, if given
  (NNCF's `transform_fn`): it returns one of those.

uint8 images are fed like kshare's own datasets (scaled, resized and normalised as the model was
trained); float images are taken as model input already made by the user's own transform, and
passed through unchanged (`ImageData.prepared`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from kshare.data.datasets import NAMES, Decoding, ImageData, load_data, photo_normalisation
from kshare.errors import DataError, param

ImageSource = ImageData | str | Path | torch.Tensor | Iterable[Any]


def as_image_data(source: ImageSource, *, transform: Callable[[Any], Any] | None = None, limit: int | None = None,
                  split: str = "train", root: str | Path | None = None, image_size: int | Decoding | None = None,
                  name: str | None = None) -> ImageData:
    """`source` as one `ImageData` (see the module docstring): at most `limit` images read from an
    iterable; `split`, `root` and `image_size` (the size pictures are decoded at, or a `Decoding`) for
    names and folders; `name` for the messages."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"{param('limit')} must be a whole number of at least 1, got {limit!r}")
    if isinstance(source, ImageData):
        return source if transform is None else _from_items(_items(source.images), transform, limit, name)
    if isinstance(source, (str, Path)):
        if transform is not None:
            raise DataError(f"{param('transform')} applies to images a user's own iterable gives; a dataset name or "
                            "folder is decoded and fed as the model was trained")
        return load_data(_dataset_name(source), split, root, image_size)
    if isinstance(source, torch.Tensor):
        return _from_items([source], transform, limit, name or "a tensor")
    if isinstance(source, (bytes, dict)) or not _iterable(source):
        raise DataError(f"cannot read images from a {type(source).__name__}: give a DataLoader, a Dataset, a list of "
                        f"tensors, a tensor (N, C, H, W), a folder or one of {', '.join(NAMES)}")
    return _from_items(_items(source), transform, limit, name or type(source).__name__)


def _dataset_name(source: str | Path) -> str:
    """A dataset name as it is; a folder path as `images:PATH` (flat) or `imagefolder:PATH` (class
    sub-folders)."""
    text = str(source)
    if isinstance(source, str) and (text in NAMES or text.startswith(("images:", "imagefolder:"))):
        return text
    path = Path(source)
    if path.is_dir():
        nested = any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir())
        return f"imagefolder:{path}" if nested else f"images:{path}"
    if isinstance(source, str) and "/" not in text:
        return text  # an unknown name: load_data lists the known ones
    raise DataError(f"image folder not found: {path}")


def _iterable(source: Any) -> bool:
    return hasattr(source, "__iter__") or (hasattr(source, "__getitem__") and hasattr(source, "__len__"))


def _items(source: Any) -> Iterator[Any]:
    """The items of `source`: a map-style Dataset by index (its `__getitem__` need not raise IndexError)."""
    if isinstance(source, torch.Tensor):
        yield from source
    elif isinstance(source, torch.utils.data.Dataset) and not isinstance(source, torch.utils.data.IterableDataset) \
            and hasattr(source, "__len__"):
        for i in range(len(source)):  # type: ignore[arg-type]
            yield source[i]
    else:
        yield from source


def _split(item: Any, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An item as (images (N, C, H, W), labels (N,) or None)."""
    labels = None
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        images = item[0]
        if len(item) > 1:
            labels = torch.as_tensor(item[1]).reshape(-1).long() if _label_like(item[1]) else None
    elif isinstance(item, dict) and isinstance(item.get("image", item.get("images")), torch.Tensor):
        images = item.get("image", item.get("images"))
        found = item.get("label", item.get("labels"))
        labels = torch.as_tensor(found).reshape(-1).long() if found is not None and _label_like(found) else None
    elif isinstance(item, torch.Tensor):
        images = item
    else:
        raise DataError(f"{where}: an item is a {type(item).__name__}; expected an image tensor or (images, labels)"
                        f" (a {param('transform')} can turn items into one)")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise DataError(f"{where}: an item holds a tensor of shape {tuple(images.shape)}; expected an image (C, H, W) "
                        "or a batch (N, C, H, W)")
    if labels is not None and len(labels) != len(images):
        raise DataError(f"{where}: an item holds {len(images)} images and {len(labels)} labels")
    return images, labels


def _label_like(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() and value.ndim <= 1
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value))


def _from_items(items: Iterable[Any], transform: Callable[[Any], Any] | None, limit: int | None,
                name: str | None) -> ImageData:
    where = name or "the images"
    batches: list[torch.Tensor] = []
    labels: list[torch.Tensor | None] = []
    count = 0
    for item in items:
        images, found = _split(transform(item) if transform is not None else item, where)
        if limit is not None and count + len(images) > limit:
            images, found = images[: limit - count], None if found is None else found[: limit - count]
        if batches and images.shape[1:] != batches[0].shape[1:]:
            raise DataError(f"{where}: images of shape {tuple(images.shape[1:])} after {tuple(batches[0].shape[1:])}: "
                            "resize them to one size (a transform can)")
        if batches and images.dtype != batches[0].dtype:
            raise DataError(f"{where}: {images.dtype} images after {batches[0].dtype} ones")
        batches.append(images.detach().cpu())
        labels.append(found)
        count += len(images)
        if limit is not None and count >= limit:
            break
    if not count:
        raise DataError(f"{where} gave no images")
    images = torch.cat(batches)
    prepared = images.dtype != torch.uint8
    if prepared and not images.is_floating_point():
        raise DataError(f"{where}: {images.dtype} images; expected uint8 pictures or float model input")
    labelled = all(found is not None for found in labels)
    targets = torch.cat([f for f in labels if f is not None]) if labelled else torch.zeros(count, dtype=torch.long)
    if labelled and int(targets.min()) < 0:
        raise DataError(f"{where}: label {int(targets.min())} is negative")
    classes = tuple(str(i) for i in range(int(targets.max()) + 1)) if labelled else ("unlabelled",)
    channels = images.shape[1]
    mean, std = ((), ()) if prepared else photo_normalisation(channels) if channels == 3 else ((0.5,) * channels,
                                                                                                (0.25,) * channels)
    return ImageData(where, "train", images.float() if prepared else images.contiguous(), targets, classes, mean, std,
                     labelled=labelled, prepared=prepared, photos=not prepared and channels == 3)
