"""save/load round trips, file sizes, exports, and hostile or broken files."""

from __future__ import annotations

import copy
import os
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DataDependentNet
from helpers import trained_bn
from torch import nn
from typer.testing import CliRunner

import kshare
import kshare.io.checkpoint
import kshare.io.payload
from kshare.cli import app
from kshare.errors import ExportError
from kshare.io.payload import state_bytes
from kshare.models.zoo import load_model

ROUND_TRIPS = [
    ("resnet18", "stage", (3, 64, 64)),
    ("timm:convnext_atto", "stage", (3, 64, 64)),
    ("kshare:convmixer_64_4", "all", (3, 32, 32)),
    ("kshare:se_resnet_cifar_d2", "stage", (3, 32, 32)),
]


def _aliasing(model: nn.Module, plan: kshare.SharingPlan) -> list[set[int]]:
    modules = dict(model.named_modules())
    return [{id(modules[m].weight) for m in g.members} for g in plan.groups]


def _outputs_equal(a: nn.Module, b: nn.Module, size: tuple[int, ...]) -> None:
    a.eval(), b.eval()
    x = torch.randn(2, *size)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize(("name", "policy", "size"), ROUND_TRIPS)
def test_round_trip_keeps_outputs_and_aliasing(tmp_path: Path, name: str, policy: str, size: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model, _ = load_model(name)
    kshare.tie(model, policy, init="mean", input_size=size)
    path = kshare.save(model, tmp_path / "m.pt")
    loaded = kshare.load(path)
    plan = kshare.plan_of(loaded)
    assert plan is not None and plan.groups == kshare.plan_of(model).groups
    assert all(len(ids) == 1 for ids in _aliasing(loaded, plan))
    assert sum(p.numel() for p in loaded.parameters()) == plan.totals.params_after
    _outputs_equal(model, loaded, size)


def test_user_model_passed_in(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = kshare.tie(DataDependentNet(), "stage", input_size=(3, 16, 16))
    path = kshare.save(model, tmp_path / "user.pt")
    with pytest.raises(kshare.CheckpointError, match="cannot rebuild"):
        kshare.load(path)
    loaded = kshare.load(path, DataDependentNet())
    assert loaded.a.weight is loaded.b.weight and loaded.c.weight is loaded.d.weight
    _outputs_equal(model, loaded, (3, 16, 16))


def test_untied_model_round_trips_untied(tmp_path: Path) -> None:
    model, _ = load_model("resnet18")
    loaded = kshare.load(kshare.save(model, tmp_path / "base.pt"))
    assert kshare.plan_of(loaded) is None
    _outputs_equal(model, loaded, (3, 64, 64))


def test_resnet50_file_is_its_unique_bytes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, _ = load_model("resnet50")
    untied = copy.deepcopy(model)
    kshare.tie(model, "all")
    unique = state_bytes(model.state_dict())
    path = kshare.save(model, tmp_path / "tied.pt")
    torch.save(untied.state_dict(), tmp_path / "untied.pt")
    size, untied_size = path.stat().st_size, (tmp_path / "untied.pt").stat().st_size
    assert abs(size - unique) / unique < 0.02
    plan = kshare.plan_of(model)
    assert plan is not None
    # the untied file holds every member's kernel: bigger by what the plan saves
    saved_bytes = plan.totals.param_bytes_before - plan.totals.param_bytes_after
    assert untied_size - size == pytest.approx(saved_bytes, rel=0.02)


def test_tensors_are_packed_into_one_storage_record_per_dtype(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, _ = load_model("kshare:convmixer_64_4")
    kshare.tie(model, "all", relax="lora:1", input_size=(3, 32, 32))  # many small per-member tensors
    path = kshare.save(model, tmp_path / "m.pt")
    records = [n for n in zipfile.ZipFile(path).namelist() if "/data/" in n]
    state = model.state_dict()
    assert len(records) == len({t.dtype for t in state.values()}) == 2  # float32 and BN's int64 counters
    plain = tmp_path / "plain.pt"  # the same tensors, each its own storage
    torch.save({k: v.detach().clone() for k, v in kshare.io.payload.dedup_state(state)[0].items()}, plain)
    assert path.stat().st_size < plain.stat().st_size
    loaded = kshare.load(path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())
    _outputs_equal(model, loaded, (3, 32, 32))


@pytest.mark.parametrize(("name", "policy", "relax", "size", "form"), [
    ("resnet18", "all", None, (3, 64, 64), "affine"),
    ("resnet18", "all", None, (3, 64, 64), "inputs"),
    ("kshare:convmixer_64_4", "all", None, (3, 32, 32), "affine"),  # BatchNorm after GELU: nothing to rewrite
    ("kshare:se_resnet_cifar_d2", "stage", "lora:2", (3, 32, 32), "affine"),  # factors stay graph inputs
    ("kshare:se_resnet_cifar_d2", "stage", "lora:2", (3, 32, 32), "inputs"),
    ("resnet18", None, None, (3, 64, 64), "affine"),  # untied: BatchNorm may be folded
])
def test_onnx_export_of_trained_models_stores_each_kernel_once(tmp_path: Path, name: str, policy: str | None,
                                                                relax: str | None, size: tuple[int, ...],
                                                                form: str) -> None:
    """With trained BatchNorm statistics (random init folds to nothing and hid this): the file is
    no larger than the unique tensors, each shared kernel is one initializer, and onnxruntime
    computes what PyTorch computes."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    torch.manual_seed(0)
    model = trained_bn(load_model(name)[0])
    if policy:
        kshare.tie(model, policy, init="mean", relax=relax, input_size=size)
    path = kshare.export_onnx(model, tmp_path / "m.onnx", input_size=size, form=form)
    assert path.stat().st_size <= 1.05 * state_bytes(model.state_dict()) + 2**16
    initializers = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    modules = dict(model.named_modules())
    for group in (kshare.plan_of(model).groups if policy else ()):
        kernel = kshare.kernels.shared_kernel(modules[group.members[0]]).detach().numpy()
        copies = sum(a.shape == kernel.shape and np.array_equal(a, kernel) for a in initializers)
        assert copies == 1, (group.name, copies)
    options = ort.SessionOptions()  # the default optimisation level; only where ORT writes what it made of the file
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3  # ORT's warning per shared kernel that it stays an overridable initializer
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]  # the shared kernels need not be fed
    x = torch.randn(3, *size)  # batch 3: the batch axis is dynamic
    (got,) = session.run(None, {"input": x.numpy()})
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-4)
    if policy:  # the session keeps one copy of each shared kernel: no BatchNorm folded into a copy per conv
        optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph.initializer
        held = sum(numpy_helper.to_array(t).nbytes for t in optimized)
        assert held <= 1.05 * state_bytes(model.state_dict()) + 2**16, (held, state_bytes(model.state_dict()))
        for group in kshare.plan_of(model).groups:
            shape = tuple(modules[group.members[0]].weight.shape)
            assert sum(tuple(t.dims) == shape for t in optimized) <= 1 + sum(
                tuple(p.shape) == shape for n, p in model.named_parameters() if not any(
                    n.startswith(m + ".") for m in group.members)), group.name


def test_onnx_forms_against_the_copies_ort_makes_of_plain_initializers(tmp_path: Path) -> None:
    """The trap the forms avoid, measured on what a default session keeps: plain initializers, and
    ORT folds each conv's BatchNorm into a copy of the shared kernel; `affine` rewrites every
    BatchNorm after a shared conv (none left for ORT to fold) and lists no kernel as an input;
    `inputs` lists each shared kernel."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    torch.manual_seed(0)
    model = kshare.tie(trained_bn(load_model("resnet18")[0]), "all", init="mean", input_size=(3, 64, 64))
    groups = len(kshare.plan_of(model).groups)
    held, nodes = {}, {}
    for form in ("affine", "inputs", "plain"):
        path = kshare.export_onnx(model, tmp_path / f"{form}.onnx", input_size=(3, 64, 64), form=form)
        graph = onnx.load(str(path)).graph
        assert len(graph.input) == (1 + groups if form == "inputs" else 1), form
        nodes[form] = Counter(n.op_type for n in graph.node)
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{form}.optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        held[form] = sum(numpy_helper.to_array(t).nbytes
                         for t in onnx.load(options.optimized_model_filepath).graph.initializer)
    members = sum(len(g.members) for g in kshare.plan_of(model).groups)
    assert nodes["plain"]["BatchNormalization"] - nodes["affine"]["BatchNormalization"] == members, nodes
    assert nodes["affine"]["Conv"] - nodes["plain"]["Conv"] == members
    assert held["plain"] > 1.3 * held["affine"], held
    assert held["plain"] > 1.3 * held["inputs"], held
    with pytest.raises(ExportError, match="form"):
        kshare.export_onnx(model, tmp_path / "x.onnx", input_size=(3, 64, 64), form="folded")
    assert not (tmp_path / "x.onnx").exists()


def test_safetensors_loads_back_tied(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, _ = load_model("kshare:convmixer_64_4")
    kshare.tie(model, "all")
    path = kshare.export_safetensors(model, tmp_path / "m.safetensors")
    assert path.stat().st_size <= 1.02 * state_bytes(model.state_dict()) + 16_384
    loaded = kshare.load(path)
    plan = kshare.plan_of(loaded)
    assert plan is not None and all(len(ids) == 1 for ids in _aliasing(loaded, plan))
    _outputs_equal(model, loaded, (3, 32, 32))


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned_by_checkpoint",))


def _runner(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_hostile_and_broken_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model, _ = load_model("resnet18")
    kshare.tie(model, "stage")
    good = kshare.save(model, tmp_path / "good.pt")

    evil = tmp_path / "evil.pt"
    torch.save({"format": "kshare.checkpoint/1", "state": {}, "aliases": {}, "x": _Evil()}, evil)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save(model.state_dict(), foreign)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    cases = [
        (evil, "refused"),
        (truncated, "cannot read"),
        (foreign, "not a kshare checkpoint"),
        (text, "cannot read"),
        (tmp_path / "missing.pt", "not found"),
    ]
    for path, message in cases:
        with pytest.raises(kshare.CheckpointError, match=message):
            kshare.load(path)
        for command in (["info", str(path)], ["export", str(path), "--safetensors", "x.safetensors"]):
            code, out = _runner(*command)
            assert code == 2 and out.startswith("error: ") and message in out, (command, out)
            assert len(out.strip().splitlines()) == 1
    assert not (tmp_path / "pwned_by_checkpoint").exists()

    # tensors that do not fit the model they are loaded into
    with pytest.raises(kshare.CheckpointError, match="do not fit"):
        kshare.load(good, load_model("resnet34")[0])
    # a plan that does not fit: a member renamed
    payload = torch.load(good, weights_only=True)
    group = payload["plan"]["groups"][0]
    group["members"] = ("layer9.conv1", *group["members"][1:])
    bad_plan = tmp_path / "bad_plan.pt"
    torch.save(payload, bad_plan)
    with pytest.raises(kshare.CheckpointError, match=r"plan .*layer9\.conv1"):
        kshare.load(bad_plan)
    code, out = _runner("export", str(bad_plan), "--safetensors", "x.safetensors")
    assert code == 2 and "layer9.conv1" in out and len(out.strip().splitlines()) == 1


def test_interrupted_save_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = load_model("resnet18")
    path = kshare.save(model, tmp_path / "m.pt")
    before = path.read_bytes()

    def crash(obj: object, f: object) -> None:
        Path(str(f)).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(kshare.io.checkpoint.torch, "save", crash)
    kshare.tie(model, "all")
    with pytest.raises(KeyboardInterrupt):
        kshare.save(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def _with_spec(good: Path, target: Path, spec: dict) -> Path:
    payload = torch.load(good, weights_only=True)
    payload["spec"] = spec
    torch.save(payload, target)
    return target


def test_a_spec_naming_user_code_is_built_only_when_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint is data: loading it must not import or call code it names, unless the user says so."""
    monkeypatch.chdir(tmp_path)
    good = kshare.save(load_model("kshare:convmixer_32_2")[0], tmp_path / "good.pt")
    marker = tmp_path / "pwned"
    evil_py = tmp_path / "evil_net.py"
    evil_py.write_text(f"open({str(marker)!r}, 'w').close()\n"
                       "from kshare.models.paper import convmixer\n"
                       "def build():\n    return convmixer(32, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    hostile = {
        "system": _with_spec(good, tmp_path / "system.pt",
                             {"source": "python", "name": "os:system", "kwargs": {"command": f"touch {marker}"}}),
        "module": _with_spec(good, tmp_path / "module.pt", {"source": "python", "name": "evil_net:build"}),
        "file": _with_spec(good, tmp_path / "file.pt", {"source": "file", "name": f"{evil_py}:build"}),
        "io": _with_spec(good, tmp_path / "io.pt", {"source": "python", "name": "torchvision.io:write_file",
                                                    "kwargs": {"filename": str(marker), "data": None}}),
    }
    for path in hostile.values():
        with pytest.raises(kshare.CheckpointError, match="`trust_code=True`"):
            kshare.load(path)
        for command in (["eval", str(path), "--data", "digits"], ["export", str(path), "--safetensors", "x.st"],
                        ["fold", str(path), "--out", "f.pt"], ["finetune", str(path), "--data", "digits"]):
            code, out = _runner(*command)
            assert code == 2 and "--trust-code" in out and len(out.strip().splitlines()) == 1, (command, out)
        assert not marker.exists(), path
    assert "evil_net" not in __import__("sys").modules  # not even imported

    # trusted, the user's own model file is rebuilt (and runs, as the user asked)
    model = kshare.load(hostile["file"], trust_code=True)
    assert marker.exists() and sum(p.numel() for p in model.parameters()) > 0
    # a model class of torchvision's own model package needs no trust
    dense = load_model("torchvision.models.densenet:DenseNet", {"growth_rate": 4, "block_config": (1, 1),
                                                                "num_init_features": 8, "num_classes": 3})[0]
    path = kshare.save(dense, tmp_path / "dense.pt")
    assert isinstance(kshare.load(path), nn.Module)


def test_wrong_kinds_inside_a_safe_file_are_one_line_errors(tmp_path: Path) -> None:
    good = kshare.save(load_model("kshare:convmixer_32_2")[0], tmp_path / "good.pt")
    for section, value, message in (("state", {"a": "not a tensor"}, "'state' section"),
                                    ("aliases", {"a": torch.zeros(1)}, "'aliases' section"),
                                    ("spec", ["resnet18"], "model spec is malformed"),
                                    ("plan", {"format": "kshare.plan/1", "totals": []}, "malformed kshare plan")):
        payload = torch.load(good, weights_only=True)
        payload[section] = value
        path = tmp_path / f"{section}.pt"
        torch.save(payload, path)
        with pytest.raises(kshare.KShareError, match=message):
            kshare.load(path)
        code, out = _runner("info", str(path))
        assert code == 2 and message in out and len(out.strip().splitlines()) == 1, out
