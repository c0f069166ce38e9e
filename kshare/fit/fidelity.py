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
    """What tying one group costs: the fidelity the tied model regains when only this group's
    members compute as in the original (`kl`: KL it adds; `top1`: top-1 agreement it takes),
    against the parameters its sharing saves."""

    group: str
    params_saved: int
    kl: float
    top1: float

    @property
    def kl_per_million(self) -> float:
        """KL added per million parameters saved: the rank a fidelity search reverts groups by."""
        return self.kl / max(self.params_saved / 1e6, 1e-9)


@contextmanager
def computing_as(model: nn.Module, original: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """While open, the modules `names` of `model` output what the same modules of `original` do
    on the inputs they get in `model` (forward hooks; nothing in either model changes): the
    tied model with some of its layers untied, without any surgery."""
    ours, theirs = dict(model.named_modules()), dict(original.named_modules())

    def replace(name: str):  # type: ignore[no-untyped-def]
        def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...], __: torch.Tensor) -> torch.Tensor:
            return theirs[name](*inputs)
        return hook

    handles = [ours[n].register_forward_hook(replace(n)) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def group_costs(model: nn.Module, original: nn.Module, groups: Sequence[Any], batches: Sequence[torch.Tensor],
                tied: Fidelity | None = None) -> tuple[GroupCost, ...]:
    """Each group's cost (`GroupCost`), measured on `batches` with that group alone computing as in
    `original` (one pass of both models per group); `tied`: the model's own fidelity, if known."""
    tied = tied or measure_fidelity(model, original, batches)
    costs = []
    for group in groups:
        with computing_as(model, original, group.members):
            without = measure_fidelity(model, original, batches)
        costs.append(GroupCost(group.name, group.params_saved, tied.kl - without.kl, without.top1 - tied.top1))
    return tuple(costs)
