"""`TrainConfig`: everything that decides what a fine-tune run computes, checked on creation
(a NaN learning rate or a negative batch is refused here, not found in a traceback later)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from kshare._checks import finite_number, whole_number
from kshare.data.datasets import MAX_IMAGE_SIZE
from kshare.errors import TrainingError, param
from kshare.training.precision import PRECISIONS

OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """What a fine-tune run computes (stored in its checkpoints).

    `precision` (`auto`, `bf16`, `fp16`, `fp32`) and `channels_last` (None: auto) choose how
    steps run (`kshare.training.precision`); `amp=False` keeps `auto` to fp32. `compile` runs
    the model through `torch.compile`. `feature_weight` adds the teacher's block outputs as
    targets (`kshare.fit.features`), next to or instead of logit distillation.
    """

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 128
    optimizer: str = "adamw"
    weight_decay: float = 0.05
    momentum: float = 0.9
    warmup_epochs: float = 0.0
    clip_grad: float = 0.0
    label_smoothing: float = 0.0
    distill: bool = False
    temperature: float = 4.0
    alpha: float = 0.5
    feature_weight: float = 0.0
    seed: int = 0
    amp: bool = True
    image_size: int | None = None
    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise TrainingError(f"unknown optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISIONS:
            raise TrainingError(f"unknown precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        whole_number("epochs", self.epochs, 1, 1_000_000)
        whole_number("batch_size", self.batch_size, 1, 1 << 20)
        whole_number("seed", self.seed, 0, 2**63 - 1)
        if self.image_size is not None:
            whole_number("image_size", self.image_size, 1, MAX_IMAGE_SIZE)
        finite_number("lr", self.lr, 0.0, 1e3, low_open=True)
        finite_number("weight_decay", self.weight_decay, 0.0, 1e3)
        finite_number("momentum", self.momentum, 0.0, 1.0, high_open=True)
        finite_number("warmup_epochs", self.warmup_epochs, 0.0, 1e6)
        finite_number("clip_grad", self.clip_grad, 0.0, math.inf)
        finite_number("label_smoothing", self.label_smoothing, 0.0, 1.0)
        finite_number("temperature", self.temperature, 0.0, 1e3, low_open=True)
        finite_number("alpha", self.alpha, 0.0, 1.0)
        finite_number("feature_weight", self.feature_weight, 0.0, 1e3)
        for name in ("distill", "amp", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise TrainingError(f"{param(name)} must be true or false, got {getattr(self, name)!r}")
        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            raise TrainingError(f"{param('channels_last')} must be true, false or None (auto)")

    @property
    def uses_teacher(self) -> bool:
        """Whether a run with these settings needs a teacher (distillation or feature matching)."""
        return self.distill or self.feature_weight > 0

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


