"""A stand-in GPU for machines without one: tensors that say they live on `cuda:0` but compute on
the CPU, and that refuse to meet a CPU tensor in one operation, as a real GPU does.

The first kshare bug a real GPU found was of this kind: a tensor made on the CPU (`torch.ones`
with no device) used with tensors on the GPU. Under `fake_cuda()` such a bug fails in CI with the
GPU's own message, where there is no GPU. What it cannot show: speed, the GPU kernels' numerics,
CUDA-only failures (memory, launches), and autograd: the autograd engine asks the real CUDA
runtime for a stream and aborts the process where there is none, so a fake-CUDA tensor that would
record a gradient raises `FakeCudaLimit` instead. The data fit, evaluation and recalibration run
under `torch.no_grad()` and are covered; training steps are not.

Rules, as on CUDA: a 0-dimensional CPU tensor may join a GPU operation (it is a scalar); a CPU
index may index a GPU tensor; `.to()`, `.cpu()`, `.cuda()` and `copy_` move data; `.numpy()`
refuses; anything else mixing the two devices raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

GPU = torch.device("cuda", 0)
CPU = torch.device("cpu")
MIXED = "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!"


class FakeCudaLimit(RuntimeError):
    """What the fake GPU cannot do: autograd on its tensors."""


class FakeCudaTensor(torch.Tensor):
    """A CPU tensor (`inner`) that reports `cuda:0` as its device. Every call on it is run on the
    inner tensor by `_DeviceMode`, before C++ could touch the (absent) CUDA runtime."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> FakeCudaTensor:
        out = torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, inner.size(), strides=inner.stride(), storage_offset=inner.storage_offset(), dtype=inner.dtype,
            layout=inner.layout, device=GPU, requires_grad=False)
        out.inner = inner
        return out

    def __repr__(self) -> str:
        return f"FakeCudaTensor({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # reached only by what C++ calls on its own (no Python function in between)
        return _wrap(func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs or {})), True, {})

    # a traceable wrapper: `Module.to` swaps it into the Parameter object, so shared kernels stay shared
    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], meta: None, size: Any, stride: Any) -> FakeCudaTensor:
        return FakeCudaTensor(inner["inner"])


def _is_gpu(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.split(":")[0] == "cuda"


def _unwrap(a: Any) -> Any:
    if isinstance(a, FakeCudaTensor):
        return a.inner
    if _is_gpu(a):
        return CPU
    return a


def _wrap(out: Any, on_gpu: bool, wrappers: dict[int, FakeCudaTensor]) -> Any:
    """Results of a call: an input handed back (in place) is its wrapper again; others wrapped if
    the call ran on the GPU."""
    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or isinstance(t, FakeCudaTensor):
            return t
        if id(t) in wrappers:
            return wrappers[id(t)]
        return FakeCudaTensor(t) if on_gpu else t
    return tree_map(one, out)


def _leaves(args: Any, kwargs: dict[str, Any]) -> list[Any]:
    found: list[Any] = []
    tree_map(found.append, (args, kwargs))
    return found


T = torch._C.TensorBase
MOVES = {torch.Tensor.to, T.to, torch.Tensor.cuda, T.cuda, torch.Tensor.cpu, T.cpu, torch.Tensor.copy_, T.copy_,
         torch.Tensor.__setitem__, T.__setitem__, torch.Tensor.__getitem__, T.__getitem__, torch.Tensor.index_select,
         T.index_select}
PASS = {torch.device, torch._C._nn._parse_to, torch._has_compatible_shallow_copy_type, torch.Tensor.requires_grad_,
        T.requires_grad_}  # called as they are: they make no tensor, or only flag one
NO_GRAPH = {"detach", "item", "size", "dim", "numel", "is_floating_point", "is_complex", "element_size", "stride",
            "data_ptr", "untyped_storage", "storage_offset", "is_contiguous", "__len__", "__hash__", "__eq__",
            "tolist"}  # names of calls that record no autograd graph
NUMPY = {torch.Tensor.numpy, T.numpy, torch.Tensor.__array__}


class _DeviceMode(TorchFunctionMode):
    """Runs every call that names `cuda` or takes a fake-CUDA tensor on the CPU; counts them."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0  # calls that ran 'on the GPU': a test can check that the GPU path was taken

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in PASS or getattr(func, "__name__", "") in ("__get__", "__set__"):
            return func(*args, **kwargs)
        leaves = _leaves(args, kwargs)
        fake = [a for a in leaves if isinstance(a, FakeCudaTensor)]
        named = any(_is_gpu(a) for a in leaves)
        if not fake and not named:
            return func(*args, **kwargs)
        if func in (torch.Tensor.__deepcopy__,) and isinstance(args[0], FakeCudaTensor):
            copied = FakeCudaTensor(args[0].inner.clone())
            copied.requires_grad_(args[0].requires_grad)
            if getattr(args[0], "_is_param", False):
                copied._is_param = True  # type: ignore[attr-defined]
            args[1][id(args[0])] = copied
            return copied
        if func in NUMPY:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first.")
        if torch.is_grad_enabled() and any(t.requires_grad for t in fake) and getattr(
                func, "__name__", "") not in NO_GRAPH:
            raise FakeCudaLimit(f"{getattr(func, '__name__', func)} would record autograd on a fake-CUDA tensor")
        plain = [a for a in leaves if isinstance(a, torch.Tensor) and not isinstance(a, FakeCudaTensor)
                 and a.dim() > 0]
        if fake and plain and func not in MOVES:
            raise RuntimeError(f"{MIXED} (in {getattr(func, '__name__', func)})")
        self.calls += 1
        wrappers = {id(t.inner): t for t in fake}
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func in (torch.Tensor.cpu, T.cpu):
            on_gpu = False
        elif func in (torch.Tensor.cuda, T.cuda):
            on_gpu = True
        elif func in (torch.Tensor.to, T.to):
            moved = [a for a in leaves[1:] if isinstance(a, (torch.device, str)) or isinstance(a, torch.Tensor)]
            target = next((a for a in moved if not isinstance(a, torch.Tensor)), None)
            like = next((a for a in moved if isinstance(a, torch.Tensor)), None)
            if target is not None:
                on_gpu = _is_gpu(target)
            elif like is not None:
                on_gpu = isinstance(like, FakeCudaTensor)
            else:
                on_gpu = isinstance(args[0], FakeCudaTensor)
            if on_gpu and out is args[0]:
                return FakeCudaTensor(out.detach().clone() if out.requires_grad else out)
        elif "device" in kwargs:
            on_gpu = _is_gpu(kwargs["device"])
        else:
            on_gpu = bool(fake)
        if func in (torch.Tensor.to, T.to, torch.Tensor.cpu, T.cpu) and not on_gpu and isinstance(
                out, torch.Tensor) and id(out) in wrappers:
            return out.clone()  # to the host: a copy, as from a real GPU
        if func in (torch.Tensor.to, T.to, torch.Tensor.cuda, T.cuda) and on_gpu and isinstance(
                args[0], FakeCudaTensor) and out is args[0].inner:
            return args[0]
        return _wrap(out, on_gpu, wrappers)


@contextlib.contextmanager
def fake_cuda(monkeypatch: Any) -> Iterator[_DeviceMode]:
    """Inside: `torch.cuda` says one GPU exists, and tensors put on `cuda` are fake-CUDA tensors."""
    for name, value in {"is_available": lambda: True, "device_count": lambda: 1, "set_device": lambda d: None,
                        "current_device": lambda: 0, "is_bf16_supported": lambda *a, **k: True,
                        "synchronize": lambda *a, **k: None, "_lazy_init": lambda: None,
                        "get_device_name": lambda *a, **k: "fake CUDA (CPU)",
                        "get_device_capability": lambda *a, **k: (9, 0),
                        "mem_get_info": lambda *a, **k: (80 * 2**30, 80 * 2**30), "empty_cache": lambda: None,
                        "get_rng_state_all": lambda: [], "set_rng_state_all": lambda s: None,
                        "manual_seed_all": lambda s: None, "manual_seed": lambda s: None,
                        "max_memory_allocated": lambda *a, **k: 0, "reset_peak_memory_stats": lambda *a, **k: None,
                        "memory_allocated": lambda *a, **k: 0}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # Module.to keeps each Parameter object
    try:
        with _DeviceMode() as mode:
            yield mode
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
