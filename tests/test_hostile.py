"""Fuzz and fault tests: tampered files, bad option values, bad data, a full disk, kills during
writes. Each case ends in one `error:` line and exit code 2 (a `KShareError` from Python), or
in the right result; never in a traceback."""

from __future__ import annotations

import copy
import errno
import gzip
import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from helpers import trained_bn
from typer.testing import CliRunner

import kshare
import kshare._files
import kshare.io.checkpoint
from kshare.cli import app
from kshare.planning.plan import SharingPlan
from kshare.training.resume import metrics_path, state_path

ROOT = Path(__file__).resolve().parent.parent
MIXER = ("kshare:convmixer_32_4", {"in_chans": 1, "num_classes": 10, "kernel_size": 3, "patch_size": 1})


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def one_error(code: int, out: str, *words: str) -> str:
    """Exit code 2 and exactly one `error:` line, holding `words`; no traceback."""
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in out, out[-2000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def mixer() -> torch.nn.Module:
    torch.manual_seed(0)
    return trained_bn(kshare.load_model(MIXER[0], MIXER[1])[0])


@pytest.fixture(scope="module")
def relaxed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tied model whose plan has every part a file can carry: groups, ranks, a relaxation."""
    path = tmp_path_factory.mktemp("relaxed") / "relaxed.pt"
    model = kshare.tie(mixer(), "budget:0.5", relax="lora:auto", input_size=(1, 8, 8))
    assert any(r for g in kshare.plan_of(model).groups for r in g.ranks)
    kshare.save(model, path)
    return path


# --- tampered checkpoints ---------------------------------------------------------------------

def _group(p: dict[str, Any]) -> dict[str, Any]:
    return p["plan"]["groups"][0]


TAMPERED: dict[str, Callable[[dict[str, Any]], None]] = {
    "unknown torchvision model": lambda p: p["spec"].update(source="torchvision", name="resnet999"),
    "unknown kshare model": lambda p: p["spec"].update(name="convmixer_banana"),
    "relative module": lambda p: p["spec"].update(source="python", name=".foo:bar"),
    "empty module": lambda p: p["spec"].update(source="python", name=":x"),
    "unknown source": lambda p: p["spec"].update(source="martian"),
    "kwargs not a mapping": lambda p: p["spec"].update(kwargs=[1, 2]),
    "group without members": lambda p: _group(p).update(members=[]),
    "nested members": lambda p: _group(p).update(members=[["a", "b"], "c"]),
    "one member": lambda p: _group(p).update(members=_group(p)["members"][:1]),
    "aliases not a mapping": lambda p: p.update(aliases=["x"]),
    "alias to nothing": lambda p: p["aliases"].update(foo="missing.weight"),
    "negative rank": lambda p: _group(p).update(ranks=[-1] * len(_group(p)["members"])),
    "huge rank": lambda p: _group(p).update(ranks=[10**9] * len(_group(p)["members"])),
    "ranks miscounted": lambda p: _group(p).update(ranks=[1]),
    "infinite error": lambda p: _group(p).update(error=float("inf")),
    "string error": lambda p: _group(p).update(error="small"),
    "negative totals": lambda p: p["plan"]["totals"].update(params_before=-5),
    "huge number": lambda p: _group(p).update(params_saved=2**70),
    "bad relaxation": lambda p: p["plan"].update(relax="lora:banana"),
    "bad match": lambda p: p["plan"].update(match="fuzzy"),
    "bad init": lambda p: _group(p).update(init="bogus"),
    "member twice": lambda p: _group(p).update(members=[*_group(p)["members"], _group(p)["members"][0]]),
    "member also unshared": lambda p: p["plan"]["unshared"].append({"name": _group(p)["members"][0],
                                                                    "reason": "x"}),
    "missing member": lambda p: _group(p).update(members=["nowhere.conv", *_group(p)["members"][1:]]),
    "bad dtype": lambda p: _group(p)["signature"].update(dtype="save"),
    "mismatched shape": lambda p: _group(p)["signature"].update(weight_shape=[7, 7, 3, 3]),
    "plan not a mapping": lambda p: p.update(plan="plan"),
    "recipe mean miscounted": lambda p: p.update(input={"input_size": [1, 8, 8], "mean": [0.1, 0.2], "std": [1.0]}),
    "recipe zero std": lambda p: p.update(input={"input_size": [1, 8, 8], "mean": [0.1], "std": [0.0]}),
    "extra not a mapping": lambda p: p.update(extra=[1]),
    "non-tensor state": lambda p: p["state"].update(bogus=3),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_checkpoint_is_one_error(relaxed: Path, tmp_path: Path, case: str) -> None:
    payload = torch.load(relaxed, weights_only=True)
    TAMPERED[case](payload)
    path = tmp_path / "tampered.pt"
    torch.save(payload, path)
    with pytest.raises(kshare.KShareError):
        kshare.load(path)
    one_error(*cli("info", path))
    one_error(*cli("eval", path, "--data", "digits"))


def test_tampered_checkpoints_were_good_before(relaxed: Path) -> None:
    """The mutations above are what makes those files bad: the file they start from is fine."""
    code, out = cli("info", relaxed)
    assert code == 0 and "delta ranks" in out, out
    assert kshare.plan_of(kshare.load(relaxed)) is not None


def _corruptions(data: bytes, seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    found = [data[: rng.randrange(1, len(data))] for _ in range(count)]  # truncated
    for _ in range(count):  # bytes flipped
        flipped = bytearray(data)
        for _ in range(rng.randrange(1, 8)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        found.append(bytes(flipped))
    return found


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupted_bytes_are_refused_or_read(relaxed: Path, tmp_path: Path, suffix: str) -> None:
    """Truncations and bit flips: a one-line refusal, or (a flip inside tensor data) a load."""
    source = relaxed
    if suffix == ".safetensors":
        source = tmp_path / "good.safetensors"
        kshare.export_safetensors(kshare.load(relaxed), source)
    refused = 0
    for i, data in enumerate(_corruptions(source.read_bytes(), seed=len(suffix), count=12)):
        path = tmp_path / f"c{i}{suffix}"
        path.write_bytes(data)
        try:
            kshare.load(path)
        except kshare.KShareError as exc:
            assert "\n" not in str(exc)
            refused += 1
    assert refused >= 12  # every truncation at least


SAFETENSORS_TAMPERED = {
    "aliases not JSON": {"aliases": "{bad json"},
    "aliases a list": {"aliases": "[1, 2]"},
    "plan broken": {"plan": json.dumps({"format": "kshare.plan/1", "groups": 3})},
    "spec of wrong kind": {"spec": json.dumps({"source": 1, "name": []})},
    "recipe malformed": {"input": json.dumps({"input_size": "big"})},
    "deep nesting": {"plan": "[" * 100_000 + "]" * 100_000},
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_TAMPERED))
def test_tampered_safetensors_metadata(relaxed: Path, tmp_path: Path, case: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    kshare.export_safetensors(kshare.load(relaxed), good)
    with safe_open(str(good), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta | SAFETENSORS_TAMPERED[case])
    with pytest.raises(kshare.CheckpointError):
        kshare.load(path)
    one_error(*cli("info", path))


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leaves(v, (*path, k))] or [path]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _leaves(v, (*path, i))] or [path]
    return [path]


def test_plan_json_fuzz(tmp_path: Path) -> None:
    """Every leaf of a real plan replaced by values of other kinds: parsing and applying give a plan
    or a `KShareError`, nothing else."""
    model = mixer()
    text = kshare.plan(model, "budget:0.5", relax="lora:auto", input_size=(1, 8, 8)).to_json()
    base = json.loads(text)
    rng = random.Random(0)
    values = [None, -1, 0, 10**30, 1e308, -0.5, "", "x", [], {}, [[]], True, "lora:999999", [-3, 2], {"a": 1}]
    outcomes = {"refused": 0, "applied": 0}
    for path in rng.sample(_leaves(base), min(150, len(_leaves(base)))):
        data = copy.deepcopy(base)
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = rng.choice(values)
        try:
            plan = SharingPlan.from_json(json.dumps(data))
            kshare.tie(mixer(), plan)
            outcomes["applied"] += 1
        except kshare.KShareError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 50
    for text in ("[" * 100_000, '{"format": "kshare.plan/1", "groups": [' + "[" * 50_000, "1e999", "\x00"):
        with pytest.raises(kshare.PlanError):
            SharingPlan.from_json(text)
    (tmp_path / "deep.json").write_text("[" * 100_000)
    one_error(*cli("apply", MIXER[0], "-k", "in_chans=1", "--plan", tmp_path / "deep.json", "--out",
                   tmp_path / "x.pt"), "not valid JSON")


# --- bad option values --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("digits") / "m.pt"
    kshare.save(kshare.tie(mixer(), "all"), path)
    return path


BAD_FINETUNE = [
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-4"], "--batch-size"),
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "-1"], "--lr"), (["--lr", "0"], "--lr"),
    (["--label-smoothing", "1.5"], "--label-smoothing"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--warmup", "nan"], "--warmup"), (["--limit-train", "0"], "--limit-train"),
    (["--limit-train", "-3"], "--limit-train"), (["--limit-test", "0"], "--limit-test"),
    (["--device", "tpu"], "unknown device"), (["--device", "cuda:x"], "unknown device"),
    (["--image-size", "0"], "--image-size"), (["--image-size", "-3"], "--image-size"),
    (["--image-size", "100000"], "--image-size"), (["--precision", "fp8"], "precision"),
    (["--epochs", "0"], "--epochs"), (["--optimizer", "sgd", "--momentum", "1.5"], "--momentum"),
    (["--temperature", "0"], "--temperature"), (["--alpha", "2"], "--alpha"), (["--optimizer", "adam"], "adam"),
    (["--epochs", "x"], "--epochs"), (["--bogus-option"], "bogus"), (["--no-amp", "--precision", "bf16"], "fp32"),
    (["--seed", "-1"], "--seed"),
]


@pytest.mark.parametrize(("args", "word"), BAD_FINETUNE)
def test_bad_finetune_options(digits_ckpt: Path, tmp_path: Path, args: list[str], word: str) -> None:
    one_error(*cli("finetune", digits_ckpt, "--data", "digits", "--out", tmp_path / "o.pt", *args), word)
    assert not (tmp_path / "o.pt").exists()


def test_cuda_asked_for_where_there_is_none(digits_ckpt: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_error(*cli("finetune", digits_ckpt, "--data", "digits", "--device", "cuda", "--out", tmp_path / "o.pt"),
              "CUDA is not available")
    one_error(*cli("finetune", digits_ckpt, "--data", "digits", "--precision", "fp16", "--out", tmp_path / "o.pt"),
              "fp16")


BAD_OTHERS = [
    (["eval", "{ckpt}", "--data", "digits", "--batch-size", "0"], "--batch-size"),
    (["eval", "{ckpt}", "--data", "digits", "--device", "bogus"], "unknown device"),
    (["eval", "{ckpt}", "--data", "digits", "--limit-test", "-1"], "--limit-test"),
    (["recalibrate", "{ckpt}", "--data", "digits", "--images", "0"], "--images"),
    (["recalibrate", "{ckpt}", "--data", "digits", "--batch-size", "0"], "--batch-size"),
    (["analyze", ".foo:bar"], "bad model reference"), (["analyze", ":x"], "bad model reference"),
    (["analyze", "foo:"], "bad model reference"), (["analyze", "a b:c"], "bad model reference"),
    (["analyze", "resnet18", "-g", "chunk:\u0663"], "chunk"),
    (["analyze", "resnet18", "-g", "budget:\u0660.5"], "budget"),
    (["analyze", "resnet18", "-g", "budget:0"], "budget"), (["analyze", "resnet18", "-g", "budget:1.5"], "budget"),
    (["analyze", "resnet18", "-g", "budget:nan"], "budget"),
    (["analyze", "resnet18", "--input-size", "3,99999,99999"], "too large"),
    (["analyze", "resnet18", "--input-size", "3,0,4"], "bad input size"),
    (["analyze", "resnet18", "--min-size", "1"], "min_size"),
    (["sweep", "{ckpt}", "--data", "digits", "--budgets", "0"], "outside (0, 1]"),
    (["sweep", "{ckpt}", "--data", "digits", "--budgets", "1.5"], "outside (0, 1]"),
    (["sweep", "{ckpt}", "--data", "digits", "--budgets", "-0.1"], "outside (0, 1]"),
    (["sweep", "{ckpt}", "--data", "digits", "--budgets", "nan"], "outside (0, 1]"),
    (["sweep", "{ckpt}", "--data", "digits", "--seeds", "-1"], "--seed"),
    (["export", "{ckpt}", "--onnx", "{tmp}/m.onnx", "--opset", "5"], "opset"),
    (["export", "{ckpt}", "--onnx", "{tmp}/m.onnx", "--opset", "99"], "opset"),
]


@pytest.mark.parametrize(("args", "word"), BAD_OTHERS)
def test_bad_option_values(digits_ckpt: Path, tmp_path: Path, args: list[str], word: str) -> None:
    untied = tmp_path / "untied.pt"
    kshare.save(mixer(), untied)
    ckpt = untied if args[0] == "sweep" else digits_ckpt
    one_error(*cli(*[a.format(ckpt=ckpt, tmp=tmp_path) for a in args]), word)


def test_changing_the_optimizer_on_resume_is_refused(digits_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.pt"
    common = ["--data", "digits", "--limit-train", "128", "--limit-test", "64", "--batch-size", "32", "--out", out]
    code, text = cli("finetune", digits_ckpt, *common, "--epochs", "1")
    assert code == 0, text
    one_error(*cli("finetune", digits_ckpt, *common, "--epochs", "2", "--resume", "--optimizer", "sgd"),
              "--optimizer adamw")
    state = torch.load(state_path(out), weights_only=True)
    for damage in (lambda s: s.update(epoch="one"), lambda s: s.update(optimizer=[1]),
                   lambda s: s["rng"].update(torch=torch.zeros(3)), lambda s: s["optimizer"].update(state={0: 1})):
        tampered = copy.deepcopy(state)
        damage(tampered["extra"]["train_state"])
        torch.save(tampered, state_path(out))
        one_error(*cli("finetune", digits_ckpt, *common, "--epochs", "2", "--resume"), "resume")


def test_a_new_run_onto_an_old_out_starts_its_metrics_afresh(digits_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.pt"
    common = ["--data", "digits", "--limit-train", "128", "--limit-test", "64", "--batch-size", "32", "--out", out]
    for _ in range(2):
        code, text = cli("finetune", digits_ckpt, *common, "--epochs", "2")
        assert code == 0, text
    assert "starting a new run" in text
    epochs = [json.loads(line)["epoch"] for line in metrics_path(out).read_text().splitlines()]
    assert epochs == [1, 2]


# --- bad data files ------------------------------------------------------------------------------

def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + \
        array.astype(np.uint8).tobytes()


def _fashion(root: Path, labels: np.ndarray | None = None, images: bytes | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 32)):
        pics = rng.integers(0, 256, (n, 28, 28))
        tags = labels[:n] if labels is not None else rng.integers(0, 10, n)
        data = images if images is not None and prefix == "train" else gzip.compress(_idx(pics))
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(data)
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(tags)))
    return root


def test_bad_idx_files(digits_ckpt: Path, tmp_path: Path) -> None:
    good = gzip.compress(_idx(np.zeros((64, 28, 28))))
    cases = {
        "truncated": good[: len(good) // 2],
        "corrupt": good[:10] + bytes(range(256)) * 4,
        "short body": gzip.compress(_idx(np.zeros((64, 28, 28)))[:-100]),
        "not idx": gzip.compress(b"hello world, not an idx file at all"),
    }
    model = tmp_path / "m.pt"
    kshare.save(kshare.tie(mixer(), "all"), model)
    for name, data in cases.items():
        root = _fashion(tmp_path / name.replace(" ", "_"), images=data)
        with pytest.raises(kshare.DataError):
            kshare.load_data("fashion-mnist", "train", root)
        one_error(*cli("finetune", model, "--data", "fashion-mnist", "--data-root", root, "--out", tmp_path / "o.pt"),
                  "cannot read")
    labels = np.full(64, 11)
    root = _fashion(tmp_path / "labels", labels=labels)
    one_error(*cli("finetune", model, "--data", "fashion-mnist", "--data-root", root, "--out", tmp_path / "o.pt"),
              "outside its 10 classes")


def _cifar_root(tmp: Path, batch: dict[Any, Any] | bytes) -> Path:
    folder = tmp / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 20))}
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, fh)
    for name in ("data_batch_1", "test_batch"):
        with open(folder / name, "wb") as fh:
            if isinstance(batch, bytes) and name == "data_batch_1":
                fh.write(batch)
            else:
                pickle.dump(batch if name == "data_batch_1" else good, fh)
    return tmp


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("true",))


def test_malformed_cifar_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cases = {
        "labels miscounted": {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": [1, 2, 3]},
        "wrong shape": {b"data": rng.integers(0, 256, (20, 100), dtype=np.uint8), b"labels": [0] * 20},
        "not an array": {b"data": "pixels", b"labels": [0] * 20},
        "label outside": {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [0, 42]},
        "code": pickle.dumps({b"data": _Evil(), b"labels": []}),
        "truncated": pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})[:50],
    }
    for name, batch in cases.items():
        root = _cifar_root(tmp_path / name.replace(" ", "_"), batch)
        with pytest.raises(kshare.DataError):
            kshare.load_data("cifar10", "train", root)


def _png(path: Path, size: int, mode: str = "RGB", value: int = 100) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value if mode == "L" else (value, 50, 200)).save(path)


def test_image_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    root = tmp_path / "split"
    for split, classes in (("train", ("cat", "dog")), ("test", ("cat", "cow"))):
        for c in classes:
            _png(root / split / c / "a.png", 8)
    train = kshare.load_data(f"imagefolder:{root}", "train", image_size=8)
    test = kshare.load_data(f"imagefolder:{root}", "test", image_size=8)
    model = tmp_path / "m.pt"
    kshare.save(kshare.load_model("kshare:convmixer_16_2", {"num_classes": 2})[0], model)
    with pytest.raises(kshare.DataError, match="different classes"):
        kshare.finetune(kshare.load(model), train, test, kshare.TrainConfig(), tmp_path / "o.pt")
    one_error(*cli("finetune", model, "--data", f"imagefolder:{root}", "--image-size", "8", "--out",
                   tmp_path / "o.pt"), "different classes")

    gray = tmp_path / "gray"
    for c in ("a", "b"):
        for i in range(4):
            _png(gray / c / f"{i}.png", 8, "L", 40 * i)
    data = kshare.load_data(f"imagefolder:{gray}", "train", image_size=8)
    assert data.images.shape[1] == 1
    code, out = cli("eval", model, "--data", f"imagefolder:{gray}", "--image-size", "8")
    assert code == 0 and "adapting" in out and "channels 1→3" in out, out

    bomb = tmp_path / "bomb"
    _png(bomb / "a" / "big.png", 200)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 200x200 is then a decompression bomb
    with pytest.raises(kshare.DataError, match="cannot decode"):
        kshare.load_data(f"imagefolder:{bomb}", "train", image_size=8)
    _png(bomb / "a" / "big.png", 40)  # between 1 and 2 times the limit: PIL only warns, kshare refuses
    with pytest.raises(kshare.DataError, match="cannot decode"):
        kshare.load_data(f"imagefolder:{bomb}", "train", image_size=8)


def test_limits_take_a_class_balanced_sample(tmp_path: Path) -> None:
    root = tmp_path / "sorted"
    for c in range(5):
        for i in range(20):
            _png(root / f"class{c}" / f"{i:02}.png", 4, "L", 10 * c + i)
    data = kshare.load_data(f"imagefolder:{root}", "test", image_size=4)
    sample = data.subset(25)
    assert torch.bincount(sample.labels).tolist() == [5] * 5  # a prefix would hold class 0 and a bit of 1
    assert torch.equal(sample.labels, data.subset(25).labels)  # seeded
    assert not torch.equal(data.subset(25, seed=1).images, sample.images)
    with pytest.raises(kshare.DataError):
        data.subset(0)


# --- a full disk -----------------------------------------------------------------------------------

def _full_disk(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Writes fail as on a full disk: an OSError (ENOSPC), or torch.save's own RuntimeError (which
    hides the errno) on a folder whose free space reads 0."""
    def failing_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        Path(str(f)).write_bytes(b"partial")
        if kind == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:859] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(kshare.io.checkpoint.torch, "save", failing_save)
    if kind == "runtime":
        monkeypatch.setattr(kshare._files.shutil, "disk_usage", lambda _: SimpleNamespace(total=1, used=1, free=0))


@pytest.mark.parametrize("kind", ["oserror", "runtime"])
def test_a_full_disk_is_one_error_and_loses_nothing(digits_ckpt: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    target = tmp_path / "target.pt"
    target.write_bytes(b"the old file")
    relaxed_ckpt = tmp_path / "relaxed.pt"
    kshare.save(kshare.tie(mixer(), "all", relax="lora:1"), relaxed_ckpt)
    _full_disk(monkeypatch, kind)
    commands = [
        ["apply", MIXER[0], "-k", "in_chans=1", "-g", "all", "--out", target],
        ["finetune", digits_ckpt, "--data", "digits", "--limit-train", "64", "--limit-test", "32", "--out", target],
        ["fold", relaxed_ckpt, "--out", target],
        ["recalibrate", digits_ckpt, "--data", "digits", "--images", "64", "--out", target],
    ]
    for command in commands:
        one_error(*cli(*command), "no space left")
        assert target.read_bytes() == b"the old file", command
        assert not list(tmp_path.glob(".target.pt.*")), command


def test_a_full_disk_on_safetensors_export(digits_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    def full(tensors: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    target = tmp_path / "m.safetensors"
    one_error(*cli("export", digits_ckpt, "--safetensors", target, "--onnx", tmp_path / "m.onnx"), "no space left")
    assert not target.exists() and (tmp_path / "m.onnx").is_file()  # the other file is still written


# --- kills during writes ---------------------------------------------------------------------------

WRITER = """
import sys, torch, kshare
model = kshare.load_model("resnet18")[0]
while True:
    kshare.save(model, sys.argv[1])
    print("saved", flush=True)
"""


def test_kill_during_write_keeps_a_whole_file_and_the_next_write_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "m.pt"
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                                cwd=ROOT)
        assert proc.stdout is not None
        proc.stdout.readline()  # one whole file written
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kshare.load(target)  # the old file or the whole new one: always loadable
    kshare.save(kshare.load_model("kshare:convmixer_16_2")[0], target)
    assert not list(tmp_path.glob(".m.pt.*.tmp")), "stale temporaries survive the next write"
    # one live writer's temporary is left alone
    live = tmp_path / f".m.pt.{os.getpid()}.abcd.tmp"
    live.write_bytes(b"in progress")
    kshare._files.remove_stale_temporaries(target)
    assert live.exists()
    dead = tmp_path / ".m.pt.999999999.abcd.tmp"
    dead.write_bytes(b"left by a killed writer")
    kshare._files.remove_stale_temporaries(target)
    assert not dead.exists()


# --- non-finite runs ------------------------------------------------------------------------------

class Poisoned(torch.nn.Module):
    """Trains normally, but from its `after`-th training forward on writes an infinity into a
    BatchNorm running mean (which a training forward never reads): only the weights check sees it."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 10)
        self.after, self.calls = after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.bn(self.conv(x)).mean((2, 3)))
        if self.training:
            self.calls += 1
            if self.calls >= self.after:
                self.bn.running_mean.data[0] = float("inf")  # .data: outside autograd's view
        return out


def test_non_finite_weights_never_become_the_last_good_checkpoint(tmp_path: Path) -> None:
    train, test = kshare.load_data("digits", "train").subset(64), kshare.load_data("digits", "test").subset(32)
    out = tmp_path / "p.pt"
    config = kshare.TrainConfig(epochs=3, batch_size=32)
    with pytest.raises(kshare.TrainingError, match="non-finite"):
        kshare.finetune(Poisoned(after=3), train, test, config, out, device="cpu")
    saved = torch.load(out, weights_only=True)
    assert saved["extra"]["finetune"]["epoch"] == 1
    assert all(bool(torch.isfinite(t).all()) for t in saved["state"].values() if t.is_floating_point())
