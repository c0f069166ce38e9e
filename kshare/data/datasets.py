"""Datasets for fine-tuning and evaluation, read from local files only.

Every dataset is loaded into memory as uint8 images (N, C, H, W) and int64 labels; batches
are converted, adapted and normalised on the fly (`Adapter`), so the loop never decodes
images per sample. Names:

- `fashion-mnist`: the idx `.gz` files (default root `/usr/share/datasets/fashion-mnist`,
  from `apt-get install dataset-fashion-mnist`);
- `cifar10`, `cifar100`: torchvision's on-disk python format under `--data-root`, read with
  a restricted unpickler that admits nothing but numpy arrays and plain containers;
- `imagefolder:PATH`: one sub-folder per class, or `PATH/train` and `PATH/test` holding
  them (pictures cut to size when decoded, as `Decoding` says: the shorter side resized, the
  centre cropped, as timm and torchvision evaluate; a folder of grayscale images stays one
  channel);
- `images:PATH`: a flat folder of unlabelled pictures, for fitting and BatchNorm
  recalibration (no labels, so no test split);
- `digits`: scikit-learn's bundled 8x8 digits (`pip install 'kshare[digits]'`);
- `fake`: random images for smoke tests, never for results.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import logging
import math
import pickle
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from kshare.errors import DataError, param

log = logging.getLogger(__name__)

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
NAMES = ("fashion-mnist", "cifar10", "cifar100", "imagefolder:PATH", "images:PATH", "digits", "fake")
MAX_IMAGE_SIZE = 4096  # a side beyond this would not fit in memory for any dataset worth loading
MAX_FILE_BYTES = 4 << 30  # a decompressed data file larger than this is refused, not read
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
PHOTO_MEAN, PHOTO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's: assumed for photos
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


@dataclass(frozen=True)
class Decoding:
    """How pictures are cut to `size` x `size` when a folder is decoded: the shorter side resized to
    `size / crop_pct` with `interpolation`, then the centre `size` x `size` crop (timm's
    `crop_pct`; 1.0 keeps the whole shorter side; a picture is never squashed)."""

    size: int = 224
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 1 <= self.size <= MAX_IMAGE_SIZE:
            raise DataError(f"bad image size {self.size!r}: expected 1 to {MAX_IMAGE_SIZE} pixels "
                            f"({param('image_size')})")
        if isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, (int, float)) \
                or not 0.05 <= self.crop_pct <= 1.0:
            raise DataError(f"{param('crop_pct')} must be in [0.05, 1] (the centre crop's share of the shorter "
                            f"side), got {self.crop_pct!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise DataError(f"{param('interpolation')} must be one of {', '.join(INTERPOLATIONS)}, "
                            f"got {self.interpolation!r}")

    @property
    def resize(self) -> int:
        """The shorter side's length before the centre crop."""
        return max(self.size, round(self.size / self.crop_pct))

    def describe(self) -> str:
        return (f"shorter side resized to {self.resize} ({self.interpolation}), centre {self.size}x{self.size} crop"
                if self.resize != self.size else
                f"shorter side resized to {self.size} ({self.interpolation}), centre square")


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
    labelled: bool = True  # False for `images:PATH`: pictures to fit and recalibrate on, no labels to test
    prepared: bool = False  # True: float images that already are model input (the user's own transform made them)
    photos: bool = False  # True: pictures whose mean/std are assumed (ImageNet's), not measured: a model's own win
    decoding: Decoding | None = None  # how the pictures were cut to size, when kshare decoded them

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def subset(self, limit: int | None, seed: int = 0) -> ImageData:
        """A seeded, class-balanced sample of `limit` images (all when None), in the data's order.

        Not a prefix: an image folder is sorted by class, so its first 200 images may hold two
        classes. Each class gives its share (a class with fewer images gives all it has)."""
        n = len(self.labels)
        if limit is None:
            return self
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise DataError(f"a sample needs at least one image, got {param('limit', limit)}")
        if limit >= n:
            return self
        chosen = self._balanced_order(seed)[:limit].sort().values
        log.info(f"using a class-balanced sample of {limit:,} of {n:,} {self.name} {self.split} images "
                 f"(seed {seed})")
        return dataclasses.replace(self, images=self.images[chosen], labels=self.labels[chosen])

    def beyond(self, taken: int, limit: int, seed: int = 0) -> ImageData | None:
        """Up to `limit` images that `subset(taken, seed)` left out (the next ones of its seeded
        order, so still class-balanced), or None when it took them all: images a fit never saw."""
        if taken >= len(self.labels):
            return None
        chosen = self._balanced_order(seed)[taken:taken + limit].sort().values
        return dataclasses.replace(self, images=self.images[chosen], labels=self.labels[chosen])

    def without_beyond(self, taken: int, limit: int, seed: int = 0) -> ImageData:
        """Every image but the ones `beyond(taken, limit, seed)` gives: what a fine-tune may read when
        those are held out to measure it."""
        if taken >= len(self.labels):
            return self
        keep = torch.ones(len(self.labels), dtype=torch.bool)
        keep[self._balanced_order(seed)[taken:taken + limit]] = False
        return dataclasses.replace(self, images=self.images[keep], labels=self.labels[keep])

    def _balanced_order(self, seed: int) -> torch.Tensor:
        """Every index, in a seeded order that takes the classes in turn: any prefix is a balanced sample."""
        n = len(self.labels)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        labels = self.labels[order]
        rank = torch.empty(n, dtype=torch.long)  # each image's place within its class, in shuffled order
        for c in labels.unique():
            mask = labels == c
            rank[mask] = torch.arange(int(mask.sum()))
        return order[torch.argsort(rank * (int(labels.max()) + 1) + labels, stable=True)]


def _read_idx(path: Path) -> torch.Tensor:
    """An idx file (gzipped or not): big-endian header, then unsigned bytes, exactly as many as
    the header's dimensions say."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise ValueError(f"larger than {MAX_FILE_BYTES >> 30} GiB once decompressed")
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype != 0x08 or not 1 <= ndim <= 4:
            raise ValueError("not an unsigned-byte idx file")
        dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        body = raw[4 + 4 * ndim :]
        if len(body) != math.prod(dims):
            raise ValueError(f"truncated or padded: the header promises {math.prod(dims):,} bytes, the file holds "
                             f"{len(body):,}")
        return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims) if body else \
            torch.zeros(dims, dtype=torch.uint8)
    except (OSError, EOFError, zlib.error, ValueError, RuntimeError, struct.error) as exc:
        what = "truncated (the compressed stream ends early)" if isinstance(exc, EOFError) else str(exc)
        raise DataError(f"cannot read {path}: {what}") from None


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
        raise DataError(f"{root}: fashion-mnist images and labels do not match ({tuple(images.shape)} images, "
                        f"{tuple(labels.shape)} labels)")
    return _checked(ImageData("fashion-mnist", split, images.unsqueeze(1).contiguous(), labels.long(),
                              FASHION_CLASSES, (0.2860,), (0.3530,)), root)


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
        try:
            data = torch.as_tensor(batch["data"])
            if data.dtype != torch.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(f"its 'data' is {tuple(data.shape)} {data.dtype}, not N x 3072 uint8")
            found = torch.as_tensor(list(batch[key]), dtype=torch.long)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise DataError(f"{f} is not a CIFAR batch: {str(exc)[:160]}") from None
        if found.ndim != 1 or len(found) != len(data):
            raise DataError(f"{f} is a damaged CIFAR batch: {len(found)} labels for {len(data)} images")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(found)
    meta = _unpickle(folder / ("meta" if fine else "batches.meta"))
    names = meta.get("fine_label_names" if fine else "label_names") or []
    if not isinstance(names, (list, tuple)):
        raise DataError(f"{folder} has a damaged meta file: its class names are not a list")
    classes = tuple(n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in names)
    if fine:
        mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    else:
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    return _checked(ImageData("cifar100" if fine else "cifar10", split, torch.cat(images), torch.cat(labels),
                              classes or tuple(str(i) for i in range(100 if fine else 10)), mean, std), folder)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _decode(files: list[Path], cut: Decoding) -> tuple[torch.Tensor, int]:
    """Decode pictures and cut them to (N, C, size, size) uint8 as `cut` says: one channel when
    every image is grayscale, three otherwise; and how many grayscale images were turned into RGB."""
    from PIL import Image

    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[cut.interpolation]
    decoded = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a huge image is refused, not decoded
        for f in files:
            try:
                with Image.open(f) as img:
                    gray = img.mode in GRAY_MODES
                    decoded.append((_cut(img.convert("L" if gray else "RGB"), cut, resample), gray))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                    Image.DecompressionBombWarning) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise DataError(f"cannot decode {f}: {first[:160]}") from None
    channels = 1 if all(gray for _, gray in decoded) else 3
    size = cut.size
    tensors = [torch.frombuffer(bytearray(img.convert("L" if channels == 1 else "RGB").tobytes()), dtype=torch.uint8)
               .reshape(size, size, channels).permute(2, 0, 1) for img, _ in decoded]
    converted = sum(gray for _, gray in decoded) if channels == 3 else 0
    return torch.stack(tensors), converted


def _cut(img: Any, cut: Decoding, resample: int) -> Any:
    """The shorter side resized to `cut.resize`, then the centre `cut.size` square (rounded as
    torchvision's `center_crop` does)."""
    w, h = img.size
    scale = cut.resize / min(w, h)
    width, height = max(cut.size, round(w * scale)), max(cut.size, round(h * scale))
    img = img.resize((width, height), resample, reducing_gap=None)
    left, top = round((width - cut.size) / 2.0), round((height - cut.size) / 2.0)
    return img.crop((left, top, left + cut.size, top + cut.size))


def _image_files(folder: Path) -> list[Path]:
    return [f for f in sorted(folder.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]


def _pictures(files: list[Path], cut: Decoding, name: str) -> tuple[torch.Tensor, tuple[float, ...],
                                                                    tuple[float, ...]]:
    """Decoded pictures and the normalisation assumed for them until a model says its own:
    ImageNet's statistics, the usual choice for photos (their mean over channels for gray images)."""
    images, converted = _decode(files, cut)
    if converted:
        log.info(f"{name}: {converted} grayscale image(s) converted to RGB to match the others")
    return (images, *photo_normalisation(images.shape[1]))


def photo_normalisation(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's mean/std for `channels`-channel photos (their mean over channels unless 3)."""
    if channels == 3:
        return PHOTO_MEAN, PHOTO_STD
    return (round(sum(PHOTO_MEAN) / 3, 3),) * channels, (round(sum(PHOTO_STD) / 3, 3),) * channels


def _imagefolder(path: Path, split: str, cut: Decoding) -> ImageData:
    """`path/<split>/<class>/*` if that exists, else `path/<class>/*` (the same for both splits)."""
    root = path / split if (path / split).is_dir() else path
    if not root.is_dir():
        raise DataError(f"image folder not found: {path}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected {root}/<class>/<image files>)")
    files, labels = [], []
    for index, cls in enumerate(classes):
        found = _image_files(root / cls)
        files += found
        labels += [index] * len(found)
    if not files:
        raise DataError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    images, mean, std = _pictures(files, cut, f"imagefolder:{path}")
    return _checked(ImageData(f"imagefolder:{path}", split, images, torch.tensor(labels), tuple(classes), mean, std,
                              photos=True, decoding=cut), root)


def _unlabelled(path: Path, cut: Decoding) -> ImageData:
    """`images:PATH`: a flat folder of pictures with no labels, for fitting and recalibration."""
    if not path.is_dir():
        raise DataError(f"image folder not found: {path}")
    files = _image_files(path)
    if not files:
        raise DataError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) directly inside it")
    images, mean, std = _pictures(files, cut, f"images:{path}")
    return ImageData(f"images:{path}", "train", images, torch.zeros(len(files), dtype=torch.long), ("unlabelled",),
                     mean, std, labelled=False, photos=True, decoding=cut)


def _checked(data: ImageData, where: Path | str) -> ImageData:
    """Every label names a class, and there is at least one image."""
    if len(data.labels) == 0:
        raise DataError(f"{where}: the {data.split} split of {data.name} holds no images")
    low, high = int(data.labels.min()), int(data.labels.max())
    if low < 0 or high >= len(data.classes):
        raise DataError(f"{where}: {data.name} has label {low if low < 0 else high}, outside its "
                        f"{len(data.classes)} classes")
    return data


def check_splits(train: ImageData, test: ImageData) -> None:
    """The two splits of one dataset must name the same classes in the same order."""
    if train.labelled and test.labelled and train.classes != test.classes:
        theirs = set(train.classes) ^ set(test.classes)
        detail = f" ({', '.join(sorted(theirs)[:3])} in one only)" if theirs else " (in another order)"
        raise DataError(f"{train.name}: the train and test splits name different classes{detail}")


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


def load_data(name: str, split: str, root: str | Path | None = None,
              image_size: int | Decoding | None = None) -> ImageData:
    """One split ('train' or 'test') of a named dataset; see the module docstring. `image_size`:
    the size image folders are cut to (a whole shorter side), or a `Decoding` (None: 224)."""
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}: expected train or test")
    if name == "fashion-mnist":
        folder = Path(root) if root else FASHION_MNIST_ROOT
        if not folder.is_dir():
            raise DataError(f"fashion-mnist not found in {folder}: apt-get install dataset-fashion-mnist, "
                            f"or pass the folder holding the idx .gz files as {param('data_root')}")
        return _fashion_mnist(folder, split)
    if name in ("cifar10", "cifar100"):
        if root is None:
            raise DataError(f"{name} needs the folder holding the extracted python batches: pass {param('data_root')}")
        if not Path(root).is_dir():
            raise DataError(f"data root not found: {root}")
        return _cifar(Path(root), split, fine=name == "cifar100")
    cut = image_size if isinstance(image_size, Decoding) else Decoding(224 if image_size is None else image_size)
    if name.startswith(("imagefolder:", "images:")):
        path = Path(name.partition(":")[2])
        if name.startswith("imagefolder:"):
            return _imagefolder(path, split, cut)
        if split != "train":
            raise DataError(f"{name} holds unlabelled images: it can fit and recalibrate a model, not test it")
        return _unlabelled(path, cut)
    if name == "digits":
        return _digits(split)
    if name == "fake":
        return _fake(split)
    raise DataError(f"unknown dataset {name!r}: expected one of {', '.join(NAMES)}")
