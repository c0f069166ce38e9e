"""Recovery without labels: the tied model learns the untied original's outputs on the user's
own unlabelled images, measured on held-out images after every epoch, the best epoch kept.

The fit and the block reconstruction match layers and blocks one at a time; what they leave is
an error spread over the whole network. Distillation closes it end to end, and needs no label:
the untied original is the teacher, its output distribution the target (KL at a temperature,
as Hinton et al.; for an output that is not class scores, such as a feature extractor's maps,
their relative squared error). A few hundred photos are few, so each epoch sees them
differently: a random resized crop (scale `crop_scale`..1, aspect 3/4..4/3) and a horizontal
flip per image, the same view fed to teacher and student. BatchNorm statistics stay as they
are (the model runs in eval mode while it learns): re-estimating them on augmented crops of a
few photos is what broke pretrained networks. After each epoch the fidelity on the held-out
images (which training never reads) decides: the best epoch's weights are kept, and training
stops after `patience` epochs without a better one. Epoch 0 is the model before training, so
distillation never leaves a model worse on the held-out images than it found it.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kshare._checks import finite_number, whole_number
from kshare.data.feed import Adapter
from kshare.errors import TrainingError, param
from kshare.fit.fidelity import Fidelity, measure_fidelity
from kshare.fit.outputs import read, relative_error
from kshare.progress import ProgressFn, report

log = logging.getLogger("kshare.distill")


@dataclass(frozen=True)
class DistillConfig:
    """How the tied model learns the untied one's outputs (see the module)."""

    epochs: int = 10
    lr: float = 1e-4
    batch_size: int = 32
    temperature: float = 1.0
    patience: int = 3
    crop_scale: float = 0.5
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low, high in (("epochs", 1, 1_000_000), ("batch_size", 2, 1 << 20), ("patience", 1, 1_000_000),
                                ("seed", 0, 2**63 - 1)):
            whole_number(name, getattr(self, name), low, high)
        finite_number("lr", self.lr, 0.0, 1.0, low_open=True)
        finite_number("temperature", self.temperature, 0.0, 100.0, low_open=True)
        finite_number("crop_scale", self.crop_scale, 0.0, 1.0, low_open=True)
        finite_number("weight_decay", self.weight_decay, 0.0, 10.0)


@dataclass(frozen=True)
class DistillEpoch:
    """One epoch: the mean training loss, the held-out fidelity after it, whether it is the best
    so far (the one kept), and its seconds. Epoch 0 is the starting point."""

    epoch: int
    loss: float
    fidelity: Fidelity
    best: bool
    seconds: float


def distillation_loss(student: nn.Module, teacher: nn.Module, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² KL(teacher ‖ student) on class (or per-pixel) scores; the relative squared error of
    every output tensor otherwise. Detectors' post-processed boxes give no gradient: refused."""
    with torch.no_grad():
        target = read(teacher, x)
    mine = read(student, x)
    if target.kind == "boxes":
        raise TrainingError("distillation learns from class scores or feature maps; a detector's output is "
                            "post-processed boxes: retrofit it without --distill-epochs")
    if target.scores is not None and mine.scores is not None:
        t = temperature
        return F.kl_div(F.log_softmax(mine.scores / t, 1), F.log_softmax(target.scores / t, 1), log_target=True,
                        reduction="batchmean") * t * t
    pairs = [(s, r) for s, r in zip(mine.tensors, target.tensors, strict=False) if s.shape == r.shape]
    if not pairs:
        raise TrainingError("the model's output has no tensor to learn from")
    _, energy = relative_error([p[0].detach() for p in pairs], [p[1] for p in pairs])
    return sum(((s - r).square().sum() for s, r in pairs), torch.zeros(())) / max(energy, 1e-12)


def random_views(x: torch.Tensor, gen: torch.Generator, crop_scale: float) -> torch.Tensor:
    """Each image of the batch `x` (N, C, H, W) as a random resized crop, flipped half the time."""
    n, _, h, w = x.shape
    views = []
    for i in range(n):
        area = float(torch.empty(()).uniform_(crop_scale, 1.0, generator=gen)) * h * w
        aspect = math.exp(float(torch.empty(()).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)))
        ch, cw = min(h, max(1, round(math.sqrt(area / aspect)))), min(w, max(1, round(math.sqrt(area * aspect))))
        top = int(torch.randint(0, h - ch + 1, (), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (), generator=gen))
        view = F.interpolate(x[i : i + 1, :, top : top + ch, left : left + cw], size=(h, w), mode="bilinear",
                             align_corners=False)
        views.append(view.flip(-1) if bool(torch.rand((), generator=gen) < 0.5) else view)
    return torch.cat(views)


def distill(model: nn.Module, teacher: nn.Module, images: torch.Tensor, adapter: Adapter,
            held_out: Sequence[torch.Tensor], config: DistillConfig = DistillConfig(), *,
            device: torch.device | None = None, progress: ProgressFn | None = None) -> tuple[DistillEpoch, ...]:
    """Train `model` in place to output what `teacher` does on `images` (the user's images as
    stored, adapted by `adapter`), judged on the `held_out` batches (model input) after every
    epoch; the best epoch's weights are left in `model`. Returns every epoch, 0 first."""
    if not held_out:
        raise TrainingError("distillation keeps its best epoch by the fidelity on held-out images, and none were "
                            f"left: give {param('held_out')} images")
    if len(images) < 2:
        raise TrainingError(f"distillation needs at least 2 training images, got {len(images)}")
    device = device or next(model.parameters()).device
    modes = [(m, m.training) for net in (model, teacher) for m in net.modules()]
    frozen = [(p, p.requires_grad) for p in teacher.parameters()]
    teacher.eval().requires_grad_(False)
    model.eval()  # BatchNorm statistics and dropout as they are; gradients flow all the same
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError("the model has no trainable parameter to distil into")
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    start = measure_fidelity(model, teacher, held_out)
    history = [DistillEpoch(0, float("nan"), start, True, 0.0)]
    best, best_state, waited = start.kl, copy.deepcopy(model.state_dict()), 0
    log.info(f"distillation, epoch 0 (before): {start.line()}")
    try:
        for epoch in range(1, config.epochs + 1):
            began, total = time.perf_counter(), 0.0
            order = torch.randperm(len(images), generator=gen)
            starts = [s for s in range(0, len(images), config.batch_size) if len(images) - s > 1]
            for step, s in enumerate(starts):
                x = adapter(images[order[s : s + config.batch_size]].to(device))
                x = random_views(x, gen, config.crop_scale)
                loss = distillation_loss(model, teacher, x, config.temperature)
                if not torch.isfinite(loss):
                    raise TrainingError(f"the distillation loss became {float(loss)} at epoch {epoch}: lower "
                                        f"{param('lr')}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                report(progress, f"distil epoch {epoch}/{config.epochs}", step + 1, len(starts),
                       f"loss {total / (step + 1):.4f}")
            fidelity = measure_fidelity(model, teacher, held_out)
            better = fidelity.kl < best
            if better:
                best, best_state, waited = fidelity.kl, copy.deepcopy(model.state_dict()), 0
            else:
                waited += 1
            history.append(DistillEpoch(epoch, total / max(len(starts), 1), fidelity, better,
                                        time.perf_counter() - began))
            log.info(f"distillation, epoch {epoch}: loss {history[-1].loss:.4f}; {fidelity.line()}"
                     + ("; best so far" if better else f"; no better for {waited} epoch(s)"))
            if waited >= config.patience:
                log.info(f"distillation stopped after epoch {epoch}: {config.patience} epoch(s) without a better "
                         "held-out fidelity")
                break
    finally:
        model.load_state_dict(best_state)
        for m, flag in modes:
            m.training = flag
        for p, flag in frozen:
            p.requires_grad_(flag)
    return tuple(history)
