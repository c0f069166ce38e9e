"""How training steps run: numeric precision and memory format, chosen by measurement.

On a GPU neither bf16 nor channels-last is always faster: the depthwise 9x9 convolutions of
the paper's ConvMixer run 1.4-2.4x slower channels-last on an H100, where resnet50 gains. So
`auto` times a few training steps of the actual model at the actual batch size in each
candidate `Setup` and keeps the fastest, saying which and why. bf16 is a candidate only where
the GPU supports it (else fp16, which keeps loss scaling). On the CPU `auto` keeps fp32 and
the default layout without timing: mixed precision rarely pays there, and a choice made by a
noisy clock would make two runs of one command compute differently.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from kshare.errors import TrainingError, param

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Setup:
    """One way to run steps: `precision` (`fp32`, `bf16`, `fp16`) and the memory format."""

    precision: str = "fp32"
    channels_last: bool = False
    reason: str = ""

    @property
    def label(self) -> str:
        return f"{self.precision} {'channels-last' if self.channels_last else 'NCHW'}"

    def autocast(self, device: torch.device) -> AbstractContextManager[Any]:
        """The autocast context of this precision (none for fp32)."""
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """Loss scaling: on for fp16 (its gradients underflow without it), a no-op otherwise."""
        return torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "channels_last": self.channels_last}


def bf16_supported(device: torch.device) -> bool:
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())


def candidates(device: torch.device, precision: str = "auto", channels_last: bool | None = None,
               amp: bool = True) -> list[Setup]:
    """The setups `auto` chooses among (one when nothing is left to choose)."""
    if precision not in PRECISIONS:
        raise TrainingError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise TrainingError(f"fp16 training needs a CUDA device (loss scaling runs there): use "
                            f"{param('precision', 'bf16')} or {param('precision', 'fp32')} on {device.type}")
    if precision == "bf16" and not bf16_supported(device):
        raise TrainingError(f"this GPU does not support bf16: use {param('precision', 'fp16')} or "
                            f"{param('precision', 'fp32')}")
    if precision != "auto":
        precisions = [precision]
    elif device.type != "cuda" or not amp:
        precisions = ["fp32"]
    else:
        precisions = ["fp32", "bf16" if bf16_supported(device) else "fp16"]
    layouts = [channels_last] if channels_last is not None else [False] if device.type != "cuda" else [False, True]
    return [Setup(p, c) for p in precisions for c in layouts]


def choose_setup(options: list[Setup], time_step: Callable[[Setup], float]) -> Setup:
    """The fastest of `options` by `time_step` (seconds per training step), with the reason in one
    line; a single option is taken as it is, untimed."""
    if len(options) == 1:
        only = options[0]
        why = "as asked" if only.precision != "fp32" or only.channels_last else "the only candidate here"
        return Setup(only.precision, only.channels_last, f"{only.label} ({why})")
    times = sorted((time_step(option), option.label, option) for option in options)
    (best, _, chosen), (second, _, runner_up) = times[0], times[1]
    others = ", ".join(f"{label} {1000 * t:.1f}" for t, label, _ in times[1:])
    return Setup(chosen.precision, chosen.channels_last,
                 f"{chosen.label}: fastest of {len(options)} timed setups at {1000 * best:.1f} ms/step "
                 f"({others} ms/step; {second / max(best, 1e-12):.2f}x faster than {runner_up.label})")


def time_steps(step: Callable[[], None], device: torch.device, warmup: int = 2, repeats: int = 3) -> float:
    """Median seconds of `step` after `warmup` calls (the GPU synchronised around each)."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        seconds.append(time.perf_counter() - start)
    return sorted(seconds)[len(seconds) // 2]
