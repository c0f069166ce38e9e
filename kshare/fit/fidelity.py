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
Segmentation outputs are compared per pixel, detection outputs by matched boxes and the
backbone's feature maps, other outputs by relative error (`Fidelity`, `kshare.fit.outputs`).

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
from kshare.fit.outputs import BoxTally, Reading, read, relative_error

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
    """The retrofitted model against the original on `images` held-out images (see the module).

    `kind` says what was compared (`kshare.fit.outputs`): for `classes` the figures are per image,
    for `pixels` (segmentation) per pixel. For `boxes` (detection), `top1` is the box agreement
    (2 x boxes matched at IoU >= 0.5 with the same label / all boxes of both), `top5` the same
    whatever the label, `box_iou` and `score_agreement` (1 - mean score gap) describe the matched
    pairs; for `boxes` and `features` there are no class distributions, and `kl` is the relative
    error of the feature maps (`feature_error`, else of the outputs), the smooth measure a search
    can target; `features` outputs make no decisions (`top1`, `top5`: 0).
    `feature_error`: ‖s − t‖² / ‖t‖² of the backbone's maps, where the model has a backbone."""

    images: int
    top1: float
    top5: float
    kl: float
    confident_top1: float | None
    confident: int  # images (pixels) the original is confident about
    output_error: float
    accuracy: float | None = None  # the retrofitted model's, where the images have labels
    kind: str = "classes"
    feature_error: float | None = None
    box_iou: float | None = None
    score_agreement: float | None = None

    def line(self, images: str = "held-out images") -> str:
        """One line for a log or a terminal; `images` says which images it was measured on."""
        features = f", feature error {self.feature_error:.4f}" if self.feature_error is not None else ""
        held = f"on {self.images} {images}"
        if self.kind == "boxes":
            pairs = (f", matched IoU {self.box_iou:.3f}, score agreement {self.score_agreement:.3f}"
                     if self.box_iou is not None and self.score_agreement is not None else "")
            return f"box agreement {self.top1:.1%} ({self.top5:.1%} whatever the label){pairs}{features} {held}"
        if self.kind == "features":
            return f"output error {self.output_error:.4f}{features} {held}"
        sure = (f", {self.confident_top1:.1%} where it is sure ({self.confident})"
                if self.confident_top1 is not None else "")
        what = "pixel agreement" if self.kind == "pixels" else "top-1 agreement"
        return f"{what} {self.top1:.1%}, top-5 {self.top5:.1%}, KL {self.kl:.4f}{sure}{features} {held}"



class _Tally:
    """Running sums of `measure_fidelity` over batches."""

    def __init__(self) -> None:
        self.images = self.decisions = self.agree = self.agree5 = self.confident = self.confident_agree = 0
        self.correct = 0
        self.kl = self.error = self.energy = self.feature_error = self.feature_energy = 0.0
        self.kinds: set[str] = set()
        self.boxes = BoxTally()

    def add(self, s: Reading, t: Reading, labels: torch.Tensor | None) -> None:
        self.kinds.add(t.kind)
        error, energy = relative_error(s.tensors, t.tensors)
        self.error, self.energy = self.error + error, self.energy + energy
        error, energy = relative_error(s.features, t.features)
        self.feature_error, self.feature_energy = self.feature_error + error, self.feature_energy + energy
        if t.boxes is not None and s.boxes is not None:
            for mine, theirs in zip(s.boxes, t.boxes, strict=True):
                self.boxes.add(mine, theirs)
        elif t.scores is not None and s.scores is not None and s.scores.shape == t.scores.shape:
            mine, picked = s.scores.argmax(1), t.scores.argmax(1)
            self.agree += int((mine == picked).sum())
            top = s.scores.topk(min(5, s.scores.shape[1]), dim=1).indices
            self.agree5 += int((top == picked[:, None]).any(1).sum())
            p = F.log_softmax(t.scores, 1)
            self.kl += float((p.exp() * (p - F.log_softmax(s.scores, 1))).sum(dtype=torch.float64))
            sure = p.exp().amax(1) >= CONFIDENT
            self.confident += int(sure.sum())
            self.confident_agree += int((sure & (mine == picked)).sum())
            self.decisions += len(mine)
            if labels is not None and t.kind == "classes":
                self.correct += int((mine.cpu() == labels[self.images : self.images + t.images]).sum())
        self.images += t.images

    def result(self, labelled: bool) -> Fidelity:
        if len(self.kinds) != 1:
            raise TrainingError(f"the model's outputs changed kind between batches ({', '.join(sorted(self.kinds))})")
        kind = self.kinds.pop()
        features = self.feature_error / self.feature_energy if self.feature_energy else None
        output_error = self.error / max(self.energy, 1e-30)
        if kind in ("boxes", "features"):
            smooth = features if features is not None else output_error
            b = self.boxes
            agree = (b.agreement, b.location_agreement) if kind == "boxes" else (0.0, 0.0)  # no decisions
            return Fidelity(self.images, agree[0], agree[1], smooth, None, 0, output_error, None, kind, features,
                            b.iou / b.matched if b.matched else None,
                            1.0 - b.score_gap / b.matched if b.matched else None)
        n = max(self.decisions, 1)
        return Fidelity(self.images, self.agree / n, self.agree5 / n, self.kl / n,
                        self.confident_agree / self.confident if self.confident else None, self.confident,
                        output_error, self.correct / self.images if labelled and kind == "classes" else None,
                        kind, features)


@torch.no_grad()
def measure_fidelity(model: nn.Module, original: nn.Module, batches: Sequence[torch.Tensor],
                     labels: torch.Tensor | None = None) -> Fidelity:
    """`model` against `original` on `batches` (model input, on the models' device), both in eval
    mode (their modes are restored); `labels` (one per image) add accuracy to a classifier's."""
    if not batches or not sum(len(b) for b in batches):
        raise TrainingError("fidelity needs held-out images, and none were given")
    modes = [(m, m.training) for net in (model, original) for m in net.modules()]
    model.eval()
    original.eval()
    tally = _Tally()
    try:
        for x in batches:
            tally.add(read(model, x), read(original, x), labels)
    finally:
        for m, flag in modes:
            m.training = flag
    return tally.result(labels is not None)


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
    kind: str = "classes"  # as `Fidelity.kind`: on boxes and features, `kl` is the feature (else output) error

    @property
    def kl_per_million(self) -> float:
        """KL added per million parameters saved: the rank a fidelity search reverts groups by."""
        return kl_per_million(self.kl, self.params_saved)


def smooth_measure(kind: str) -> str:
    """What `Fidelity.kl` (and `GroupCost.kl`) holds for outputs of `kind`: a KL for class and
    pixel scores, a relative error (of the features, else the output) for the rest."""
    return "KL" if kind in ("classes", "pixels") else "error"


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
        taken = 1.0 - alone.top1 if alone.kind != "features" else 0.0  # features: no decisions to agree on
        costs.append(GroupCost(group.name, group.params_saved, alone.kl, taken, alone.kind))
    return tuple(costs)
