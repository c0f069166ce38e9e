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

from collections.abc import Iterable

import torch
from torch import nn

from kshare.data import Adapter, ImageData, adapter_for
from kshare.errors import TrainingError, param

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
