"""What a model's output is made of, so that two models' outputs can be compared whatever the task.

- `classes`: one score vector per image (a tensor (N, K), a tuple's first tensor, `.logits`);
- `pixels`: one score vector per pixel (torchvision segmentation's `{"out": (N, K, H, W)}`, or any
  (N, K, H, W) tensor with K > 1 and more than one position): agreement is per pixel;
- `boxes`: a list of `{"boxes", "labels", "scores"}` per image (torchvision detection);
- `features`: anything else made of tensors (timm `features_only` backbones, dicts of maps,
  optical flow): compared by relative error only.

`read` runs a model and keeps, besides the output, what its `backbone` (torchvision's detection
and segmentation models have one) outputs: a detector's boxes move in jumps, its feature maps
say smoothly how far the network has moved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kshare.analysis.calls import tensors_of

KINDS = ("classes", "pixels", "boxes", "features")
MATCH_IOU = 0.5  # a retrofitted box counts as the original's when it overlaps it this much


@dataclass
class Reading:
    """One batch's output, taken apart: `scores` (decisions x classes) for classes and pixels,
    `boxes` per image for detection, `tensors` (every floating tensor of the output) and
    `features` (the backbone's maps, where the model has a backbone)."""

    kind: str
    images: int
    scores: torch.Tensor | None = None
    boxes: list[dict[str, torch.Tensor]] | None = None
    tensors: list[torch.Tensor] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every floating tensor of a nested output, in order, as float32 (labels and indices left out)."""
    return [t.float() for t in tensors_of(value) if t.is_floating_point()]


def _per_position(t: torch.Tensor) -> torch.Tensor | None:
    """(N, K, *spatial) scores as (N x positions, K); None unless there are classes and positions."""
    if t.dim() < 3 or t.shape[1] < 2 or all(d == 1 for d in t.shape[2:]):
        return None
    return t.float().movedim(1, -1).reshape(-1, t.shape[1])


def take_apart(output: Any, images: int) -> Reading:
    """Sort `output` (of a batch of `images`) into one of `KINDS` (see the module docstring)."""
    tensors = tensors_in(output)
    if isinstance(output, list) and output and all(isinstance(o, dict) and "boxes" in o for o in output):
        return Reading("boxes", images, boxes=output, tensors=tensors)
    main = output
    if isinstance(output, dict) and isinstance(output.get("out"), torch.Tensor):
        main = output["out"]
    elif hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        main = output.logits
    elif isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) and output[0].dim() == 2:
        main = output[0]  # Inception's and GoogLeNet's auxiliary outputs
    if isinstance(main, torch.Tensor) and main.is_floating_point() and len(main) == images:
        pixels = _per_position(main)
        if pixels is not None:
            return Reading("pixels", images, scores=pixels, tensors=tensors)
        return Reading("classes", images, scores=main.float().reshape(images, -1), tensors=tensors)
    return Reading("features", images, tensors=tensors)


def read(model: nn.Module, x: Any) -> Reading:
    """Run `model` on the batch `x` and take the output apart, with its backbone's maps."""
    caught: list[torch.Tensor] = []
    backbone = getattr(model, "backbone", None)
    handle = (backbone.register_forward_hook(lambda _, __, out: caught.extend(tensors_in(out)))
              if isinstance(backbone, nn.Module) else None)
    try:
        output = model(x)
    finally:
        if handle is not None:
            handle.remove()
    reading = take_apart(output, len(x))
    reading.features = caught
    return reading


def relative_error(mine: list[torch.Tensor], theirs: list[torch.Tensor]) -> tuple[float, float]:
    """(‖s − t‖², ‖t‖²) summed over paired tensors of equal shape; the rest (a detector's box lists
    change length) is left out."""
    error = energy = 0.0
    for s, t in zip(mine, theirs, strict=False):
        if s.shape == t.shape:
            error += float((s - t).square().sum(dtype=torch.float64))
            energy += float(t.square().sum(dtype=torch.float64))
    return error, energy


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of (n, 4) and (m, 4) boxes in (x1, y1, x2, y2)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    low = torch.maximum(a[:, None, :2], b[None, :, :2])
    high = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (high - low).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-12)


@dataclass
class BoxTally:
    """Boxes of the original and the retrofitted model, and the pairs matched between them."""

    original: int = 0
    retrofitted: int = 0
    matched: int = 0  # same label, IoU >= MATCH_IOU
    located: int = 0  # IoU >= MATCH_IOU, whatever the label
    iou: float = 0.0  # summed over matched pairs
    score_gap: float = 0.0  # |score difference| summed over matched pairs

    def add(self, mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
        """Match one image's boxes greedily, the original's most confident first."""
        self.original += len(theirs["boxes"])
        self.retrofitted += len(mine["boxes"])
        self.matched += self._match(mine, theirs, by_label=True)
        self.located += self._match(mine, theirs, by_label=False, tally=False)

    def _match(self, mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], by_label: bool,
               tally: bool = True) -> int:
        if not len(theirs["boxes"]) or not len(mine["boxes"]):
            return 0
        iou = box_iou(theirs["boxes"].float(), mine["boxes"].float())
        if by_label:
            iou = iou * (theirs["labels"][:, None] == mine["labels"][None, :])
        taken = torch.zeros(iou.shape[1], dtype=torch.bool)
        found = 0
        for i in theirs["scores"].argsort(descending=True).tolist():
            row = iou[i].masked_fill(taken, -1.0)
            j = int(row.argmax())
            if row[j] >= MATCH_IOU:
                taken[j] = True
                found += 1
                if tally:
                    self.iou += float(row[j])
                    self.score_gap += abs(float(theirs["scores"][i]) - float(mine["scores"][j]))
        return found

    @property
    def agreement(self) -> float:
        """2 x matched / all boxes of both: 1 when the boxes are the same, also when both find none."""
        total = self.original + self.retrofitted
        return 2 * self.matched / total if total else 1.0

    @property
    def location_agreement(self) -> float:
        total = self.original + self.retrofitted
        return 2 * self.located / total if total else 1.0


def divergence(mine: Reading, theirs: Reading) -> float:
    """How far one batch's outputs are apart, summed over its images: the mean KL of the class (or
    pixel) distributions per image, or where there are none the relative error of the feature
    maps (else the outputs); what a choice between two models' states is made by."""
    if mine.scores is not None and theirs.scores is not None and mine.scores.shape == theirs.scores.shape:
        p = torch.log_softmax(theirs.scores, 1)
        total = float((p.exp() * (p - torch.log_softmax(mine.scores, 1))).sum(dtype=torch.float64))
        return total * theirs.images / len(theirs.scores)
    error, energy = relative_error(mine.features, theirs.features) if theirs.features else \
        relative_error(mine.tensors, theirs.tensors)
    return error / max(energy, 1e-30) * theirs.images
