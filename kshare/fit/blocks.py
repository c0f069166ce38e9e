"""Block reconstruction: gradient steps after the closed-form fit, unit by unit, on the
calibration images, so each unit of blocks reproduces the untied network's outputs.

The closed form fits one conv at a time to its members' outputs; it cannot trade one conv's
error against the BatchNorm and the unshared convs around it. BRECQ (Li et al.) showed for
quantisation that a few hundred Adam steps per block, against the full-precision block's
outputs and from the already-quantised network's inputs, recover most of what per-layer fits
leave. Here a *unit* is the smallest run of blocks that holds whole sharing groups (a ResNet
stage under `stage`; the whole network under `all`), since a shared kernel serves every one
of its members at once. Units go in network order, each from the inputs the reconstructed
units before it give, so errors are corrected rather than compounded.

No labels: the targets are the untied network's block outputs. BatchNorm keeps the statistics
the fit re-estimated (eval mode); its affine parameters train with the rest of the unit.

Matching blocks alone is a proxy, and it can mislead: where a tied network cannot come close
(relative block errors near 1, as in a 16-channel ConvMixer tied `all`), the least-squares
optimum shrinks outputs towards their mean and the network's own output gets *worse* while
every block's error falls (digits, 100 steps: 38% → 18% test accuracy). So each unit's loss
also holds the relative error of the network's own output (`output_weight`, the forward then
runs to the end), and a unit is kept only if that error falls on held-out images (ones the
fit never saw: on its own calibration images a closed-form fit has already driven the output
error near zero, and noise decides); otherwise its parameters are put back and the report
says so. On the 6-epoch ResNet-18
(`stage`, 1,024 images, 400 steps per stage, 1 seed) blocks alone and blocks plus output both
take the fit from 88.70% to 90.2% and 90.1%; the output term costs about 1.6x the time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kshare.data import Adapter, ImageData
from kshare.errors import TrainingError
from kshare.fit.features import feature_loss, feature_points
from kshare.fit.statistics import fit_batches
from kshare.progress import ProgressFn, report
from kshare.surgery.tie import plan_of

log = logging.getLogger(__name__)

OUTPUT = "<network output>"
HELD_OUT_IMAGES = 256  # where each unit is judged: images the fit and the steps never saw
_TARGET_BYTES = 1 << 30  # untied outputs kept across steps up to this size; above it, recomputed each step


@dataclass(frozen=True)
class UnitReconstruction:
    """One unit: its blocks, mean relative output error on the calibration images before and
    after its steps (each block's ‖s − t‖² / ‖t‖², averaged), the whole network's relative
    output error before and after (on the held-out images, where given), whether the steps
    were kept (the network's output error fell) or undone, the parameters it trained, how
    long it took, and on how many calibration images."""

    blocks: tuple[str, ...]
    start_error: float
    error: float
    network_start_error: float
    network_error: float
    kept: bool
    parameters: int
    steps: int
    seconds: float
    images: int = 0


def reconstruction_units(model: nn.Module) -> list[list[str]]:
    """The tied `model`'s matched blocks (`feature_points`) in network order, cut into the
    shortest runs that no sharing group crosses: every group's members lie in one unit."""
    plan = plan_of(model)
    points = feature_points(model)
    index = {p: i for i, p in enumerate(points)}
    reach = list(range(len(points)))  # reach[i]: the last block a group starting at block i also uses
    for group in plan.groups if plan is not None else ():
        at = sorted(index[m.rsplit(".", 1)[0] if "." in m else m] for m in group.members)
        reach[at[0]] = max(reach[at[0]], at[-1])
    units: list[list[str]] = []
    start = end = 0
    for i in range(len(points)):
        end = max(end, reach[i])
        if i == end:
            units.append(points[start:i + 1])
            start = i + 1
    return units


class _Stop(Exception):
    """Raised by a hook once every block of the unit has run: the rest of the forward is not needed."""


def _outputs(model: nn.Module, x: torch.Tensor, blocks: Sequence[str], *, whole: bool = False
             ) -> dict[str, torch.Tensor]:
    """The named blocks' outputs on `x`, the forward stopped once all of them have run; `whole`:
    run to the end, the network's own output under the key `OUTPUT`."""
    modules = dict(model.named_modules())
    found: dict[str, torch.Tensor] = {}
    wanted = set(blocks)

    def keeper(name: str):  # type: ignore[no-untyped-def]
        def keep(_: nn.Module, __: object, out: object) -> None:
            if isinstance(out, torch.Tensor):
                found[name] = out
            wanted.discard(name)
            if not wanted and not whole:
                raise _Stop
        return keep

    handles = [modules[b].register_forward_hook(keeper(b)) for b in blocks]
    try:
        out = model(x)
        if whole:
            found[OUTPUT] = _tensor(out)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found


def _unit_parameters(model: nn.Module, blocks: Sequence[str]) -> list[nn.Parameter]:
    modules = dict(model.named_modules())
    unique: dict[int, nn.Parameter] = {}
    for block in blocks:
        for p in modules[block].parameters():
            unique.setdefault(id(p), p)
    return list(unique.values())


def _tensor(out: object) -> torch.Tensor:
    """A network's output as one tensor: itself, or the first tensor of a tuple, list or dict."""
    if isinstance(out, torch.Tensor):
        return out
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for item in items:
        if isinstance(item, torch.Tensor):
            return item
    raise TrainingError(f"reconstruction compares the network's outputs, and this one returns {type(out).__name__}")


@torch.no_grad()
def _network_error(model: nn.Module, batches: Sequence[torch.Tensor], final: _Targets) -> float:
    errors = [float(feature_loss({OUTPUT: _tensor(model(x))}, final(i))) for i, x in enumerate(batches)]
    return sum(errors) / len(errors)


@torch.no_grad()
def _error(model: nn.Module, batches: Sequence[torch.Tensor], blocks: Sequence[str],
           targets: _Targets) -> float:
    errors = [float(feature_loss(_outputs(model, x, blocks), targets(i))) for i, x in enumerate(batches)]
    return sum(errors) / len(errors)


class _Targets:
    """The untied network's outputs at a unit's blocks (`whole`: its own output) for each batch:
    kept when they fit in `_TARGET_BYTES`, recomputed when they do not (large images, wide early
    blocks, dense outputs)."""

    def __init__(self, original: nn.Module, batches: Sequence[torch.Tensor], blocks: Sequence[str],
                 whole: bool = False) -> None:
        self.original, self.batches, self.blocks, self.whole = original, batches, blocks, whole
        with torch.no_grad():
            first = _outputs(original, batches[0], blocks, whole=whole)
        per_image = sum(t.numel() * t.element_size() for t in first.values()) / len(batches[0])
        self.kept: dict[int, dict[str, torch.Tensor]] | None = (
            {0: first} if per_image * sum(len(b) for b in batches) <= _TARGET_BYTES else None)

    @torch.no_grad()
    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        if self.kept is not None and index in self.kept:
            return self.kept[index]
        found = _outputs(self.original, self.batches[index], self.blocks, whole=self.whole)
        if self.kept is not None:
            self.kept[index] = found
        return found


def held_out_images(data: ImageData, taken: int, adapter: Adapter, device: torch.device, seed: int = 0,
                    batch_size: int = 256) -> list[torch.Tensor] | None:
    """`HELD_OUT_IMAGES` images of `data` that a calibration sample of `taken` (same seed) left
    out, as adapted batches: where each unit is judged. None when the sample took everything."""
    rest = data.beyond(taken, HELD_OUT_IMAGES, seed)
    if rest is None:
        return None
    return fit_batches(rest, len(rest.labels), batch_size, adapter, device)


def reconstruct(model: nn.Module, original: nn.Module, images: Sequence[torch.Tensor], *, steps: int,
                lr: float = 1e-3, batch_size: int = 64, output_weight: float = 1.0,
                held_out: Sequence[torch.Tensor] | None = None, seed: int = 0,
                progress: ProgressFn | None = None) -> tuple[UnitReconstruction, ...]:
    """Train each unit of the tied `model` for `steps` Adam steps (cosine-decayed from `lr`) on
    `batch_size` of the calibration `images` (adapted batches, on the model's device) per step,
    towards `original`'s (the untied network's) block outputs, plus `output_weight` × the
    relative error of the network's own output (0: blocks only, and the forward stops after
    the unit). Parameters outside the unit stay fixed; both networks run in eval mode; a unit
    whose steps leave the network's output further from the original's on the `held_out`
    images (`held_out_images`; without them, on the calibration images, where a fit that
    overfits them looks better than it is) is undone; `model`'s `requires_grad` flags and
    training mode are restored afterwards."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise TrainingError(f"reconstruction needs at least 1 step per unit, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise TrainingError(f"the reconstruction learning rate must be a positive number, got {lr!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TrainingError(f"the reconstruction batch size must be a whole number of at least 1, got {batch_size!r}")
    if not (isinstance(output_weight, (int, float)) and math.isfinite(output_weight) and output_weight >= 0):
        raise TrainingError(f"the reconstruction's output weight must be a number of at least 0, got {output_weight!r}")
    if not images or not sum(len(b) for b in images):
        raise TrainingError("reconstruction needs calibration images, and none were given")
    joined = torch.cat(list(images))
    batches, count = joined.split(batch_size), len(joined)
    judged = torch.cat(list(held_out)).split(batch_size) if held_out else batches
    was_training, flags = model.training, {id(p): p.requires_grad for p in model.parameters()}
    original_training = original.training
    model.eval()
    original.eval()
    order = torch.Generator().manual_seed(seed)
    units = reconstruction_units(model)
    done: list[UnitReconstruction] = []
    try:
        final = _Targets(original, batches, (), whole=True)
        judge = _Targets(original, judged, (), whole=True) if held_out else final
        network = _network_error(model, judged, judge)
        for index, blocks in enumerate(units):
            start = time.perf_counter()
            params = [p for p in _unit_parameters(model, blocks) if flags[id(p)]]
            targets = _Targets(original, batches, blocks)
            before = _error(model, batches, blocks, targets)
            if not params:
                done.append(UnitReconstruction(tuple(blocks), before, before, network, network, True, 0, 0,
                                               time.perf_counter() - start, count))
                continue
            saved = [p.detach().clone() for p in params]
            for p in model.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            optimiser = torch.optim.Adam(params, lr=lr)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
            task = f"reconstruction {index + 1}/{len(units)}"
            for step in range(steps):
                i = int(torch.randint(len(batches), (1,), generator=order))
                if output_weight:
                    found = _outputs(model, batches[i], blocks, whole=True)
                    last = feature_loss({OUTPUT: found.pop(OUTPUT)}, final(i))
                    loss = feature_loss(found, targets(i)) + output_weight * last
                else:
                    loss = feature_loss(_outputs(model, batches[i], blocks), targets(i))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                if progress is not None:  # reading the loss waits for the device: only for a caller who shows it
                    report(progress, task, step + 1, steps, f"error {loss.item():.4f}")
            after = _error(model, batches, blocks, targets)
            network_after = _network_error(model, judged, judge)
            kept = network_after <= network
            if not kept:
                with torch.no_grad():
                    for p, value in zip(params, saved, strict=True):
                        p.copy_(value)
                log.warning(f"{task} ({', '.join(blocks)}): block output error {before:.4f} → {after:.4f}, but the "
                            f"network's output error rose {network:.4f} → {network_after:.4f}: its steps are undone")
            done.append(UnitReconstruction(tuple(blocks), before, after, network, network_after, kept,
                                           sum(p.numel() for p in params), steps, time.perf_counter() - start, count))
            network = network_after if kept else network
            log.debug(f"{task}: {', '.join(blocks)} output error {before:.4f} → {after:.4f} ({done[-1].seconds:.1f} s)")
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
        model.train(was_training)
        original.train(original_training)
    return tuple(done)
