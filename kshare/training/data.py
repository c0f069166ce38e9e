"""Datasets for fine-tuning and evaluation, read from local files only.

Every dataset is loaded into memory as uint8 images (N, C, H, W) and int64 labels; batches
are converted, adapted and normalised on the fly (`Adapter`), so the loop never decodes
images per sample. Names:

- `fashion-mnist`: the idx `.gz` files (default root `/usr/share/datasets/fashion-mnist`,
  from `apt-get install dataset-fashion-mnist`);
- `cifar10`, `cifar100`: torchvision's on-disk python format under `--data-root`, read with
  a restricted unpickler that admits nothing but numpy arrays and plain containers;
- `imagefolder:PATH`: one sub-folder per class (images resized to `--image-size`, 224 by
  default, when decoded);
- `digits`: scikit-learn's bundled 8x8 digits (`pip install 'kshare[digits]'`);
- `fake`: random images for smoke tests, never for results.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kshare.errors import DataError

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
NAMES = ("fashion-mnist", "cifar10", "cifar100", "imagefolder:PATH", "digits", "fake")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


@dataclass(frozen=True)
class ImageData:
    """One split in memory: uint8 images (N, C, H, W), int64 labels, class names."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def subset(self, limit: int | None) -> ImageData:
        """The first `limit` samples (all when None): for quick runs and tests."""
        if limit is None or limit >= len(self.labels):
            return self
        return ImageData(self.name, self.split, self.images[:limit], self.labels[:limit], self.classes,
                         self.mean, self.std)


def _read_idx(path: Path) -> torch.Tensor:
    """An idx file (gzipped or not): big-endian header, then unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an unsigned-byte idx file")
        dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        data = torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8)
        return data.reshape(dims)
    except (OSError, ValueError, RuntimeError, struct.error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"{root} has no {stem}.gz: fashion-mnist needs the four idx files "
                    "(apt-get install dataset-fashion-mnist puts them in /usr/share/datasets/fashion-mnist)")


def _fashion_mnist(root: Path, split: str) -> ImageData:
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{root}: fashion-mnist images and labels do not match")
    return ImageData("fashion-mnist", split, images.unsqueeze(1).contiguous(), labels.long(), FASHION_CLASSES,
                     (0.2860,), (0.3530,))


class _ArraysOnly(pickle.Unpickler):
    """Unpickles CIFAR batches: numpy arrays and plain containers, nothing that runs code."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict[Any, Any]:
    try:
        with open(path, "rb") as fh:
            obj = _ArraysOnly(io.BytesIO(fh.read()), encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR batch (expected a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar(root: Path, split: str, fine: bool) -> ImageData:
    folder = root / ("cifar-100-python" if fine else "cifar-10-batches-py")
    if not folder.is_dir():
        folder = root if (root / ("meta" if fine else "batches.meta")).is_file() else folder
    if not folder.is_dir():
        name = "cifar100" if fine else "cifar10"
        raise DataError(f"no {folder.name} folder under {root}: download and extract the python version of "
                        f"{name} there (torchvision.datasets.{'CIFAR100' if fine else 'CIFAR10'}(root, download=True) "
                        "on a machine with internet)")
    if fine:
        files = [folder / ("train" if split == "train" else "test")]
    else:
        files = sorted(folder.glob("data_batch_*")) if split == "train" else [folder / "test_batch"]
    if not files or not all(f.is_file() for f in files):
        raise DataError(f"{folder} lacks the {split} batches ({', '.join(f.name for f in files) or 'data_batch_*'})")
    images, labels = [], []
    for f in files:
        batch = _unpickle(f)
        key = "fine_labels" if fine else "labels"
        if "data" not in batch or key not in batch:
            raise DataError(f"{f} is not a CIFAR batch (no 'data'/'{key}')")
        images.append(torch.as_tensor(batch["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
        labels.append(torch.as_tensor(list(batch[key]), dtype=torch.long))
    meta = _unpickle(folder / ("meta" if fine else "batches.meta"))
    names = meta.get("fine_label_names" if fine else "label_names") or []
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    if fine:
        mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    else:
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    return ImageData("cifar100" if fine else "cifar10", split, torch.cat(images), torch.cat(labels),
                     classes or tuple(str(i) for i in range(100 if fine else 10)), mean, std)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _imagefolder(path: Path, split: str, size: int) -> ImageData:
    """`path/<split>/<class>/*` if that exists, else `path/<class>/*` (the same for both splits)."""
    from PIL import Image

    root = path / split if (path / split).is_dir() else path
    if not root.is_dir():
        raise DataError(f"image folder not found: {path}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected {root}/<class>/<image files>)")
    images, labels = [], []
    for index, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as img:
                    rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
            except OSError as exc:
                raise DataError(f"cannot decode {f}: {exc}") from None
            tensor = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
            images.append(tensor.permute(2, 0, 1))
            labels.append(index)
    if not images:
        raise DataError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return ImageData(f"imagefolder:{path}", split, torch.stack(images), torch.tensor(labels), tuple(classes),
                     (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _digits(split: str) -> ImageData:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits dataset needs scikit-learn: pip install 'kshare[digits]'") from None
    bunch = load_digits()
    images = torch.as_tensor(bunch.images * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=gen)
    cut = int(0.8 * len(order))
    idx = order[:cut] if split == "train" else order[cut:]
    return ImageData("digits", split, images[idx].contiguous(), labels[idx], tuple(map(str, range(10))),
                     (0.3,), (0.4,))


def _fake(split: str) -> ImageData:
    gen = torch.Generator().manual_seed(0 if split == "train" else 1)
    n = 512 if split == "train" else 128
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
    return ImageData("fake", split, images, torch.randint(0, 10, (n,), generator=gen), tuple(map(str, range(10))),
                     (0.5, 0.5, 0.5), (0.29, 0.29, 0.29))


def load_data(name: str, split: str, root: str | Path | None = None, image_size: int | None = None) -> ImageData:
    """One split ('train' or 'test') of a named dataset; see the module docstring."""
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}: expected train or test")
    if name == "fashion-mnist":
        folder = Path(root) if root else FASHION_MNIST_ROOT
        if not folder.is_dir():
            raise DataError(f"fashion-mnist not found in {folder}: apt-get install dataset-fashion-mnist, "
                            "or pass --data-root DIR holding the idx .gz files")
        return _fashion_mnist(folder, split)
    if name in ("cifar10", "cifar100"):
        if root is None:
            raise DataError(f"{name} needs --data-root DIR (the folder holding the extracted python batches)")
        if not Path(root).is_dir():
            raise DataError(f"data root not found: {root}")
        return _cifar(Path(root), split, fine=name == "cifar100")
    if name.startswith("imagefolder:"):
        return _imagefolder(Path(name.partition(":")[2]), split, image_size or 224)
    if name == "digits":
        return _digits(split)
    if name == "fake":
        return _fake(split)
    raise DataError(f"unknown dataset {name!r}: expected one of {', '.join(NAMES)}")


@dataclass(frozen=True)
class Adapter:
    """Turns uint8 batches into the model's input: channels, size, normalisation, flips."""

    channels: int
    size: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool = False

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


def input_channels(model: nn.Module) -> int:
    """The channels the model's first convolution expects."""
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is None:
        raise DataError("the model has no convolution: kshare feeds images to CNNs")
    return conv.in_channels
