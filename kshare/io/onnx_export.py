"""Export a (tied) model to ONNX with every shared tensor stored once.

PyTorch's TorchScript-based exporter (`dynamo=False`) emits one initializer per
parameter object, so a tied kernel is one initializer used by many Conv nodes. The
`torch.export`-based exporter has open problems with tied parameters, so kshare does not
use it. `export_onnx` checks the result: the file must not be much larger than the model's
unique tensors.

A small file is not yet a small session. ONNX Runtime's default optimisations fold each
Conv's BatchNorm into its weight and reorder weights into blocked layouts, one copy per Conv
node: a kernel shared by eight convs becomes eight tensors in memory, and a tied resnet50 took
more session memory than the untied one. ORT folds and reorders only *constant* initializers;
an initializer that is also a graph input may be overridden at run time, so ORT leaves it as it
is. The export therefore lists every shared kernel (an initializer of rank 3 or more that more
than one node reads, and a relaxed member's factors) among the graph inputs, with the stored
value as its default: sessions need no settings, callers feed only `input`, and the saving
survives the default session (`benchmarks/onnx_memory.py`). ORT logs a warning per such kernel
that it will not be treated as constant: that is the point.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kshare._files import atomic_write
from kshare.analysis.calls import example_call, family_of
from kshare.analysis.inspect import parse_input_size
from kshare.errors import ExportError, first_line, param
from kshare.io.payload import state_bytes
from kshare.models.zoo import default_input_size, spec_of
from kshare.surgery.relax import is_relaxed
from kshare.surgery.tie import plan_of

ONNX_SLACK = 1.05
OPSETS = (11, 20)  # the TorchScript exporter's range, from the first opset with every op kshare's models use


def shared_kernels(graph: Any) -> list[str]:
    """The initializers of `graph` (an ONNX GraphProto) that make shared kernels: those of rank 3
    or more (conv kernels; not BatchNorm's vectors) read by more than one node, and a relaxed
    member's own parameters (its scales and low-rank factors, under `parametrizations`), which a
    runtime would otherwise multiply out into a full-size delta per member."""
    readers = Counter(name for node in graph.node for name in node.input)
    return [t.name for t in graph.initializer
            if (len(t.dims) >= 3 and readers[t.name] > 1) or ".parametrizations." in t.name]


def keep_shared_in_sessions(path: Path) -> int:
    """List the shared kernels of the ONNX file at `path` among its graph inputs (overridable
    initializers: see the module), so runtimes cannot fold a copy per node; how many."""
    import onnx

    proto = onnx.load(str(path))
    inputs = {i.name for i in proto.graph.input}
    initializers = {t.name: t for t in proto.graph.initializer}
    names = [n for n in shared_kernels(proto.graph) if n not in inputs]
    for name in names:
        t = initializers[name]
        proto.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    if names:
        onnx.save(proto, str(path))
    return len(names)


def _io_names(model: nn.Module, args: tuple[Any, ...]) -> dict[str, Any]:
    """Input/output names and dynamic axes: a batch of images in and out for most models; for a
    detector (torchvision exports it with one image), the image's height and width vary, and so
    does the number of detections in each output, named by its key (`boxes`, `scores`, ...: the
    order differs between detectors, so it is read off one forward pass)."""
    if family_of(model) == "detection" and len(args) == 1 and isinstance(args[0], list):
        with torch.no_grad():
            out = model(*args)
        keys = list(out[0]) if isinstance(out, (list, tuple)) and out and isinstance(out[0], dict) else ["output"]
        return {"input_names": ["input"], "output_names": keys,
                "dynamic_axes": {"input": {1: "height", 2: "width"}, **{k: {0: "detections"} for k in keys}}}
    return {"input_names": ["input"], "output_names": ["output"],
            "dynamic_axes": {"input": {0: "batch"}, "output": {0: "batch"}}}


def constants_only(path: Path) -> None:
    """Drop the initializers of the ONNX file at `path` from its graph inputs: plain constants."""
    import onnx

    proto = onnx.load(str(path))
    initializers = {t.name for t in proto.graph.initializer}
    kept = [i for i in proto.graph.input if i.name not in initializers]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    onnx.save(proto, str(path))


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: Sequence[int] | str | None = None,
    opset: int = 17,
    keep_shared: bool = True,
    deduplicate: bool = True,
) -> Path:
    """Write `model` (eval mode, batch dimension dynamic) as ONNX with shared initializers.
    `keep_shared`: list the shared kernels among the graph inputs, so that ONNX Runtime's
    default session keeps one copy of each (see the module; False: plain initializers, for a
    runtime that wants none among the inputs, and whose optimiser may then copy them).
    `deduplicate`: PyTorch's exporter merges parameters of *equal value* into one initializer;
    False keeps every parameter its own (an untied baseline whose copies happen to be equal,
    as a folded tied model's are, must stay untied to be a baseline).

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
    args = example_call(model, size)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()

    def write(tmp: Path) -> None:
        try:
            import onnx

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                names = _io_names(model, args)
                torch.onnx.export(
                    model, args, str(tmp), dynamo=False, opset_version=opset,
                    # folding precomputes per member: every relaxed kernel, every BatchNorm folded into a
                    # tied kernel, each duplicating the shared tensor
                    do_constant_folding=plan_of(model) is None and not is_relaxed(model),
                    keep_initializers_as_inputs=not deduplicate,  # the exporter's only way to skip its merge
                    **names,
                )
            if not deduplicate:
                constants_only(tmp)
            if keep_shared:
                keep_shared_in_sessions(tmp)
            onnx.checker.check_model(str(tmp))
        except ImportError as exc:
            raise ExportError(f"ONNX export needs the onnx package ({exc.name}): pip install 'kshare[export]'") \
                from None
        except Exception as exc:
            raise ExportError(f"ONNX export failed: {type(exc).__name__}: {first_line(exc)}") from None
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
