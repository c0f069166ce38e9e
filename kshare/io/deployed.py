"""What an ONNX file costs once deployed: its bytes, its unique tensors, and ONNX Runtime's
session memory and latency, measured.

A file's size is not its session's memory: ONNX Runtime's optimisers may fold and reorder weights
once per node (see `kshare.io.onnx_export`), so kshare measures instead of assuming. Each file is
opened in a fresh Python process, so that the resident memory the session adds is the session's
and not what the caller's process already holds: a *default* session (all optimisations, the
setting users deploy with), one intra-op thread, run once, then timed over `runs` more runs of
one example. `deployed_cost` measures a tied export against the same model untied (every member
with its own kernel, exported the same way), which is the comparison that says whether the
saving survived: the tied session against the untied one scaled by the unique-byte ratio
(1.00: it survived in full).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from kshare.errors import ExportError, first_line
from kshare.io.onnx_export import AFFINE_SUFFIX, export_onnx
from kshare.io.payload import state_bytes
from kshare.surgery.fold import fold
from kshare.surgery.tie import plan_of

PROBE = r"""
import json, statistics, sys, time
import numpy as np, onnxruntime as ort
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
path, shape, runs, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.log_severity_level = 3
before = resident()
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).random(shape, dtype=np.float32)
feed = {session.get_inputs()[0].name: x}
session.run(None, feed)
memory = resident() - before
times = []
for _ in range(runs):
    start = time.perf_counter()
    session.run(None, feed)
    times.append(time.perf_counter() - start)
print(json.dumps({"memory": memory, "latency": statistics.median(times) if times else 0.0}))
"""


def onnxruntime_available() -> bool:
    """Whether sessions can be measured here (onnxruntime is an optional dependency)."""
    return importlib.util.find_spec("onnxruntime") is not None


@dataclass(frozen=True)
class SessionCost:
    """One ONNX file in a default ONNX Runtime session: `memory_bytes`, the resident memory that
    creating the session and running it once added; `latency_s`, the median time of one example."""

    path: str
    file_bytes: int
    memory_bytes: int
    latency_s: float

    def line(self) -> str:
        return (f"{Path(self.path).name}: file {_mib(self.file_bytes)}, session +{_mib(self.memory_bytes)}, "
                f"{self.latency_s * 1e3:.1f} ms per example")


def measure_session(path: str | Path, input_shape: tuple[int, ...], *, runs: int = 5, threads: int = 1,
                    timeout: float = 600.0) -> SessionCost:
    """`path` in a default ONNX Runtime session in a fresh process, fed one random example of
    `input_shape` (the full shape of the graph's first input, batch dimension included)."""
    if not onnxruntime_available():
        raise ExportError("measuring a session needs onnxruntime: pip install onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist: nothing to measure")
    try:
        done = subprocess.run([sys.executable, "-c", PROBE, str(path), json.dumps(list(input_shape)), str(runs),
                               str(threads)], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ExportError(f"an ONNX Runtime session of {path} did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise ExportError(f"ONNX Runtime could not run {path}: {first_line(lines[-1]) if lines else 'no message'}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return SessionCost(str(path), path.stat().st_size, int(found["memory"]), float(found["latency"]))


@dataclass(frozen=True)
class DeployedCost:
    """A tied export's session against the same model's untied export (`untied` None: the model
    was not tied), with both models' unique tensor bytes."""

    tied: SessionCost
    untied: SessionCost | None
    tied_bytes: int
    untied_bytes: int

    @property
    def memory_ratio(self) -> float | None:
        """Tied session memory / (untied session memory x tied/untied unique bytes): 1.00 when the
        saving survives the session in full, more when the runtime copies shared kernels."""
        if self.untied is None or not self.untied.memory_bytes or not self.untied_bytes:
            return None
        return self.tied.memory_bytes / (self.untied.memory_bytes * self.tied_bytes / self.untied_bytes)

    @property
    def latency_ratio(self) -> float | None:
        return self.tied.latency_s / self.untied.latency_s if self.untied and self.untied.latency_s else None

    def line(self) -> str:
        """One line for the export's output."""
        own = (f"ONNX Runtime default session: +{_mib(self.tied.memory_bytes)} resident, "
               f"{self.tied.latency_s * 1e3:.1f} ms per example")
        if self.untied is None or self.memory_ratio is None or self.latency_ratio is None:
            return own
        return (f"{own}; the same model untied: +{_mib(self.untied.memory_bytes)}, "
                f"{self.untied.latency_s * 1e3:.1f} ms (memory {self.memory_ratio:.2f}x the untied session scaled "
                f"by unique bytes, 1.00: the saving survives; latency {self.latency_ratio:.2f}x)")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "memory_ratio": self.memory_ratio, "latency_ratio": self.latency_ratio}


def deployed_cost(model: nn.Module, path: str | Path, input_shape: tuple[int, ...], *, runs: int = 5,
                  **export: Any) -> DeployedCost:
    """Measure the export of `model` at `path` and, when `model` is tied, the same model untied
    (a folded copy, every member's kernel its own initializer, exported with `export`'s options
    into a temporary file) side by side."""
    tied = measure_session(path, input_shape, runs=runs)
    if plan_of(model) is None:
        return DeployedCost(tied, None, state_bytes(model.state_dict()), state_bytes(model.state_dict()))
    plain = fold(copy.deepcopy(model))
    with tempfile.TemporaryDirectory() as tmp:
        untied_path = export_onnx(plain, Path(tmp) / "untied.onnx", deduplicate=False, **export)
        untied = measure_session(untied_path, input_shape, runs=runs)
    return DeployedCost(tied, untied, state_bytes(model.state_dict()), state_bytes(plain.state_dict()))


def summarize_onnx(path: str | Path) -> dict[str, Any]:
    """Figures about an ONNX file, read without running it (for `kshare info FILE.onnx`): its
    bytes, its initializers' bytes (each stored once), the kernels several nodes read (shared),
    and the graph's inputs a caller feeds."""
    try:
        import onnx
    except ImportError:
        raise ExportError("reading an ONNX file needs the onnx package: pip install 'kshare[export]'") from None
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"file not found: {path}")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # a truncated or foreign file: one line, not a protobuf traceback
        raise ExportError(f"{path} is not an ONNX file onnx can read: {first_line(exc)}") from None
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    readers = Counter(name for node in graph.node for name in node.input if name in initializers)
    stored = sum(_tensor_bytes(t) for t in initializers.values())
    shared = sorted(n for n, count in readers.items() if count > 1 and len(initializers[n].dims) >= 3)
    fed = [i for i in graph.input if i.name not in initializers]
    return {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "opset": max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "nodes": len(graph.node),
        "initializers": len(initializers),
        "initializer_bytes": stored,
        "shared_kernels": len(shared),
        "kept_shared": sum(1 for i in graph.input if i.name in initializers),
        "affine_batchnorms": sum(1 for n in graph.node if n.op_type == "Conv" and n.name.endswith(AFFINE_SUFFIX)),
        "inputs": [{"name": i.name, "shape": _shape(i)} for i in fed],
        "outputs": [o.name for o in graph.output],
    }


def example_shape(summary: dict[str, Any], size: tuple[int, ...] = (3, 224, 224)) -> tuple[int, ...]:
    """A shape to feed the first input of `summary` (`summarize_onnx`): its fixed dimensions, and
    for its dynamic ones a batch of one of `size` (C, H, W), or one image of it (a detector's input)."""
    shape = summary["inputs"][0]["shape"] if summary["inputs"] else [1, *size]
    want = [1, *size] if len(shape) == len(size) + 1 else list(size) if len(shape) == len(size) else [1] * len(shape)
    return tuple(d if isinstance(d, int) and d > 0 else want[i] for i, d in enumerate(shape))


def _shape(value: Any) -> list[int | str]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def _tensor_bytes(tensor: Any) -> int:
    import onnx

    numel = 1
    for d in tensor.dims:
        numel *= d
    return numel * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
