"""What makes two convolutions isomorphic: a `Signature` and the match modes that compare it.

Two layers may share one kernel only if their weight tensors have the same shape (and dtype).
`strict` also asks for the same conv class, stride, padding, dilation and groups, so that the
shared layers compute the same kind of map; `shape` is the paper's notion (kernel size and
channels only), which lets layers of different stride share.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from kshare._checks import Reader, is_int, items
from kshare.errors import KShareError, PolicyError

MATCH_MODES = ("strict", "shape")
MAX_DIM = 1 << 24  # channels or kernel sides beyond this are not a convolution anyone can run

ConvModule = nn.modules.conv._ConvNd


def is_conv(module: nn.Module) -> bool:
    """True for every convolution kshare can share: Conv1/2/3d, transposed, and subclasses."""
    return isinstance(module, ConvModule) and not isinstance(
        getattr(module, "weight", None), nn.parameter.UninitializedParameter
    )


@dataclass(frozen=True)
class Signature:
    """Everything about a convolution that decides whether its kernel can be shared."""

    conv_type: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    padding_mode: str
    output_padding: tuple[int, ...]
    dtype: str
    weight_shape: tuple[int, ...]

    @classmethod
    def from_conv(cls, conv: nn.Module) -> Signature:
        kind = type(conv)
        return cls(
            conv_type=kind.__name__ if kind.__module__.startswith("torch.nn") else
            f"{kind.__module__}.{kind.__qualname__}",
            in_channels=int(conv.in_channels),
            out_channels=int(conv.out_channels),
            kernel_size=tuple(conv.kernel_size),
            stride=tuple(conv.stride),
            padding=conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
            dilation=tuple(conv.dilation),
            groups=int(conv.groups),
            bias=conv.bias is not None,
            padding_mode=str(conv.padding_mode),
            output_padding=tuple(conv.output_padding),
            dtype=str(conv.weight.dtype).removeprefix("torch."),
            weight_shape=tuple(conv.weight.shape),
        )

    def key(self, match: str) -> tuple[Any, ...]:
        """The value two sites must have in common to be grouped under `match`."""
        if match == "strict":
            return (self,)
        if match == "shape":
            return (self.weight_shape, self.bias, self.dtype)
        raise PolicyError(f"unknown match mode {match!r}: expected one of {', '.join(MATCH_MODES)}")

    @property
    def weight_numel(self) -> int:
        n = 1
        for d in self.weight_shape:
            n *= d
        return n

    @property
    def bias_numel(self) -> int:
        return self.out_channels if self.bias else 0

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def describe(self) -> str:
        """A compact human label, e.g. `Conv2d 256→256 k9x9 s1 g256 +b`."""
        k = "x".join(map(str, self.kernel_size))
        s = str(self.stride[0]) if len(set(self.stride)) == 1 else "x".join(map(str, self.stride))
        parts = [self.conv_type.rsplit(".", 1)[-1], f"{self.in_channels}→{self.out_channels}", f"k{k}"]
        parts.append(f"s{s}")
        if self.dilation and any(d != 1 for d in self.dilation):
            parts.append("d" + "x".join(map(str, self.dilation)))
        if self.groups != 1:
            parts.append(f"g{self.groups}")
        if self.bias:
            parts.append("+b")
        if self.dtype != "float32":
            parts.append(self.dtype)
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "signature", error: type[KShareError] = PolicyError) -> Signature:
        """Read a signature from JSON, refusing any field of the wrong kind (a file may hold anything)."""
        r = Reader(data, where, error)
        dims = items("a positive whole number", lambda v: is_int(v) and 0 < v <= MAX_DIM, error)
        offsets = items("a whole number from 0", lambda v: is_int(v) and 0 <= v <= MAX_DIM, error)
        padding = data.get("padding") if isinstance(data, dict) else None
        dtype = r.str("dtype")
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise r.fail("dtype", "a torch dtype name such as float32")
        return cls(
            conv_type=r.str("conv_type"),
            in_channels=r.int("in_channels", low=1, high=MAX_DIM),
            out_channels=r.int("out_channels", low=1, high=MAX_DIM),
            kernel_size=tuple(r.list("kernel_size", dims, low=1, high=3)),
            stride=tuple(r.list("stride", dims, low=1, high=3)),
            padding=r.str("padding", choices=("same", "valid")) if isinstance(padding, str) else tuple(
                r.list("padding", offsets, low=1, high=3)),
            dilation=tuple(r.list("dilation", dims, low=1, high=3)),
            groups=r.int("groups", low=1, high=MAX_DIM),
            bias=r.bool("bias"),
            padding_mode=r.str("padding_mode"),
            output_padding=tuple(r.list("output_padding", offsets, low=0, high=3)),
            dtype=dtype,
            weight_shape=tuple(r.list("weight_shape", dims, low=3, high=5)),
        )

