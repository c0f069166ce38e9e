"""Export a (tied) model to ONNX with every shared tensor stored once.

PyTorch's TorchScript-based exporter (`dynamo=False`) emits one initializer per
parameter object, so a tied kernel is one initializer used by many Conv nodes. The
`torch.export`-based exporter has open problems with tied parameters, so kshare does not
use it. `export_onnx` checks the result: the file must not be much larger than the model's
unique tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from kshare._files import atomic_write
from kshare.analysis.inspect import parse_input_size
from kshare.errors import ExportError, param
from kshare.io.payload import state_bytes
from kshare.models.zoo import default_input_size, spec_of
from kshare.surgery.relax import is_relaxed
from kshare.surgery.tie import plan_of

ONNX_SLACK = 1.05
OPSETS = (11, 20)  # the TorchScript exporter's range, from the first opset with every op kshare's models use


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: Sequence[int] | str | None = None,
    opset: int = 17,
) -> Path:
    """Write `model` (eval mode, batch dimension dynamic) as ONNX with shared initializers.

    A relaxed model keeps its structure in the graph (shared kernel, per-member scale and
    low-rank factors, a Mul/MatMul/Add per member), so the file stays as small as the checkpoint.
    Constant folding is off for tied models: it would fold each member's BatchNorm into its own
    copy of the shared kernel (every trained model has BatchNorm statistics to fold). The file
    is checked with `onnx.checker` and against the unique tensor bytes before it replaces `path`.
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or not OPSETS[0] <= opset <= OPSETS[1]:
        raise ExportError(f"ONNX opset {opset!r} is not supported: expected {OPSETS[0]} to {OPSETS[1]} "
                          f"({param('opset')})")
    size = parse_input_size(input_size) if input_size is not None else default_input_size(model, spec_of(model))
    ref = next(iter(model.parameters()), None)
    x = torch.randn(1, *size, dtype=ref.dtype if ref is not None else torch.float32,
                    device=ref.device if ref is not None else "cpu")
    flags = [(m, m.training) for m in model.modules()]
    model.eval()

    def write(tmp: Path) -> None:
        try:
            import onnx

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model, (x,), str(tmp), dynamo=False, opset_version=opset,
                    # folding precomputes per member: every relaxed kernel, every BatchNorm folded into a
                    # tied kernel, each duplicating the shared tensor
                    do_constant_folding=plan_of(model) is None and not is_relaxed(model),
                    input_names=["input"], output_names=["output"],
                    dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                )
            onnx.checker.check_model(str(tmp))
        except ImportError as exc:
            raise ExportError(f"ONNX export needs the onnx package ({exc.name}): pip install 'kshare[export]'") \
                from None
        except Exception as exc:
            raise ExportError(f"ONNX export failed: {type(exc).__name__}: {_first_line(exc)}") from None
        limit = ONNX_SLACK * state_bytes(model.state_dict()) + 2**20
        if tmp.stat().st_size > limit:
            raise ExportError(
                f"ONNX export stored {tmp.stat().st_size:,} bytes for {state_bytes(model.state_dict()):,} bytes "
                "of unique tensors: shared kernels were duplicated; file not written"
            )

    try:
        return atomic_write(path, write, ExportError)
    finally:
        for m, flag in flags:
            m.training = flag
