"""int8 that keeps sharing (`kshare.quantize.export_int8`, `kshare export --int8`): ONNX Runtime's
static quantisation of a tied model holds each shared kernel as one int8 tensor, the file is a
fraction of the fp32 one, and the int8 model agrees with the fp32 one on held-out images."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import kshare
from kshare import FitConfig
from kshare.cli import app
from kshare.surgery.relax import is_relaxed

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tied(trained: nn.Module, digits) -> nn.Module:
    train, _ = digits
    return kshare.tie(copy.deepcopy(trained), "all", input_size=(1, 8, 8), calib=train, fit=FitConfig(images=256))


def test_int8_export_holds_each_shared_kernel_once_and_agrees_with_fp32(tied: nn.Module, digits,
                                                                         tmp_path: Path) -> None:
    from kshare.quantize import export_int8

    train, _ = digits
    found = export_int8(tied, tmp_path / "m.int8.onnx", train, calib_images=256, held_out=256)
    graph = onnx.load(str(found.path)).graph
    modules = dict(tied.named_modules())
    for group in kshare.plan_of(tied).groups:
        shape = list(modules[group.members[0]].weight.shape)
        int8 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and list(t.dims) == shape]
        floats = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and list(t.dims) == shape]
        assert len(int8) == 1 and not floats, (group.name, len(int8), len(floats))
    assert found.shared_int8 == found.shared_kernels == len(kshare.plan_of(tied).groups)
    assert not [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 3]
    int8_bytes = sum(len(t.raw_data) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8)
    assert int8_bytes <= 0.26 * sum(p.numel() * 4 for p in tied.parameters() if p.dim() >= 2)  # one byte a weight
    assert found.fidelity is not None and found.fidelity.images == 256
    assert found.fidelity.top1 >= 0.9, found.fidelity  # int8 against fp32 on images it was not calibrated on
    assert found.calibration_images == 256 and "int8" in found.line()


def test_cli_export_int8_and_its_errors(tied: nn.Module, tmp_path: Path) -> None:
    from PIL import Image

    checkpoint = tmp_path / "tied.pt"
    _save_rebuildable(tied, checkpoint)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    data = kshare.load_data("digits", "test")
    for i in range(80):
        Image.fromarray(data.images[i, 0].numpy()).save(pictures / f"{i:03}.png")
    runner = CliRunner()

    def run(*args: object) -> tuple[int, str]:
        result = runner.invoke(app, [str(a) for a in args] + ["--trust-code"], env={"COLUMNS": "200"})
        return result.exit_code, result.output

    code, out = run("export", checkpoint, "--onnx", tmp_path / "m.onnx", "--int8", "--data", f"images:{pictures}",
                    "--calib-images", "60", "--held-out", "20")
    assert code == 0 and "int8" in out and "top-1 agreement" in out, out
    assert (tmp_path / "m.onnx").stat().st_size > 0
    (tmp_path / "empty").mkdir()
    for args, match in [((), "--data"), (("--data", f"images:{tmp_path / 'missing'}"), "not"),
                        (("--data", f"images:{tmp_path / 'empty'}"), ""),
                        (("--data", f"images:{pictures}", "--calib-images", "0"), "--calib-images must be")]:
        code, out = run("export", checkpoint, "--onnx", tmp_path / "x.onnx", "--int8", *args)
        assert code == 2 and out.strip().splitlines()[-1].startswith("error:") and match in out, out
        assert not (tmp_path / "x.onnx").exists()
    code, out = run("export", checkpoint, "--onnx", tmp_path / "x.onnx", "--data", f"images:{pictures}")
    assert code == 2 and "--int8" in out, out


def _save_rebuildable(model: nn.Module, path: Path) -> None:
    """Save `model` (the `trained` fixture's architecture) with a spec the CLI rebuilds it from: the
    test's own factory, loaded with --trust-code."""
    _, spec = kshare.load_model(f"{Path(__file__).parent / 'conftest.py'}:make_residual_bn_used",
                                {"in_chans": 1, "width": 16}, None)
    kshare.save(model, path, spec=spec)


def _fused_convs(path: Path, tmp: Path) -> int:
    """How many of the int8 file's convs a default ONNX Runtime session runs as one fused int8 conv."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp / f"{path.stem}.optimised.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sum(n.op_type == "QLinearConv" for n in onnx.load(options.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("relax", [None, "scale"])
def test_int8_members_fold_their_batchnorm_into_the_shared_int8_kernel(trained: nn.Module, digits,
                                                                       tmp_path: Path, relax: str | None) -> None:
    """Each member's BatchNorm (and scale relaxation) becomes its own scale vector on the one int8
    kernel, negative factors included, so the tied model's convs fuse into int8 convs as the
    untied model's do."""
    from kshare.quantize import export_int8

    train, _ = digits
    untied = copy.deepcopy(trained)
    gen = torch.Generator().manual_seed(0)
    for m in untied.modules():
        if isinstance(m, nn.BatchNorm2d):  # a trained network's BatchNorm scales some channels by a negative factor
            m.weight.data *= torch.where(torch.rand(m.weight.shape, generator=gen) < 0.25, -1.0, 1.0)
            m.weight.data[:2] = torch.tensor([0.0, 1e-9])  # channels switched off: their bias alone must survive
            m.bias.data[:2] = 0.5
    tied = kshare.tie(copy.deepcopy(untied), "all", input_size=(1, 8, 8), calib=train, fit=FitConfig(images=256),
                      relax=relax)
    assert is_relaxed(tied) == (relax is not None)
    found = export_int8(tied, tmp_path / "tied.onnx", train, calib_images=256, held_out=256)
    graph = onnx.load(str(found.path)).graph
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    shared = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 3
              and sum(t.name in n.input for n in graph.node) > 1}
    assert len(shared) == found.shared_int8 == len(kshare.plan_of(tied).groups)
    scales = [initializers[n.input[1]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in shared]
    assert any((s < 0).any() for s in scales) and all(s.all() for s in scales)
    assert found.fidelity is not None and found.fidelity.top1 >= 0.9 and found.fidelity.kl < 0.01, found.fidelity
    baseline = export_int8(untied, tmp_path / "untied.onnx", train, calib_images=256, held_out=0)
    convs = sum(n.op_type == "Conv" for n in graph.node)
    assert _fused_convs(found.path, tmp_path) == _fused_convs(baseline.path, tmp_path) == convs > 0


def test_int8_export_refuses_low_rank_members_in_one_line(trained: nn.Module, tmp_path: Path) -> None:
    from kshare.errors import ExportError
    from kshare.quantize import export_int8

    relaxed = kshare.tie(copy.deepcopy(trained), "all", relax="lora:2")
    with pytest.raises(ExportError, match="lora") as caught:
        export_int8(relaxed, tmp_path / "m.onnx", kshare.load_data("digits", "test"), calib_images=16, held_out=0)
    assert "\n" not in str(caught.value) and not (tmp_path / "m.onnx").exists()
    _save_rebuildable(relaxed, tmp_path / "relaxed.pt")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "relaxed.pt"), "--onnx", str(tmp_path / "m.onnx"),
                                      "--int8", "--data", "digits", "--calib-images", "16", "--trust-code"],
                                env={"COLUMNS": "200"})
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and lines[-1].startswith("error:") and "lora" in lines[-1], result.output
    assert not (tmp_path / "m.onnx").exists()
