"""What an exported file costs once deployed: ONNX Runtime session memory and latency measured in
a fresh process, tied against the same model untied; `kshare info FILE.onnx`."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import kshare
from kshare.cli import app
from kshare.errors import ExportError
from kshare.io.deployed import deployed_cost, example_shape, measure_session, summarize_onnx
from kshare.models.zoo import load_model

pytest.importorskip("onnxruntime")
SIZE = (3, 32, 32)


def cli(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.output


def trained_like(model: nn.Module) -> nn.Module:
    """BatchNorm statistics as a trained network has them: random ones fold to equal kernels."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = kshare.tie(trained_like(load_model("resnet18")[0]), "stage", init="mean").eval()
    path = kshare.export_onnx(model, tmp_path_factory.mktemp("onnx") / "tied.onnx", input_size=SIZE)
    return model, path


def test_the_untied_baseline_stays_untied_even_where_its_copies_are_equal(tmp_path: Path) -> None:
    """PyTorch's exporter merges parameters of equal value; a baseline must not be merged."""

    class Twins(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)
            self.b.load_state_dict(self.a.state_dict())  # equal values, two parameters

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(x)

    model = Twins().eval()
    merged = onnx.load(str(kshare.export_onnx(model, tmp_path / "m.onnx", input_size=(3, 8, 8))))
    apart = onnx.load(str(kshare.export_onnx(model, tmp_path / "a.onnx", input_size=(3, 8, 8), deduplicate=False)))
    kernels = [[t.name for t in p.graph.initializer if len(t.dims) == 4] for p in (merged, apart)]
    assert len(kernels[0]) == 1 and len(kernels[1]) == 2
    assert [i.name for i in apart.graph.input] == ["input"]  # the kept copies are constants, not inputs


def test_a_tied_session_is_measured_against_the_same_model_untied(tied: tuple[nn.Module, Path]) -> None:
    model, path = tied
    cost = deployed_cost(model, path, (1, *SIZE), input_size=SIZE)
    assert cost.untied is not None
    assert cost.tied.memory_bytes > 0 and cost.untied.memory_bytes > 0
    assert cost.tied.latency_s > 0 and cost.untied.latency_s > 0
    assert cost.untied.file_bytes > 1.8 * cost.tied.file_bytes  # resnet18 `stage`: 2.17x fewer parameters
    assert cost.untied_bytes > 1.8 * cost.tied_bytes
    want = cost.tied.memory_bytes / (cost.untied.memory_bytes * cost.tied_bytes / cost.untied_bytes)
    assert cost.memory_ratio == pytest.approx(want)
    assert "the same model untied" in cost.line() and json.loads(json.dumps(cost.to_dict()))["memory_ratio"]


def test_an_onnx_file_is_summarised_and_its_session_measured(tied: tuple[nn.Module, Path]) -> None:
    model, path = tied
    summary = summarize_onnx(path)
    proto = onnx.load(str(path))
    assert summary["initializers"] == len(proto.graph.initializer) and summary["file_bytes"] == path.stat().st_size
    members = sum(len(g.members) for g in kshare.plan_of(model).groups)
    assert summary["shared_kernels"] == len(kshare.plan_of(model).groups) and summary["kept_shared"] == 0
    assert summary["affine_batchnorms"] == members  # the default form: each member's BatchNorm a 1x1 conv
    inputs = summarize_onnx(kshare.export_onnx(model, path.with_name("inputs.onnx"), input_size=SIZE, form="inputs"))
    assert inputs["kept_shared"] == summary["shared_kernels"] and inputs["affine_batchnorms"] == 0
    assert summary["inputs"] == [{"name": "input", "shape": ["batch", *SIZE]}]
    assert example_shape(summary, SIZE) == (1, *SIZE)
    assert example_shape({"inputs": [{"name": "x", "shape": [3, "height", "width"]}]}, (3, 40, 48)) == (3, 40, 48)
    code, out, _ = cli("info", path, "--input-size", "3,32,32", "--json")
    assert code == 0, out
    record = json.loads(out)
    assert record["session"]["memory_bytes"] > 0 and record["shared_kernels"] == summary["shared_kernels"]
    code, _, output = cli("info", path, "--input-size", "3,32,32")
    assert code == 0 and "ONNX Runtime default session" in output and f"{members} member BatchNorms" in output


def test_bad_files_and_missing_runtimes_say_so(tied: tuple[nn.Module, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    for path in (tmp_path / "missing.onnx", junk):
        code, _, output = cli("info", path)
        assert code == 2 and output.count("error:") == 1, output
    with pytest.raises(ExportError, match="could not run"):
        measure_session(junk, (1, *SIZE))
    with pytest.raises(ExportError, match="does not exist"):
        measure_session(tmp_path / "missing.onnx", (1, *SIZE))
    model, _ = tied
    checkpoint = kshare.save(model, tmp_path / "tied.pt")
    code, _, output = cli("export", checkpoint, "--onnx", tmp_path / "out.onnx", "--input-size", "3,32,32")
    assert code == 0 and "the same model untied" in output, output
    code, _, output = cli("export", checkpoint, "--onnx", tmp_path / "out.onnx", "--input-size", "3,32,32",
                          "--no-measure")
    assert code == 0 and "session" not in output.replace("sessions", "")
    code, _, output = cli("export", checkpoint, "--onnx", tmp_path / "bad.onnx", "--form", "folded")
    assert code == 2 and output.count("error:") == 1 and "--form" in output and "affine" in output, output
    assert not (tmp_path / "bad.onnx").exists()
    code, _, output = cli("export", checkpoint, "--onnx", tmp_path / "bad.onnx", "--int8", "--data",
                          f"images:{tmp_path}", "--form", "inputs")
    assert code == 2 and output.count("error:") == 1 and "--int8 writes its own" in output, output
    monkeypatch.setattr("kshare.cli.plan_commands.onnxruntime_available", lambda: False)
    code, _, output = cli("export", checkpoint, "--onnx", tmp_path / "out.onnx", "--input-size", "3,32,32")
    assert code == 0 and "pip install onnxruntime" in output
