"""Fidelity: how far a retrofitted model is from the untied original, on images the fit never
read. No labels needed: the original's own outputs are the reference.

- top-1 agreement: the share of images on which both models pick the same class;
- top-5 agreement: the share on which the original's class is among the retrofitted model's five
  highest (top-k with k = the classes, when fewer than five);
- KL: the mean KL(original ‖ retrofitted) of the output distributions, in nats;
- confident agreement: top-1 agreement on the images the original gives at least
  `CONFIDENT` probability (where its answer means something; `None` when it gives none);
- output error: ‖s − t‖² / ‖t‖² of the raw outputs, summed over the images (any tensor output).
With labels, `accuracy` adds the retrofitted model's own accuracy on the same images.

Per group (`group_costs`): the fidelity the model regains when that group alone computes as in
the original, which is what tying it costs, against the parameters it saves.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kshare.errors import TrainingError

CONFIDENT = 0.5  # the original's top probability above which an image counts as one it is sure about


def logits_of(output: Any) -> torch.Tensor:
    """The class logits of a model's output: the tensor itself, or the main head of a tuple
    (Inception's and GoogLeNet's auxiliary outputs in training mode) or of a `.logits` field."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TrainingError(f"the model returns {type(output).__name__}, not class logits kshare can train on")


@dataclass(frozen=True)
class Fidelity:
    """The retrofitted model against the original on `images` held-out images (see the module)."""

    images: int
    top1: float
    top5: float
    kl: float
    confident_top1: float | None
    confident: int  # images the original is confident about
    output_error: float
    accuracy: float | None = None  # the retrofitted model's, where the images have labels

    def line(self) -> str:
        """One line for a log or a terminal."""
        sure = (f", {self.confident_top1:.1%} where it is sure ({self.confident})"
                if self.confident_top1 is not None else "")
        return (f"top-1 agreement {self.top1:.1%}, top-5 {self.top5:.1%}, KL {self.kl:.4f}{sure} "
                f"on {self.images} held-out images")


@torch.no_grad()
def measure_fidelity(model: nn.Module, original: nn.Module, batches: Sequence[torch.Tensor],
                     labels: torch.Tensor | None = None) -> Fidelity:
    """`model` against `original` on `batches` (model input, on the models' device), both in eval
    mode (their modes are restored); `labels` (one per image) add accuracy."""
    if not batches or not sum(len(b) for b in batches):
        raise TrainingError("fidelity needs held-out images, and none were given")
    modes = [(m, m.training) for net in (model, original) for m in net.modules()]
    model.eval()
    original.eval()
    n = agree = agree5 = confident = confident_agree = correct = 0
    kl = error = energy = 0.0
    try:
        for x in batches:
            s, t = logits_of(model(x)).float(), logits_of(original(x)).float()
            error += float((s - t).square().sum(dtype=torch.float64))
            energy += float(t.square().sum(dtype=torch.float64))
            s, t = s.reshape(len(x), -1), t.reshape(len(x), -1)
            picked = t.argmax(1)
            mine = s.argmax(1)
            agree += int((mine == picked).sum())
            top = s.topk(min(5, s.shape[1]), dim=1).indices
            agree5 += int((top == picked[:, None]).any(1).sum())
            p = F.log_softmax(t, 1)
            kl += float((p.exp() * (p - F.log_softmax(s, 1))).sum(dtype=torch.float64))
            sure = p.exp().amax(1) >= CONFIDENT
            confident += int(sure.sum())
            confident_agree += int((sure & (mine == picked)).sum())
            if labels is not None:
                correct += int((mine.cpu() == labels[n : n + len(x)]).sum())
            n += len(x)
    finally:
        for m, flag in modes:
            m.training = flag
    return Fidelity(n, agree / n, agree5 / n, kl / n, confident_agree / confident if confident else None, confident,
                    error / max(energy, 1e-30), correct / n if labels is not None else None)


@dataclass(frozen=True)
class GroupCost:
    """What tying one group costs: how far the untied model moves from itself when only this
    group's members (and the BatchNorms they feed) compute as in the tied model (`kl`: the KL
    that adds; `top1`: the top-1 agreement it takes), against the parameters its sharing saves.
    Measured from the untied side, so what the rest of the tied model adapted to the group
    (refitted layers, re-estimated statistics) does not hide or exaggerate it."""

    group: str
    params_saved: int
    kl: float
    top1: float

    @property
    def kl_per_million(self) -> float:
        """KL added per million parameters saved: the rank a fidelity search reverts groups by."""
        return kl_per_million(self.kl, self.params_saved)


def kl_per_million(kl: float, params_saved: int) -> float:
    """`kl` per million parameters saved (a group that saves nothing ranks first, without a division by zero)."""
    return kl / max(params_saved / 1e6, 1e-9)


@contextmanager
def computing_as(model: nn.Module, source: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """While open, the modules `names` of `model` output what the same modules of `source` do on
    the inputs they get in `model`, and a BatchNorm fed directly by one of them normalises as the
    one of `source` does (forward hooks; nothing in either model changes). The untied model with
    one group computing as tied, or the tied one with some groups untied, without any surgery."""
    ours, theirs = dict(model.named_modules()), dict(source.named_modules())
    latest: dict[str, torch.Tensor] = {}  # each replaced module's last output, to know what a BatchNorm is fed

    def replace(name: str):  # type: ignore[no-untyped-def]
        def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...], __: torch.Tensor) -> torch.Tensor:
            latest[name] = theirs[name](*inputs)
            return latest[name]
        return hook

    def as_source(name: str):  # type: ignore[no-untyped-def]
        def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            fed = inputs[0] if inputs else None
            return theirs[name](fed) if any(fed is t for t in latest.values()) else out
        return hook

    handles = [ours[n].register_forward_hook(replace(n)) for n in names]
    handles += [module.register_forward_hook(as_source(n)) for n, module in ours.items()
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and n in theirs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        latest.clear()


def group_costs(model: nn.Module, original: nn.Module, groups: Sequence[Any], batches: Sequence[torch.Tensor]
                ) -> tuple[GroupCost, ...]:
    """Each group's cost (`GroupCost`), measured on `batches` with a copy of `original` in which
    that group alone computes as in the tied `model` (one pass of both per group)."""
    subject = copy.deepcopy(original)
    costs = []
    for group in groups:
        with computing_as(subject, model, group.members):
            alone = measure_fidelity(subject, original, batches)
        costs.append(GroupCost(group.name, group.params_saved, alone.kl, 1.0 - alone.top1))
    return tuple(costs)
