"""Feature matching for distillation: the tied student's block outputs pulled towards the
untied teacher's.

Logit distillation gives one signal per image at the very end of the network; a retrofitted
network went wrong layer by layer, where its shared kernels replaced the originals. Matching
the output of every block that holds a tied conv gives each of those places its own target,
so a short fine-tune spends its steps where tying did the damage (the FitNets idea, with the
untied network itself as the teacher and no adapter: both have the same shapes).

The points are chosen from the plan, so this works on any tied model: the module that holds
each tied conv (a ResNet block, a DenseNet layer, a ConvMixer residual), or the conv itself
when the model is a flat stack whose parent is the whole network.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from kshare.errors import TrainingError, param
from kshare.surgery.tie import plan_of


def feature_points(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs are matched: each tied conv's parent, in network order."""
    plan = plan_of(model)
    if plan is None or not plan.groups:
        raise TrainingError(f"{param('feature_weight')} matches the blocks that hold tied convs, and this model "
                            "is not tied: tie it first (kshare apply) or leave feature matching off")
    members = {m for g in plan.groups for m in g.members}
    wanted = {m.rsplit(".", 1)[0] if "." in m else m for m in members}
    return [name for name, _ in model.named_modules() if name in wanted]


class FeatureTaps:
    """Forward hooks that keep the named modules' outputs while `on` is set (never during evaluation)."""

    def __init__(self, model: nn.Module, points: list[str], role: str) -> None:
        modules = dict(model.named_modules())
        missing = [p for p in points if p not in modules]
        if missing:
            raise TrainingError(f"the {role} has no module {missing[0]!r} to match features at: feature matching "
                                "needs a teacher with the student's layout (the untied original)")
        self.on = False
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[p].register_forward_hook(self._keeper(p)) for p in points]

    def _keeper(self, name: str):  # type: ignore[no-untyped-def]
        def keep(_: nn.Module, __: object, out: object) -> None:
            if self.on and isinstance(out, torch.Tensor):
                self.outputs[name] = out
        return keep

    def take(self) -> dict[str, torch.Tensor]:
        outputs, self.outputs = self.outputs, {}
        return outputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.outputs = {}


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over points of ‖s − t‖² / ‖t‖²: each block's error relative to its own scale, so
    deep blocks with large activations do not drown out early ones."""
    terms = []
    for name, t in teacher.items():
        s = student.get(name)
        if s is None:
            continue  # a branch this step's forward skipped
        if s.shape != t.shape:
            raise TrainingError(f"feature matching: {name!r} gives {tuple(s.shape)} in the student and "
                                f"{tuple(t.shape)} in the teacher; the teacher must be the untied original")
        t = t.detach().float()
        terms.append((s.float() - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12))
    if not terms:
        raise TrainingError("feature matching found no block output shared by student and teacher in this step")
    return torch.stack(terms).mean()


@contextmanager
def matched_features(student: nn.Module, teacher: nn.Module, points: list[str]
                     ) -> Iterator[tuple[FeatureTaps, FeatureTaps]]:
    """Taps on `points` of the student and the teacher for the run, removed afterwards."""
    taps = FeatureTaps(student, points, "student"), FeatureTaps(teacher, points, "teacher")
    try:
        yield taps
    finally:
        for tap in taps:
            tap.remove()
