"""Dataset loaders on small files written here in the real on-disk formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kshare
from kshare.data import FASHION_MNIST_ROOT, Adapter, load_data


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    train = load_data("fashion-mnist", "train", tmp_path)
    assert train.images.shape == (12, 1, 28, 28) and train.labels.tolist() == [i % 10 for i in range(12)]
    assert load_data("fashion-mnist", "test", tmp_path).images.shape == (5, 1, 28, 28)


def _cifar_batch(n: int, fine: bool, rng: np.random.Generator) -> dict[bytes, object]:
    key = b"fine_labels" if fine else b"labels"
    return {b"batch_label": b"test", key: [int(x) for x in rng.integers(0, 100 if fine else 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}


def _dump(path: Path, obj: object) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def test_cifar10_python_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [_cifar_batch(4, False, rng) for _ in range(5)]
    for i, batch in enumerate(batches, 1):
        _dump(folder / f"data_batch_{i}", batch)
    _dump(folder / "test_batch", _cifar_batch(3, False, rng))
    _dump(folder / "batches.meta", {b"label_names": [b"airplane", b"automobile"] + [b"x"] * 8})
    train = load_data("cifar10", "train", tmp_path)
    assert train.images.shape == (20, 3, 32, 32) and train.classes[:2] == ("airplane", "automobile")
    first = np.asarray(batches[0][b"data"])[0].reshape(3, 32, 32)
    assert torch.equal(train.images[0], torch.from_numpy(first))
    assert train.labels[:4].tolist() == batches[0][b"labels"]
    assert load_data("cifar10", "test", tmp_path).images.shape == (3, 3, 32, 32)


def test_cifar100_python_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _dump(folder / "train", _cifar_batch(6, True, rng))
    _dump(folder / "test", _cifar_batch(2, True, rng))
    _dump(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    train = load_data("cifar100", "train", tmp_path)
    assert train.images.shape == (6, 3, 32, 32) and len(train.classes) == 100


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned_by_cifar",))


def test_cifar_unpickler_refuses_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _dump(folder / "data_batch_1", {b"data": _Evil(), b"labels": []})
    with pytest.raises(kshare.KShareError, match="refusing"):
        load_data("cifar10", "train", tmp_path)
    assert not (tmp_path / "pwned_by_cifar").exists()


def test_imagefolder(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40 + i, 30), color).save(folder / f"{i}.png")
            (folder / "notes.txt").write_text("not an image")
    data = load_data(f"imagefolder:{tmp_path}", "train", image_size=16)
    assert data.images.shape == (6, 3, 16, 16) and data.classes == ("cat", "dog")
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.images[0, 0].float().mean() > 250 and data.images[3, 2].float().mean() > 250


def test_digits() -> None:
    pytest.importorskip("sklearn")
    train, test = load_data("digits", "train"), load_data("digits", "test")
    assert train.images.shape[1:] == (1, 8, 8) and len(train.labels) + len(test.labels) == 1797


def test_adapter_channels_size_and_normalisation() -> None:
    data = load_data("fake", "test")
    adapter = Adapter.for_model(data, channels=1, image_size=16, augment=False)
    x = adapter(data.images[:4])
    assert x.shape == (4, 1, 16, 16)
    assert "channels 3→1 (averaged)" in (adapter.describe(data) or "")
    assert "size 32x32→16x16" in (adapter.describe(data) or "")
    same = Adapter.for_model(data, channels=3, image_size=None, augment=False)
    assert same.describe(data) is None
    expected = (data.images[:2].float() / 255 - torch.tensor(data.mean).view(1, 3, 1, 1)) / torch.tensor(
        data.std).view(1, 3, 1, 1)
    torch.testing.assert_close(same(data.images[:2]), expected)


@pytest.mark.parametrize(
    ("name", "root", "message"),
    [
        ("mnist-ish", None, "unknown dataset"),
        ("cifar10", None, "pass `data_root`"),
        ("cifar10", "/no/such/dir", "data root not found"),
        ("fashion-mnist", "/no/such/dir", "apt-get install dataset-fashion-mnist"),
        ("imagefolder:/no/such/dir", None, "image folder not found"),
    ],
)
def test_missing_or_unknown_data(name: str, root: str | None, message: str) -> None:
    with pytest.raises(kshare.KShareError, match=message):
        load_data(name, "train", root)


def test_cifar_root_without_batches(tmp_path: Path) -> None:
    with pytest.raises(kshare.KShareError, match="download and extract"):
        load_data("cifar10", "train", tmp_path)


@pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir() and not os.environ.get("KSHARE_REQUIRE_DATA"),
                    reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_files() -> None:
    train, test = load_data("fashion-mnist", "train"), load_data("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
