"""BatchNorm recalibration: re-estimate running statistics after tying, from images alone.

"Recalibrate" means only this in kshare; the images a fit reads are its *fit images*.

Tying replaces each member's kernel by a shared one, so every BatchNorm after a tied conv
normalises with statistics of activations that no longer exist; that, more than the kernel
error itself, is why a freshly tied network often scores near chance. A few forward passes
over unlabelled training images, with only the BatchNorm layers in training mode and a
cumulative average (momentum None), give each layer the exact mean and variance of what it
now sees. No gradient, no weight changes; cheap next to any fine-tune.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kshare.data import Adapter, ImageData, adapter_for
from kshare.errors import TrainingError, param
from kshare.fit.fidelity import Fidelity, measure_fidelity
from kshare.fit.outputs import Reading, divergence, read

BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics (the ones recalibration can fix)."""
    return [m for m in model.modules() if isinstance(m, BATCH_NORMS) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: ImageData, *, images: int = 2048, batch_size: int = 128,
                   adapter: Adapter | None = None) -> int:
    """Reset and re-estimate every BatchNorm's running statistics on a seeded sample of `images`
    images of `data` (class-balanced when it has labels; all of it when smaller; labels unused).
    Returns how many layers were recalibrated (0: the model has none, and nothing changed). The
    model's train/eval mode and each layer's momentum are restored."""
    for name, value in (("images", images), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TrainingError(f"{param(name)} must be at least 1, got {value!r}")
    if not batch_norms(model):
        return 0
    device = next(model.parameters()).device
    adapter = adapter or adapter_for(model, data)
    data = data.subset(images)
    n = len(data.labels)
    starts = [s for s in range(0, n, batch_size) if n - s > 1 or n == 1]  # BatchNorm cannot train on a lone image
    batches = (adapter(data.images[s : s + batch_size].to(device)) for s in starts)
    return recalibrate_on(model, batches)


@torch.no_grad()
def recalibrate_on(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """`recalibrate_bn` on batches the caller made (already adapted, on the model's device)."""
    norms = batch_norms(model)
    if not norms:
        return 0
    saved = [(m, m.momentum, m.training) for m in norms]
    was_training = model.training
    model.eval()
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
            m.train()
        for x in batches:
            model(x)
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
        model.train(was_training)
    return len(norms)


@dataclass(frozen=True)
class BatchNormChoice:
    """Which BatchNorm layers were re-estimated, decided by measurement (`choose_batchnorm`): the
    layers re-estimated and kept, and the KL to the untied model on the images it was judged on
    with every layer kept, every layer re-estimated, and as chosen."""

    reestimated: tuple[str, ...]
    kept: tuple[str, ...]
    kl_kept: float
    kl_all: float
    kl_chosen: float
    images: int

    def line(self) -> str:
        return (f"BatchNorm re-estimated in {len(self.reestimated)} of {len(self.reestimated) + len(self.kept)} "
                f"layers, where that lowered the KL to the untied model on {self.images} fit images "
                f"(all kept {self.kl_kept:.4f}, all re-estimated {self.kl_all:.4f}, chosen {self.kl_chosen:.4f})")


@torch.no_grad()
def choose_batchnorm(model: nn.Module, original: nn.Module, batches: Sequence[torch.Tensor],
                     judge: Sequence[torch.Tensor]) -> BatchNormChoice:
    """Re-estimate `model`'s BatchNorm statistics on `batches` only where that brings it closer to
    `original` on the `judge` batches (KL of the output distributions).

    A pretrained network's statistics were measured on millions of images; re-estimated on a few
    hundred photos of another domain they move every layer's input, and the network with them.
    But after tying, a layer's statistics may be stale. So: every layer kept, every layer
    re-estimated, then block by block (the layers of one parent module, in network order) the
    other choice tried and kept where the KL falls. Ties keep the pretrained statistics."""
    norms = dict((n, m) for n, m in model.named_modules() if isinstance(m, BATCH_NORMS) and m.track_running_stats)
    if not norms:
        return BatchNormChoice((), (), 0.0, 0.0, 0.0, 0)
    reference = [_eval(original, x) for x in judge]
    count = sum(len(x) for x in judge)

    def kl() -> float:  # the KL of the output distributions, or a detector's feature error
        return sum(divergence(_eval(model, x), t) for x, t in zip(judge, reference, strict=True)) / count

    kept_state = {n: _stats(m) for n, m in norms.items()}
    kl_kept = kl()
    recalibrate_on(model, batches)
    fresh = {n: _stats(m) for n, m in norms.items()}
    kl_all = kl()
    chosen = set(norms) if kl_all < kl_kept else set()
    best = min(kl_all, kl_kept)
    blocks: dict[str, list[str]] = {}
    for name in norms:  # module order: network order for the models kshare meets
        blocks.setdefault(name.rpartition(".")[0], []).append(name)
    for names in blocks.values():
        trial = chosen ^ set(names)
        _set(norms, trial, fresh, kept_state)
        found = kl()
        if found < best:
            chosen, best = trial, found
    _set(norms, chosen, fresh, kept_state)
    order = list(norms)
    return BatchNormChoice(tuple(n for n in order if n in chosen), tuple(n for n in order if n not in chosen),
                           kl_kept, kl_all, best, count)


OWN_STATISTICS_AGREEMENT = 0.9  # top-1 agreement with itself above which a model's statistics describe the images


@dataclass(frozen=True)
class StatisticsCheck:
    """Whether a model's BatchNorm statistics describe the images it is fitted on: the untied
    model with them re-estimated on those images, against itself (`choose_statistics`)."""

    fidelity: Fidelity
    describes: bool

    def line(self) -> str:
        f = self.fidelity
        verdict = ("they describe these images: the fit re-estimates them as it goes and unshared layers are "
                   "refitted (batchnorm=all)" if self.describes else
                   "they were learned on other images: the fit works under them, unshared layers keep their "
                   "weights, and a block's statistics are re-estimated only where that helps (batchnorm=measure)")
        return (f"BatchNorm: re-estimated on the fit images, the untied model against itself: {f.line('fit images')}; "
                f"{verdict}")


def choose_statistics(model: nn.Module, batches: Sequence[torch.Tensor], judge: Sequence[torch.Tensor]
                      ) -> StatisticsCheck:
    """Re-estimate a copy of the untied `model`'s statistics on `batches` and measure it against
    `model` on `judge`. A network trained on these images barely moves (it keeps what the fit
    wants re-estimated); a pretrained one fed photos of another domain turns into another
    network (EfficientNet-Lite0 on 560 wallpaper crops: 7% top-1 agreement with itself)."""
    probe = copy.deepcopy(model)
    recalibrate_on(probe, batches)
    found = measure_fidelity(probe, model, judge)
    # without class decisions (a detector's boxes come and go in jumps; feature maps), the smooth measure
    # decides: the relative error of the feature maps must be small
    describes = found.top1 >= OWN_STATISTICS_AGREEMENT if found.kind in ("classes", "pixels") else \
        found.kl <= 1 - OWN_STATISTICS_AGREEMENT
    return StatisticsCheck(found, describes)


def _eval(model: nn.Module, x: torch.Tensor) -> Reading:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return read(model, x)
    finally:
        for m, flag in modes:
            m.training = flag


def _stats(norm: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, ...]:
    return tuple(t.clone() for t in (norm.running_mean, norm.running_var, norm.num_batches_tracked)
                 if t is not None)


def _set(norms: dict[str, nn.modules.batchnorm._BatchNorm], chosen: set[str],
         fresh: dict[str, tuple[torch.Tensor, ...]], kept: dict[str, tuple[torch.Tensor, ...]]) -> None:
    for name, norm in norms.items():
        values = fresh[name] if name in chosen else kept[name]
        targets = [t for t in (norm.running_mean, norm.running_var, norm.num_batches_tracked) if t is not None]
        for target, value in zip(targets, values, strict=True):
            target.copy_(value)
