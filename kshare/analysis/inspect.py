"""Find a model's convolutions in execution order, with the shapes they see.

Two paths give the same `ConvSite` list. The FX path traces the model symbolically (convs and
timm's do-not-trace modules are leaves) and propagates shapes through the graph with one
example input. When FX cannot trace (data-dependent control flow, iterating a proxy, ...),
the hook path runs one real forward pass with hooks on every conv. Neither path changes the
model: it runs in eval mode under `no_grad`, and train/eval flags are restored afterwards.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from kshare.analysis.calls import example_call, size_of_call
from kshare.analysis.signature import Signature, is_conv
from kshare.errors import InputSizeError, InspectError, param
from kshare.kernels import shared_kernel

METHODS = ("auto", "fx", "hooks")
MAX_INPUT_ELEMENTS = 3 * 2048 * 2048


@dataclass(frozen=True)
class ConvSite:
    """One convolution module as the forward pass uses it."""

    name: str
    order: int
    signature: Signature
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    calls: int
    stage: int
    weight_param: str
    bias_param: str | None

    @property
    def resolution(self) -> tuple[int, ...]:
        """Spatial size of the output: what stages are runs of."""
        return self.output_shape[2:]


@dataclass(frozen=True)
class ModelStats:
    """Storage of the model as it is now, each tensor counted once however often it is used."""

    params: int
    param_bytes: int
    buffer_bytes: int
    conv_params: int
    conv_param_bytes: int


@dataclass(frozen=True)
class Inspection:
    """What `inspect_model` found: the sites, how it found them, and the model's storage."""

    sites: tuple[ConvSite, ...]
    unused: tuple[str, ...]
    method: str
    fallback_reason: str | None
    input_size: tuple[int, ...]
    stats: ModelStats

    def stage_map(self) -> list[tuple[int, tuple[int, ...], int]]:
        """(stage, output resolution, number of sites) in execution order."""
        rows: dict[int, list[Any]] = {}
        for site in self.sites:
            rows.setdefault(site.stage, [site.resolution, 0])[1] += 1
        return [(stage, res, n) for stage, (res, n) in rows.items()]


def parse_input_size(text: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """Accept `C,H,W` (or `C,L` / `C,D,H,W` for 1-D and 3-D convs) as text or a sequence; at most
    `MAX_INPUT_ELEMENTS` numbers in all, so an example input always fits in memory."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.replace("x", ",").split(",")]
        dims = tuple(int(p) for p in parts) if all(p.isascii() and p.isdigit() for p in parts) else ()
    else:
        dims = tuple(d for d in text if isinstance(d, int) and not isinstance(d, bool))
        dims = dims if len(dims) == len(tuple(text)) else ()
    if not 2 <= len(dims) <= 4 or any(d <= 0 for d in dims):
        raise InputSizeError(
            f"bad input size {text!r}: expected positive integers C,H,W such as 3,224,224"
        )
    if math.prod(dims) > MAX_INPUT_ELEMENTS:
        raise InputSizeError(f"input size {','.join(map(str, dims))} is too large: at most "
                             f"{MAX_INPUT_ELEMENTS:,} numbers per example (e.g. 3,2048,2048)")
    return dims


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _canonical_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> the first name it is registered under (aliases share one name)."""
    names: dict[int, str] = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(tensor), name)
    return names


def model_stats(model: nn.Module) -> ModelStats:
    """Unique parameter and buffer storage, plus the part of it that lives in convolutions."""
    params = {id(p): p for p in model.parameters()}
    buffers = {id(b): b for b in model.buffers()}
    conv: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if is_conv(module):
            for p in module.parameters(recurse=False):
                conv[id(p)] = p
    return ModelStats(
        params=sum(p.numel() for p in params.values()),
        param_bytes=sum(p.numel() * p.element_size() for p in params.values()),
        buffer_bytes=sum(b.numel() * b.element_size() for b in buffers.values()),
        conv_params=sum(p.numel() for p in conv.values()),
        conv_param_bytes=sum(p.numel() * p.element_size() for p in conv.values()),
    )


class _Recorder:
    """Collects, per conv module, the first call's shapes and the number of calls."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.calls: dict[str, list[Any]] = {}

    def record(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        name = self.names[id(module)]
        if name in self.calls:
            self.calls[name][2] += 1
            return
        x = inputs[0] if inputs else None
        in_shape = tuple(x.shape) if isinstance(x, torch.Tensor) else ()
        out_shape = tuple(output.shape) if isinstance(output, torch.Tensor) else ()
        self.calls[name] = [in_shape, out_shape, 1]

    @contextmanager
    def hooked(self, modules: list[nn.Module]) -> Iterator[None]:
        handles = [m.register_forward_hook(self._hook) for m in modules]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        self.record(module, inputs, output)


@contextmanager
def analysis_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad for one forward; every module's train flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _timm_fx_lists() -> tuple[tuple[type, ...], tuple[Callable[..., Any], ...]]:
    """timm's own do-not-trace modules and functions. A model can hold timm modules only if
    timm is already imported, so a torchvision or user model does not pay for importing it."""
    if "timm" not in sys.modules:
        return (), ()
    from timm.layers import get_notrace_functions, get_notrace_modules

    modules = tuple(m for m in get_notrace_modules() if isinstance(m, type))
    functions = tuple(f for f in get_notrace_functions() if callable(f))
    return modules, functions


class _ConvLeafTracer(fx.Tracer):
    """An FX tracer that stops at convolutions and at timm's do-not-trace modules."""

    def __init__(self, leaves: tuple[type, ...], autowrap: tuple[Callable[..., Any], ...]) -> None:
        super().__init__(autowrap_functions=autowrap)
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_conv(m) or (self.leaves and isinstance(m, self.leaves)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


class _ShapeInterpreter(fx.Interpreter):
    """Runs the traced graph once, recording each conv call (also those inside leaf modules)."""

    def __init__(self, gm: fx.GraphModule, recorder: _Recorder, convs_in: dict[str, list[nn.Module]]):
        super().__init__(gm)
        self.recorder = recorder
        self.convs_in = convs_in

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        if is_conv(module):
            out = super().call_module(target, args, kwargs)
            self.recorder.record(module, args, out)
            return out
        inner = self.convs_in.get(target, [])
        with self.recorder.hooked(inner):
            return super().call_module(target, args, kwargs)


def _pooled_inside(res: tuple[int, ...], stage_res: tuple[int, ...] | None) -> bool:
    """A conv on a globally pooled tensor (squeeze-excitation) inside a larger stage: it
    belongs to that stage instead of splitting it in two."""
    return bool(res) and all(d == 1 for d in res) and stage_res is not None and any(d != 1 for d in stage_res)


def _run_fx(model: nn.Module, args: tuple[Any, ...], recorder: _Recorder, convs: list[nn.Module]) -> None:
    leaves, autowrap = _timm_fx_lists()
    tracer = _ConvLeafTracer(leaves, autowrap)
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph)
    conv_ids = {id(c) for c in convs}
    convs_in: dict[str, list[nn.Module]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if not is_conv(mod):
                inner = [m for m in mod.modules() if id(m) in conv_ids]
                if inner:
                    convs_in[node.target] = inner
    _ShapeInterpreter(gm, recorder, convs_in).run(*args)


def _forward(model: nn.Module, args: tuple[Any, ...], recorder: _Recorder, convs: list[nn.Module]) -> None:
    with recorder.hooked(convs):
        model(*args)


def inspect_model(
    model: nn.Module,
    input_size: tuple[int, ...] | str | None,
    method: str = "auto",
    example_inputs: Any = None,
) -> Inspection:
    """List the model's conv sites in execution order; see the module docstring for how.
    `example_inputs` (a tensor, a tuple of arguments, a list of images: `kshare.analysis.calls`)
    is how the model is called, for a model that takes more than one image batch; without it the
    model's family picks an example of `input_size`, which it then defaults to."""
    if method not in METHODS:
        raise InspectError(f"unknown inspection method {method!r}: expected one of {', '.join(METHODS)}")
    if example_inputs is not None:
        args = example_call(model, (), example_inputs)
        size = size_of_call(args)
    else:
        if input_size is None:
            raise InputSizeError(f"give an input size ({param('input_size', 'C,H,W')}) or {param('example_inputs')}")
        size = parse_input_size(input_size)
    modules = [(name, m) for name, m in model.named_modules() if is_conv(m)]
    if example_inputs is None and modules and len(size) != 1 + len(modules[0][1].kernel_size):
        ndim = len(modules[0][1].kernel_size)
        want = {1: "C,L", 2: "C,H,W", 3: "C,D,H,W"}.get(ndim, f"{ndim + 1} numbers")
        raise InputSizeError(f"bad input size {input_size!r}: the model's convolutions are {ndim}-D, expected {want}")
    names = {id(m): name for name, m in modules}
    convs = [m for _, m in modules]
    if example_inputs is None:
        args = example_call(model, size)

    used, fallback = "hooks", None
    with analysis_mode(model):
        recorder = _Recorder(names)
        if method in ("auto", "fx"):
            try:
                _run_fx(model, args, recorder, convs)
                used = "fx"
            except Exception as exc:
                if method == "fx":
                    raise InspectError(f"torch.fx could not trace the model: {_first_line(exc)}") from None
                fallback = f"torch.fx could not trace the model ({_first_line(exc)})"
                recorder = _Recorder(names)
        if used == "hooks":
            try:
                _forward(model, args, recorder, convs)
            except Exception as exc:
                if example_inputs is not None:
                    raise InspectError(f"the model failed on the given {param('example_inputs')} "
                                       f"({_first_line(exc)})") from None
                raise InspectError(
                    f"the model failed on an example input of size {','.join(map(str, size))} "
                    f"({_first_line(exc)}); pass a size it accepts as {param('input_size', 'C,H,W')}, "
                    f"or how it is called as {param('example_inputs')}"
                ) from None

    canon = _canonical_names(model)
    sites: list[ConvSite] = []
    stage, stage_res = -1, None
    for order, (name, (in_shape, out_shape, calls)) in enumerate(recorder.calls.items()):
        module = model.get_submodule(name)
        res = out_shape[2:]
        if res != stage_res and not _pooled_inside(res, stage_res):
            stage, stage_res = stage + 1, res
        sites.append(
            ConvSite(
                name=name,
                order=order,
                signature=Signature.from_conv(module),
                input_shape=in_shape,
                output_shape=out_shape,
                calls=calls,
                stage=stage,
                weight_param=canon[id(shared_kernel(module))],
                bias_param=canon[id(module.bias)] if module.bias is not None else None,
            )
        )
    unused = tuple(name for name, _ in modules if name not in recorder.calls)
    return Inspection(
        sites=tuple(sites),
        unused=unused,
        method=used,
        fallback_reason=fallback,
        input_size=size,
        stats=model_stats(model),
    )
