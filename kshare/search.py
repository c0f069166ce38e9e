"""A fidelity target instead of a policy: the plan that stores the fewest parameters while the
retrofitted model stays as close to the untied original as asked, on held-out images.

    trial 0: retrofit the policy's plan (the most sharing the search may keep); measure it and
             what each group costs (`group_costs`: the KL tying it alone adds to the untied
             model, per parameter it saves)
    rank:    groups by that cost, the worst bargain first
    then:    find the shortest prefix of the ranking to leave untied: an estimate first (the
             untied model with the latest failing trial's groups after the prefix hooked in,
             `computing_as`, no refit, shifted to that trial's measured figure), then real
             trials (refit, re-measure) that bisect between the longest prefix known to miss the
             target and the shortest known to meet it

It stops when those two are next to each other, at `max_trials`, or when the next trial would
pass `time_limit`. Every trial runs the recovery steps the caller allows (fit, BatchNorm,
block reconstruction) on the same images and is measured on the same held-out images (NNCF's
accuracy-controlled quantisation works the same way: rank, revert, re-validate). An
unreachable target ends with the closest plan found and says so (`SearchReport.reached`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kshare.data import ImageData, ImageSource, adapter_for, as_image_data, decoding_for
from kshare.errors import PlanError, SearchError, param
from kshare.fit.config import FitConfig
from kshare.fit.fidelity import Fidelity, GroupCost, computing_as, measure_fidelity
from kshare.fit.statistics import fit_batches
from kshare.planning.config import SharingConfig
from kshare.planning.plan import SharingPlan, without_groups
from kshare.progress import ProgressFn
from kshare.retrofit import HELD_OUT, RecalibrateConfig, RetrofitReport, images_needed, retrofit, split_images
from kshare.surgery.tie import plan_of
from kshare.training.runtime import resolve_device

log = logging.getLogger(__name__)

TARGET_METRICS = {"agree": "top-1 agreement", "kl": "KL"}
MIN_HELD_OUT = 16  # held-out images below which a fidelity figure says nothing


@dataclass(frozen=True)
class Target:
    """What the retrofitted model must reach on the held-out images: `agree`, a top-1 agreement
    with the original of at least `value`, or `kl`, a mean KL of at most `value` nats."""

    metric: str
    value: float

    def __post_init__(self) -> None:
        if self.metric not in TARGET_METRICS:
            raise SearchError(f"unknown target {self.metric!r}: give agree=FRACTION (top-1 agreement with the "
                              "untied model, at least) or kl=NATS (mean KL to it, at most)")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise SearchError(f"the {self.metric} target must be a number, got {self.value!r}")
        if self.metric == "agree" and not 0.0 < self.value <= 1.0:
            raise SearchError(f"agree={self.value:g} is not a share of images: give a top-1 agreement in (0, 1], "
                              "such as agree=0.9")
        if self.metric == "kl" and self.value < 0:
            raise SearchError(f"kl={self.value:g} cannot be reached: a KL is 0 or more")

    @classmethod
    def parse(cls, text: str) -> Target:
        """`agree=0.95` or `kl=0.3`."""
        name, sep, value = str(text).partition("=")
        if not sep:
            raise SearchError(f"target {text!r} is not METRIC=VALUE: give agree=0.95 or kl=0.3")
        try:
            number = float(value)
        except ValueError:
            raise SearchError(f"target {text!r}: {value!r} is not a number") from None
        return cls(name.strip().lower(), number)

    def met(self, fidelity: Fidelity) -> bool:
        return self.meets(self.of(fidelity))

    def meets(self, figure: float) -> bool:
        """Whether `figure` (a top-1 agreement or a KL, as the target is on) meets it."""
        return self.gap(figure) == 0.0

    def shortfall(self, fidelity: Fidelity) -> float:
        """How far `fidelity` is from the target (0 when met): what the closest plan is closest in."""
        return self.gap(self.of(fidelity))

    def gap(self, figure: float) -> float:
        return max(self.value - figure if self.metric == "agree" else figure - self.value, 0.0)

    def of(self, fidelity: Fidelity) -> float:
        """The figure the target is on."""
        return fidelity.top1 if self.metric == "agree" else fidelity.kl

    def describe(self) -> str:
        return f"top-1 agreement ≥ {self.value:g}" if self.metric == "agree" else f"KL ≤ {self.value:g}"

    def __str__(self) -> str:
        return f"{self.metric}={self.value:g}"


@dataclass(frozen=True)
class Trial:
    """One plan tried: `reverted` groups of the ranking left untied, `groups` tied, the
    parameters the model stores, and its held-out fidelity."""

    index: int
    reverted: int
    groups: int
    params: int
    fidelity: Fidelity
    met: bool
    seconds: float
    estimate: float | None = None  # the figure the estimate promised for this plan, where it chose it

    @property
    def top1(self) -> float:
        return self.fidelity.top1

    @property
    def kl(self) -> float:
        return self.fidelity.kl


@dataclass(frozen=True)
class SearchReport:
    """What a fidelity search did: every trial, the one chosen, whether it meets the target,
    why the search stopped, the chosen trial's retrofit report and tied model."""

    target: Target
    trials: tuple[Trial, ...]
    chosen: int
    reached: bool
    stopped: str
    ranking: tuple[str, ...]  # the groups, the worst bargain (KL per parameter saved) first
    costs: tuple[GroupCost, ...]  # what tying each group alone costs, measured in trial 0
    params_before: int
    seconds: float
    retrofit: RetrofitReport
    model: nn.Module

    @property
    def best(self) -> Trial:
        return self.trials[self.chosen]

    def message(self) -> str:
        """One line: what was found, or how close it came."""
        t = self.best
        found = (f"trial {t.index}: {t.groups} group(s) tied, {t.params:,} parameters "
                 f"({self.params_before / t.params:.2f}x fewer), top-1 agreement {t.top1:.3f}, KL {t.kl:.4f}")
        if self.reached:
            return f"{self.target.describe()} reached with {found}"
        return (f"no plan that ties a group reached {self.target.describe()} ({self.stopped}); the closest is "
                f"{found}. Try a wider search (--max-trials, --time-limit), more recovery (--reconstruct) or more "
                "images")

    def record(self) -> dict[str, Any]:
        """Plain values for a checkpoint."""
        return {"target": str(self.target), "reached": self.reached, "chosen": self.chosen, "stopped": self.stopped,
                "params_before": self.params_before, "seconds": self.seconds, "ranking": list(self.ranking),
                "costs": [dataclasses.asdict(c) for c in self.costs],
                "trials": [dataclasses.asdict(t) for t in self.trials]}


def search_plan(
    model: nn.Module,
    target: Target | str,
    data: ImageSource,
    policy: SharingPlan | SharingConfig | str = "stage",
    *,
    fit: FitConfig | None = FitConfig(),
    recalibrate: RecalibrateConfig | bool | None = None,
    max_trials: int = 8,
    time_limit: float | None = None,
    held_out: int = HELD_OUT,
    test: ImageData | None = None,
    transform: Callable[[Any], Any] | None = None,
    image_size: int | None = None,
    input_size: Any = None,
    device: str | torch.device | None = None,
    progress: ProgressFn | None = None,
    **options: object,
) -> SearchReport:
    """The plan, within `policy`'s, that stores the fewest parameters while the retrofitted
    model meets `target` on held-out images of `data` (see the module). `fit`, `recalibrate`:
    the recovery every trial runs (`kshare.retrofit`); `test`: a labelled split every trial's
    steps are also scored on. `max_trials`: retrofits at most;
    `time_limit`: seconds, no trial started that would likely end past it. `model` (untied)
    is left as it is: the chosen tied model is `SearchReport.model`."""
    start = time.perf_counter()
    goal = target if isinstance(target, Target) else Target.parse(target)
    if isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 1:
        raise SearchError(f"{param('max_trials')} must be a whole number of at least 1, got {max_trials!r}")
    if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(time_limit, (int, float))
                                   or not time_limit > 0):
        raise SearchError(f"{param('time_limit')} must be a number of seconds above 0, got {time_limit!r}")
    if plan_of(model) is not None:
        raise PlanError("a fidelity search starts from the untied model: call kshare.untie(model) first")
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    images = as_image_data(data, transform=transform, limit=images_needed(fit, recalibrate, held_out),
                           image_size=decoding_for(model, image_size))  # what each trial's retrofit reads
    split = split_images(images, fit, recalibrate, held_out)
    if split.held_count < MIN_HELD_OUT:
        raise SearchError(f"{images.name} holds {len(images.labels):,} images: too few to hold out the "
                          f"{MIN_HELD_OUT} a fidelity target is judged on (it needs at least {4 * MIN_HELD_OUT}, a "
                          "quarter held out); give more images")
    original = copy.deepcopy(model).to(dev).eval()
    subject = copy.deepcopy(original)  # the untied model the estimates hook groups of a tied one into
    assert split.held is not None
    probe = fit_batches(split.held, split.held_count, 256, adapter_for(original, images, image_size), dev)
    params_before = sum(p.numel() for p in original.parameters())
    trials: list[Trial] = []
    kept: dict[int, tuple[RetrofitReport, nn.Module]] = {}

    def run(plan: SharingPlan | SharingConfig | str, reverted: int, estimate: float | None) -> Trial:
        began = time.perf_counter()
        work = copy.deepcopy(original)
        report = retrofit(work, plan, images, fit=fit, recalibrate=recalibrate, held_out=held_out, test=test,
                          measure_untied=not trials, costs_of_groups=not trials, image_size=image_size,
                          input_size=input_size, device=dev, progress=progress, **(options if not trials else {}))
        fidelity = report.final.fidelity
        assert fidelity is not None
        tied = plan_of(work)
        assert tied is not None
        trial = Trial(len(trials), reverted, len(tied.groups), sum(p.numel() for p in work.parameters()),
                      fidelity, goal.met(fidelity), time.perf_counter() - began, estimate)
        trials.append(trial)
        kept[trial.index] = (report, work)
        log.info(f"trial {trial.index}: {trial.groups} group(s) tied ({reverted} left untied), {trial.params:,} "
                 f"parameters, top-1 agreement {trial.top1:.3f}, KL {trial.kl:.4f}: "
                 f"{'meets' if trial.met else 'misses'} {goal.describe()} ({trial.seconds:.0f} s)")
        return trial

    first = run(policy, 0, None)
    base = kept[0][0]
    ranking = tuple(c.group for c in sorted(base.costs, key=lambda c: -c.kl_per_million))
    lo, hi = (None, 0) if first.met else (0, len(ranking))  # prefixes known to miss / to meet (all: the untied model)
    failing = 0  # the trial with `lo` reverted, for the estimates
    estimated_from: set[int] = set()
    stopped = "the policy's own plan meets it" if first.met else ""
    while not stopped:
        assert lo is not None
        if hi - lo <= 1:
            stopped = ("leaving one group fewer untied misses it" if hi < len(ranking) else
                       "every plan that ties a group misses it")
            break
        if len(trials) >= max_trials:
            stopped = f"{max_trials} trial(s) run (max_trials)"
            break
        elapsed = time.perf_counter() - start
        per_trial = elapsed / len(trials)
        if time_limit is not None and elapsed + per_trial > time_limit:
            stopped = f"the time limit ({time_limit:.0f} s) would pass during the next trial"
            break
        estimate = None
        if failing not in estimated_from:  # a new failing trial: estimate where the target lies from it
            estimated_from.add(failing)
            k, estimate = _estimate(kept[failing][1], trials[failing].fidelity, original, subject, ranking, lo, hi,
                                    probe, goal)
        else:
            k = (lo + hi) // 2
        trial = run(without_groups(base.plan, ranking[:k], "left untied by the fidelity search"), k, estimate)
        if trial.met:
            hi = k
        else:
            lo, failing = k, trial.index
        for index in list(kept):  # only the choice so far (a later one is a new trial) and the latest miss stay
            if index not in (_choose(trials, goal), failing):
                del kept[index]
    chosen = _choose(trials, goal)
    report, tied = kept[chosen]
    result = SearchReport(goal, tuple(trials), chosen, trials[chosen].met, stopped, ranking, base.costs, params_before,
                          time.perf_counter() - start, report, tied)
    (log.info if result.reached else log.warning)(result.message())
    return result


def _choose(trials: Sequence[Trial], goal: Target) -> int:
    """The trial to keep: of those that meet the target, the one storing the fewest parameters;
    else the closest to it."""
    met = [t for t in trials if t.met]
    if met:
        return min(met, key=lambda t: (t.params, t.index)).index
    return min(trials, key=lambda t: (goal.shortfall(t.fidelity), t.index)).index


def _estimate(model: nn.Module, measured: Fidelity, original: nn.Module, subject: nn.Module,
              ranking: Sequence[str], lo: int, hi: int, probe: Sequence[torch.Tensor], goal: Target
              ) -> tuple[int, float]:
    """The shortest prefix of `ranking`, between `lo` (exclusive; the tied `model`, measured at
    `measured`, has those groups untied already) and `hi` (exclusive), that meets `goal` by an
    estimate without a refit: `subject` (a copy of `original`) with the groups after the prefix
    computing as in `model`, shifted by what that estimate misses of `measured` at `lo`. A
    bisection (the cost is assumed to fall as more groups are untied); `hi - 1` when none meets
    it. And the figure the estimate gives there."""
    tied = plan_of(model)
    assert tied is not None
    members = {g.name: g.members for g in tied.groups}

    def estimate(k: int) -> float:
        names = [m for g in ranking[k:] for m in members.get(g, ())]
        with computing_as(subject, model, names):
            return goal.of(measure_fidelity(subject, original, probe))

    shift = goal.of(measured) - estimate(lo)  # what this model's own refits and statistics add

    def value(k: int) -> float:  # shifted, within what the figure can be
        return min(max(estimate(k) + shift, 0.0), 1.0 if goal.metric == "agree" else math.inf)

    low, high = lo + 1, hi - 1
    found = value(high)
    while low < high:
        mid = (low + high) // 2
        at = value(mid)
        if goal.meets(at):
            high, found = mid, at
        else:
            low = mid + 1
    log.info(f"estimate: leaving {high} of {len(ranking)} groups untied gives {TARGET_METRICS[goal.metric]} "
             f"{found:.4f} without a refit")
    return high, found
