"""The graph surgery that lets int8 keep sharing at the untied model's speed.

ONNX Runtime runs a QDQ conv fast only as one fused int8 conv (`QLinearConv`): int8 input, int8
weight, int8 output. A tied model keeps each member's BatchNorm as its own node (folding it would
copy the shared kernel), and a BatchNorm between a conv and its output's quantisation leaves the
conv in float: a tied resnet50 ran at 1.9x the untied int8 latency.

The way out is arithmetic. Folding member m's BatchNorm scales the shared kernel W by a vector s_m
(one factor per output channel). Per-channel symmetric int8 of W is q = round(W/w), w = max|W|/127
per channel; then q·(w·s_m) is W·s_m to the same half step, and q is one tensor for every member.
So:

1. `fold_batchnorms` folds every BatchNorm into the conv before it, giving each member of a shared
   kernel its own folded copy (an untied float graph, only in a temporary file, to calibrate and
   quantise as the untied model is: activation scales as the untied model's);
2. the quantiser makes every conv a fused-int8 candidate;
3. `reshare_int8` puts one int8 tensor per shared kernel back: every member's weight
   DequantizeLinear reads q with its own scale vector w·s_m (signed), and its bias is
   requantised to the new scale; the members' own int8 copies go. Where w·s_m is so small that
   the bias would overflow int32 (a channel its BatchNorm all but switches off), the scale is
   raised until the bias fits, as ONNX Runtime's quantiser does for untied weights: the
   channel's weight term, already negligible beside its bias, changes by a bounded fraction.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kshare.errors import ExportError
from kshare.io.onnx_export import batchnorm_terms, keep_read_initializers, stored_name


@dataclass(frozen=True, eq=False)
class FoldedMember:
    """A conv that read shared kernel `kernel` and now reads its own folded copy: the per-channel
    factor folded into it (`factor`, its BatchNorm's and a scale relaxation's) and its folded
    bias, float64 arrays."""

    conv: str
    kernel: str
    factor: Any
    bias: Any


@dataclass(frozen=True, eq=False)
class Folding:
    """What `fold_batchnorms` did: the members of shared kernels it folded, those kernels' values
    (name → float64 array), and how many BatchNorms it left."""

    members: list[FoldedMember]
    kernels: dict[str, Any]
    left: int


def fold_batchnorms(path: Path) -> Folding:
    """Fold each BatchNorm of the ONNX file at `path` that alone reads a conv into that conv
    (weight and bias), where the conv's weight is a stored kernel, or a stored kernel times a
    stored per-channel factor (a `scale` relaxation: the factor folds in with the BatchNorm). A
    shared kernel gets one folded copy per member, recorded for `reshare_int8`."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers = Counter(name for node in graph.node for name in node.input)

    def stored(name: str) -> str:
        return stored_name(name, initializers, producer)

    def value(name: str) -> Any:
        return numpy_helper.to_array(initializers[stored(name)]).astype(np.float64)

    def factored(name: str) -> tuple[str, Any] | None:
        """The stored kernel behind a conv's weight `name` and its per-channel factor (None: none)."""
        if stored(name) in initializers:
            return stored(name), None
        node = producer.get(name)
        if node is None or node.op_type != "Mul" or len(node.input) != 2:
            return None
        kernel, factor = (stored(n) for n in node.input)
        if factor in initializers and kernel not in initializers:
            kernel, factor = factor, kernel
        shape = producer.get(factor)
        if (kernel not in initializers or shape is None or shape.op_type not in ("Reshape", "Unsqueeze")
                or stored(shape.input[0]) not in initializers):
            return None
        out = initializers[kernel].dims[0]
        vector = value(shape.input[0])
        return (kernel, vector) if vector.shape == (out,) else None

    uses = Counter(stored(name) for node in graph.node if node.op_type != "Identity" for name in node.input)
    candidates = []
    for node in graph.node:
        conv = producer.get(node.input[0]) if node.op_type == "BatchNormalization" else None
        weight = factored(conv.input[1]) if conv is not None and conv.op_type == "Conv" and len(conv.input) > 1 \
            else None
        if (weight is None or readers[conv.output[0]] != 1
                or any(stored(n) not in initializers for n in list(node.input[1:5]) + list(conv.input[2:3]))):
            continue
        scale, beta, mean = batchnorm_terms(node, value)
        candidates.append((node, conv, weight[0], scale * (1.0 if weight[1] is None else weight[1]), scale, beta, mean))
    # a shared kernel is folded for every member or none: a member reading it unfolded would quantise it twice
    foldable = Counter(c[2] for c in candidates)
    candidates = [c for c in candidates if uses[c[2]] in (1, foldable[c[2]])]
    members, kernels, dropped = [], {}, set()
    for node, conv, kernel, factor, scale, beta, mean in candidates:
        weight = value(kernel)
        bias = value(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(len(scale))
        prefix = conv.name or conv.output[0]
        folded = numpy_helper.from_array((weight * factor.reshape(-1, *[1] * (weight.ndim - 1))).astype(np.float32),
                                         f"{prefix}.folded_weight")
        shifted = (bias - mean) * scale + beta
        shift = numpy_helper.from_array(shifted.astype(np.float32), f"{prefix}.folded_bias")
        graph.initializer.extend([folded, shift])
        if uses[kernel] > 1:
            members.append(FoldedMember(conv.name, kernel, factor, shifted))
            kernels[kernel] = weight
        del conv.input[1:]
        conv.input.extend([folded.name, shift.name])
        conv.output[0] = node.output[0]
        dropped.add(id(node))
    nodes = [n for n in graph.node if id(n) not in dropped]
    while True:  # drop what nothing reads any more: Identities, a relaxation's Mul and Reshape
        read = {name for n in nodes for name in n.input} | {o.name for o in graph.output}
        live = [n for n in nodes if any(o in read for o in n.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    del graph.node[:]
    graph.node.extend(nodes)
    keep_read_initializers(graph)
    onnx.save(proto, str(path))
    return Folding(members, kernels, sum(n.op_type == "BatchNormalization" for n in nodes))


INT32_ROOM = 2**30  # the largest |bias| in int32 steps a requantised bias may take (int32 with a margin)


def reshare_int8(path: Path, folding: Folding) -> None:
    """In the quantised (QDQ) ONNX file at `path`, make the members of each shared kernel read one
    int8 tensor with their own scales (see the module); the caller counts what the file holds.
    ExportError where a member conv lacks its DequantizeLinear input, weight or bias."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    convs = {node.name: node for node in graph.node if node.op_type == "Conv"}

    def dequantize(name: str, what: str, conv: str) -> Any:
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or any(i not in initializers for i in node.input[1:2]):
            raise ExportError(f"the int8 graph reads the {what} of conv {conv} without a DequantizeLinear: not written")
        return node

    def put(name: str, value: Any, dtype: Any) -> None:
        initializers[name].CopyFrom(numpy_helper.from_array(value.astype(dtype), name))

    shared: dict[str, tuple[str, Any]] = {}  # kernel → (its int8 initializer, its per-channel scale w)
    for kernel, weight in folding.kernels.items():
        rows = weight.reshape(len(weight), -1)
        step = np.abs(rows).max(1) / 127
        step[step == 0] = 1.0
        name = f"{kernel}_quantized"
        q = np.clip(np.rint(weight / step.reshape(-1, *[1] * (weight.ndim - 1))), -127, 127).astype(np.int8)
        graph.initializer.append(numpy_helper.from_array(q, name))
        initializers[name] = graph.initializer[-1]
        shared[kernel] = (name, step)
    for member in folding.members:
        conv = convs.get(member.conv)
        if conv is None or len(conv.input) < 3:
            raise ExportError(f"the int8 graph lost conv {member.conv} or its bias: not written")
        source = dequantize(conv.input[0], "input", member.conv)
        weight = dequantize(conv.input[1], "weight", member.conv)
        bias = dequantize(conv.input[2], "bias", member.conv)
        x_step = float(numpy_helper.to_array(initializers[source.input[1]]))
        name, step = shared[member.kernel]
        sign = np.where(member.factor < 0, -1.0, 1.0)
        scale = np.maximum.reduce([np.abs(member.factor) * step, np.abs(member.bias) / (x_step * INT32_ROOM),
                                   step * 1e-12]) * sign
        put(weight.input[1], scale, np.float32)
        bias_step = (x_step * scale).astype(np.float32)
        put(bias.input[0], np.rint(member.bias / bias_step), np.int32)
        put(bias.input[1], bias_step, np.float32)
        weight.input[0] = name
    keep_read_initializers(graph)  # the members' own int8 copies
    onnx.save(proto, str(path))
