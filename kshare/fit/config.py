"""How shared kernels are fitted to data: one frozen config, checked when made."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kshare._checks import finite_number
from kshare.errors import TrainingError, param

FIT_MODES = ("sequential", "progressive", "oneshot")
WEIGHTINGS = ("relative", "none")


@dataclass(frozen=True)
class FitConfig:
    """How shared kernels are fitted to data: `mode`, how many calibration `images` (a seeded,
    class-balanced sample; labels unused), at most `positions` output positions per image and
    layer, the dampening `damp` (fraction of the mean diagonal), the members' `weighting`, and
    whether BatchNorm statistics are re-estimated on the calibration images at the end
    (`recalibrate`). `track_batchnorm`: the fit expects BatchNorm statistics to be re-estimated
    after it, so a conv followed by one has its outputs fitted up to each channel's mean, and the
    sequential mode re-estimates them in its partly tied copy between units; off, the fit
    reproduces the raw outputs under the statistics the model has (a pretrained network's).
    `reconstruct` > 0 then trains each unit of blocks for that many steps towards the untied
    outputs (`kshare.fit.blocks`), at `reconstruct_lr`, on `reconstruct_images` of the
    same seeded order (default: the fit's own; the closed form is done by about 512, while the
    reconstruction, which trains, keeps gaining from more). `cache`: the sequential fit keeps
    each stream's activations at a cut before the group it fits instead of running every pass
    from the input (`kshare.fit.segments`), within `cache_memory` bytes (`kshare.fit.cache`)."""

    mode: str = "sequential"
    images: int = 512
    batch_size: int = 256
    positions: int = 32
    damp: float = 0.01
    weighting: str = "relative"
    compensate: bool = True
    recalibrate: bool = True
    track_batchnorm: bool = True
    seed: int = 0
    reconstruct: int = 0
    reconstruct_lr: float = 1e-3
    reconstruct_images: int | None = None
    cache: bool = True
    cache_memory: int = 4 << 30

    def __post_init__(self) -> None:
        if self.mode not in FIT_MODES:
            raise TrainingError(f"unknown fit mode {self.mode!r}: expected one of {', '.join(FIT_MODES)}")
        if self.weighting not in WEIGHTINGS:
            raise TrainingError(f"unknown weighting {self.weighting!r}: expected one of {', '.join(WEIGHTINGS)}")
        counts: tuple[tuple[str, int], ...] = (("images", 1), ("batch_size", 1), ("positions", 1), ("reconstruct", 0))
        if isinstance(self.cache_memory, bool) or not isinstance(self.cache_memory, int) or self.cache_memory < 0:
            raise TrainingError(f"{param('cache_memory')} must be a whole number of bytes, at least 0, "
                                f"got {self.cache_memory!r}")
        if self.reconstruct_images is not None:  # None: the fit's own images
            counts += (("reconstruct_images", 1),)
        for name, low in counts:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise TrainingError(f"{param('fit_images' if name == 'images' else name)} must be a whole number "
                                    f"of at least {low}, got {value!r}")
        if not 0.0 <= self.damp <= 10.0:
            raise TrainingError(f"{param('damp')} must be in [0, 10], got {self.damp!r}")
        finite_number("reconstruct_lr", self.reconstruct_lr, 0.0, math.inf, low_open=True)
        if self.reconstruct_images is not None and not self.reconstruct:
            raise TrainingError(f"{param('reconstruct_images')} sets the images of the block reconstruction: give "
                                f"{param('reconstruct')} STEPS too")
