"""int8 that multiplies with sharing: static post-training quantisation of a (tied) model's ONNX
export through ONNX Runtime's quantisation tools, calibrated on the user's images.

    export_onnx(plain initializers) → fold each BatchNorm into its conv, a copy per member of a
    shared kernel (`kshare.io.int8_graph`) → quantize_static (QDQ, per-channel int8 weights, uint8
    activations, calibrated on `calib_images` of the data) → one int8 tensor per shared kernel
    again, each member's BatchNorm in its own scale vector → check: one int8 tensor per shared
    kernel → fidelity of the int8 session against the fp32 model on held-out images

Every conv then fuses into one int8 conv in ONNX Runtime, as the untied model's do (a tied
resnet50 ran at 1.9x the untied int8 latency with its BatchNorms left in float). Activations are
uint8, ONNX Runtime's fast path on x86 (int8 activations left 20 of resnet50's 53 convs in float
there, untied too: 2.3x slower). A model whose BatchNorms cannot all be folded (one not right
after a conv, as in ConvMixer) keeps them in float, and the outputs of convs too. The check
makes one int8 tensor per shared kernel a guarantee, not a hope (`Int8Export.shared_int8`).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kshare._files import atomic_write
from kshare.data import ImageSource, adapter_for, as_image_data, decoding_for
from kshare.errors import DataError, ExportError, first_line, param
from kshare.fit.fidelity import Fidelity, measure_fidelity
from kshare.fit.statistics import fit_batches
from kshare.io.int8_graph import fold_batchnorms, reshare_int8
from kshare.io.onnx_export import export_onnx, shared_kernels
from kshare.surgery.relax import MemberDelta

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 16


@dataclass(frozen=True)
class Int8Export:
    """What `export_int8` wrote: the file, its bytes, how many shared kernels it holds (each as
    one int8 tensor), the images it was calibrated on, and its fidelity to the fp32 model on
    held-out images (None: none left to hold out)."""

    path: Path
    file_bytes: int
    shared_kernels: int
    shared_int8: int
    calibration_images: int
    fidelity: Fidelity | None
    seconds: float

    def line(self) -> str:
        return (f"wrote {self.path} ({self.file_bytes / 2**20:.1f} MiB, int8): {self.shared_int8} shared kernel(s) "
                f"as one int8 tensor each, calibrated on {self.calibration_images} images"
                + (f"; against the fp32 model: {self.fidelity.line()}" if self.fidelity else ""))


class OnnxSession(nn.Module):
    """An ONNX file's Runtime session (CPU, default optimisations) as a module, for the fidelity
    measures."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"input": x.detach().cpu().numpy()})[0])


def export_int8(model: nn.Module, path: str | Path, data: ImageSource, *, calib_images: int = 256,
                held_out: int = 256,
                input_size: Sequence[int] | str | None = None, image_size: int | None = None,
                opset: int = 17) -> Int8Export:
    """Write `model` as int8 ONNX (QDQ, per-channel weights) calibrated on `calib_images` images of
    `data` (no labels needed), checked to hold each shared kernel once, and measured against
    the fp32 `model` on up to `held_out` further images of `data`."""
    start = time.perf_counter()
    for name, value in (("calib_images", calib_images), ("held_out", held_out)):
        least = 1 if name == "calib_images" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise DataError(f"{param(name)} must be a whole number of at least {least}, "
                            f"got {value!r}")
    try:
        import onnx
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    except ImportError as exc:
        raise ExportError(f"int8 export needs onnx and onnxruntime ({exc.name}): pip install 'kshare[export]'"
                          ) from None
    if any(isinstance(m, MemberDelta) and m.lora_a is not None for m in model.modules()):
        raise ExportError("int8 export keeps one int8 kernel per group for plainly tied and scale-relaxed members; "
                          "a low-rank (lora) delta would need each member's own int8 copy: export it in fp32 "
                          "(without --int8), or tie it without lora")
    model = model.eval()
    found = as_image_data(data, limit=calib_images + held_out, image_size=decoding_for(model, image_size))
    n = len(found.labels)
    calibration = min(calib_images, n - min(held_out, n // 4)) if held_out else min(calib_images, n)
    if calibration < 1:
        raise DataError(f"{found.name} holds {n} image(s): too few to calibrate int8 on")
    adapter = adapter_for(model, found, image_size)
    device = torch.device("cpu")
    model.to(device)
    batches = fit_batches(found, calibration, CALIBRATION_BATCH, adapter, device)
    rest = found.beyond(calibration, min(held_out, n - calibration), 0) if held_out and n > calibration else None
    probe = fit_batches(rest, len(rest.labels), 128, adapter, device) if rest is not None else []

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.items = iter([{"input": x.numpy()} for x in batches])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"  # plain initializers: the quantiser reads graph inputs as activations
        export_onnx(model, fp32, input_size=input_size or tuple(batches[0].shape[1:]), opset=opset,
                    form="plain")
        graph = onnx.load(str(fp32)).graph
        ranks = {t.name: len(t.dims) for t in graph.initializer}
        kernels = [k for k in shared_kernels(graph) if ranks[k] >= 3]  # a scale relaxation folds into the scales
        folding = fold_batchnorms(fp32)
        norms = _unfolded_batchnorms(onnx.load(str(fp32)).graph) if folding.left else []
        quantised = Path(tmp) / "int8.onnx"
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantiser's advice to pre-process, on the root logger
        try:
            quantize_static(str(fp32), str(quantised), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            nodes_to_exclude=norms,
                            extra_options={"OpTypesToExcludeOutputQuantization": ["Conv"]} if norms else {})
        except Exception as exc:
            raise ExportError(f"int8 quantisation failed: {type(exc).__name__}: {first_line(exc)}") from None
        finally:
            root.setLevel(level)
        reshare_int8(quantised, folding)
        shared = _shared_int8(onnx.load(str(quantised)).graph, kernels)
        fidelity = measure_fidelity(OnnxSession(quantised), model, probe) if probe else None

        def write(target: Path) -> None:
            target.write_bytes(quantised.read_bytes())

        written = atomic_write(path, write, ExportError)
    result = Int8Export(written, written.stat().st_size, len(kernels), shared, calibration, fidelity,
                        time.perf_counter() - start)
    log.info(result.line())
    return result


def _unfolded_batchnorms(graph: Any) -> list[str]:
    """The BatchNormalization nodes of `graph` that `fold_batchnorms` left; quantising a conv's output there
    would round it to one scale for every channel *before* BatchNorm spreads them apart again
    (a tied digits net: 0.70 top-1 agreement with fp32 so). These nodes, and the outputs of
    convs when there are any, stay float."""
    return [node.name for node in graph.node if node.op_type == "BatchNormalization"]


def _shared_int8(graph: Any, kernels: Sequence[str]) -> int:
    """How many of the fp32 graph's shared `kernels` the int8 graph holds as exactly one int8
    tensor and no float copy; ExportError where one is held otherwise."""
    import onnx

    initializers = {t.name: t for t in graph.initializer}
    for name in kernels:
        floats = name in initializers and initializers[name].data_type == onnx.TensorProto.FLOAT
        quantised = [t for t in graph.initializer if t.name.startswith(name) and t.data_type == onnx.TensorProto.INT8
                     and len(t.dims) >= 3]
        if floats or len(quantised) != 1:
            raise ExportError(f"the int8 file holds shared kernel {name} as {len(quantised)} int8 tensor(s)"
                              + (" and a float copy" if floats else "") + ": not written")
    return len(kernels)
