"""Export a (tied) model to ONNX with every shared tensor stored once.

PyTorch's TorchScript-based exporter (`dynamo=False`) emits one initializer per
parameter object, so a tied kernel is one initializer used by many Conv nodes. The
`torch.export`-based exporter has open problems with tied parameters, so kshare does not
use it. `export_onnx` checks the result: the file must not be much larger than the model's
unique tensors.

A small file is not yet a small session. ONNX Runtime's default optimisations fold each
Conv's BatchNorm into its weight (a new tensor per Conv node) and reorder constant weights into a
blocked layout: written as PyTorch writes it, a kernel shared by eight convs became eight tensors
in memory, and a tied resnet50 took more session memory than the untied one. The export writes
the shared kernels in one of three forms (`FORMS`), measured in `benchmarks/onnx_memory.py`:

- `affine` (the default): each member's BatchNorm after a shared conv becomes its own
  depthwise 1x1 convolution (per-channel scale as its weight, shift as its bias). No ORT fusion
  merges one conv into another, so the shared kernel stays one constant, which ORT reorders once
  and runs on its fast path: the untied model's latency, most of the memory saving.
- `inputs`: every shared kernel is also a graph input with its stored value as default. ORT
  neither folds nor reorders an overridable initializer: the least memory, but those convs run
  on the slow path (1.2x to 1.6x the untied latency).
- `plain`: as PyTorch writes it, for runtimes that fold per node anyway (the int8 export).

In `affine`, a shared kernel that a node other than a Conv reads (a relaxed member's factors), or
whose conv output still feeds a Mul or BatchNorm a fusion could merge, is kept as a graph input
as in `inputs`: no form leaves ORT a way to copy it. Callers feed only `input` in every form.
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
FORMS = ("affine", "inputs", "plain")
AFFINE_SUFFIX = ".affine"  # the name of a member's BatchNorm written as a depthwise conv ends so
OPSETS = (11, 20)  # the TorchScript exporter's range, from the first opset with every op kshare's models use


def shared_kernels(graph: Any) -> list[str]:
    """The initializers of `graph` (an ONNX GraphProto) that make shared kernels: those of rank 3
    or more (conv kernels; not BatchNorm's vectors) read by more than one node, and a relaxed
    member's own parameters (its scales and low-rank factors, under `parametrizations`), which a
    runtime would otherwise multiply out into a full-size delta per member."""
    readers = Counter(name for node in graph.node for name in node.input)
    return [t.name for t in graph.initializer
            if (len(t.dims) >= 3 and readers[t.name] > 1) or ".parametrizations." in t.name]


def keep_shared_in_sessions(path: Path, names: Sequence[str] | None = None) -> int:
    """List the shared kernels of the ONNX file at `path` (or only `names` of them) among its graph
    inputs (overridable initializers: see the module), so runtimes cannot fold a copy per node;
    how many."""
    import onnx

    proto = onnx.load(str(path))
    inputs = {i.name for i in proto.graph.input}
    initializers = {t.name: t for t in proto.graph.initializer}
    names = [n for n in (shared_kernels(proto.graph) if names is None else names) if n not in inputs]
    for name in names:
        t = initializers[name]
        proto.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    if names:
        onnx.save(proto, str(path))
    return len(names)


def stored_name(name: str, initializers: dict[str, Any], producer: dict[str, Any]) -> str:
    """The initializer behind `name`: the exporter reads a parameter equal to another through an Identity."""
    while name not in initializers and name in producer and producer[name].op_type == "Identity":
        name = producer[name].input[0]
    return name


def batchnorm_terms(node: Any, array: Any) -> tuple[Any, Any, Any]:
    """A BatchNormalization node's per-channel scale γ/√(var + ε), shift β and mean, float64, its
    vectors read by `array(name)`."""
    import numpy as np

    gamma, beta, mean, var = (array(n).astype(np.float64) for n in node.input[1:5])
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    return gamma / np.sqrt(var + eps), beta, mean


def keep_read_initializers(graph: Any) -> None:
    """Drop the initializers of `graph` that no node reads."""
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def batchnorms_as_convs(path: Path) -> list[str]:
    """Rewrite the ONNX file at `path` in the `affine` form (see the module): each BatchNorm that
    alone reads a conv of a shared kernel becomes a depthwise 1x1 Conv with the same per-channel
    scale and shift. Returns the shared kernels that must still be graph inputs: those some node
    reads other than as a Conv's weight, or whose conv feeds a node an ORT fusion could fold."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(path))
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    shared = set(shared_kernels(graph))
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    def stored(name: str) -> str:
        return stored_name(name, initializers, producer)

    rewritten: dict[int, Any] = {}
    for node in graph.node:
        conv = producer.get(node.input[0]) if node.op_type == "BatchNormalization" and node.input else None
        if (conv is None or conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in shared
                or len(readers[conv.output[0]]) != 1 or any(stored(n) not in initializers for n in node.input[1:5])):
            continue
        scale, beta, mean = batchnorm_terms(node, lambda n: numpy_helper.to_array(initializers[stored(n)]))
        rank = len(initializers[conv.input[1]].dims)
        weight = numpy_helper.from_array(scale.reshape(-1, *[1] * (rank - 1)).astype(np.float32),
                                         node.output[0] + ".scale")
        bias = numpy_helper.from_array((beta - mean * scale).astype(np.float32), node.output[0] + ".shift")
        graph.initializer.extend([weight, bias])
        rewritten[id(node)] = helper.make_node("Conv", [node.input[0], weight.name, bias.name], [node.output[0]],
                                               name=(node.name or node.output[0]) + AFFINE_SUFFIX, group=len(scale),
                                               kernel_shape=[1] * (rank - 2))
    nodes = [rewritten.get(id(n), n) for n in graph.node]
    read = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if n.op_type != "Identity" or any(o in read for o in n.output)]  # left unread
    del graph.node[:]
    graph.node.extend(nodes)
    keep_read_initializers(graph)  # the BatchNorms' own vectors are gone
    onnx.save(proto, str(path))
    foldable = {"BatchNormalization", "Mul", "Div"}
    consumers = {name: [n for n in nodes if name in n.input] for name in shared}
    return sorted(name for name in shared if any(
        n.op_type != "Conv" or list(n.input).index(name) != 1
        or any(c.op_type in foldable for out in n.output for c in nodes if out in c.input)
        for n in consumers[name]))


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
    form: str = "affine",
    deduplicate: bool = True,
) -> Path:
    """Write `model` (eval mode, batch dimension dynamic) as ONNX with shared initializers.
    `form`: how shared kernels are written so that ONNX Runtime's default session keeps one copy
    of each (`FORMS`, see the module): `affine` (BatchNorms after shared convs as depthwise 1x1
    convs: untied speed), `inputs` (shared kernels also graph inputs: least memory, slower), or
    `plain` (as PyTorch writes it; ORT then folds a copy per conv).
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
    if form not in FORMS:
        raise ExportError(f"unknown ONNX form {form!r}: expected one of {', '.join(FORMS)} ({param('form')})")
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
            if form == "affine":
                keep_shared_in_sessions(tmp, batchnorms_as_convs(tmp))
            elif form == "inputs":
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
