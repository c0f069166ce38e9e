"""`kshare sweep`: the whole trade-off curve of one trained model, not a single point.

A grid of positional policies, budgets and relaxations is applied to copies of one trained
(untied) model; each is evaluated right after tying and, optionally, after a short
fine-tune (cross-entropy, distillation from the untied original, or both). `match:POLICY`
points search the budget that, with a given relaxation, stores no more parameters and writes
no larger a checkpoint than `POLICY` does, so relaxed and plain sharing are compared at the
same size (a relaxation's tensors each cost a name in the file, not only their elements).
The rows go to a JSON file; `pareto` finds the points no other beats on both size and
accuracy (the CLI draws them, `kshare.cli.plots`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from kshare.analysis.inspect import Inspection
from kshare.api import analyze
from kshare.data import ImageData, adapter_for, input_channels
from kshare.errors import PlanError, StudyError, param
from kshare.io.checkpoint import save
from kshare.models.zoo import spec_of
from kshare.planning.budget import Metric, budget_plan
from kshare.planning.config import PositionalConfig, SharingConfig, parse_config
from kshare.planning.plan import SharingPlan
from kshare.planning.relaxation import Relaxation
from kshare.progress import ProgressFn
from kshare.retrofit import RecalibrateConfig, retrofit
from kshare.surgery.tie import apply_plan, plan_of
from kshare.training.config import TrainConfig
from kshare.training.evaluate import evaluate

log = logging.getLogger(__name__)

SWEEP_FORMAT = "kshare.sweep/1"


@dataclass(frozen=True)
class SweepConfig:
    """The grid and the fine-tune budget every point gets."""

    policies: tuple[str, ...] = ("all", "stage")
    budgets: tuple[float, ...] = ()
    relaxations: tuple[str, ...] = ("none",)
    match: tuple[str, ...] = ()  # compare relaxed budget plans at these policies' sizes
    init: str = "mean"
    epochs: int = 0
    losses: tuple[str, ...] = ("ce",)  # "ce" and/or "kd" (distillation from the untied model)
    lr: float = 1e-3
    batch_size: int = 128
    image_size: int | None = None
    seeds: tuple[int, ...] = (0,)  # one fine-tune per seed: differences are read against the spread
    size_tolerance: float = 0.0  # `match` admits plans up to this fraction above the policy's size
    calibrate: int = 0  # training images to re-estimate BatchNorm statistics on after tying (0: none)

    def __post_init__(self) -> None:
        if not self.seeds:
            raise StudyError("a sweep needs at least one seed")
        for fraction in self.budgets:
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction) \
                    or not 0.0 < fraction <= 1.0:
                raise StudyError(f"budget {fraction!r} is outside (0, 1]: a budget is the fraction of the conv "
                                 "parameters a plan may keep")
        for policy in (*self.policies, *self.match):
            if not isinstance(parse_config(policy), PositionalConfig):
                raise StudyError(f"{policy!r} is not a positional policy: give budgets as fractions "
                                 f"({param('budgets')})")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise StudyError(f"{param('epochs')} must be 0 or more, got {self.epochs!r}")
        if not all(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 for seed in self.seeds):
            raise StudyError(f"{param('seeds')} must be whole numbers from 0, got {list(self.seeds)}")
        for seed in self.seeds:  # the checks a run makes, before the first point runs
            TrainConfig(lr=self.lr, batch_size=self.batch_size, image_size=self.image_size, seed=seed)
        if self.calibrate < 0:
            raise StudyError(f"calibration images must be 0 or more, got {self.calibrate}")
        if not 0.0 <= self.size_tolerance < 1.0:
            raise StudyError(f"size tolerance must be in [0, 1), got {self.size_tolerance}")
        for loss in self.losses:
            if loss not in ("ce", "kd"):
                raise StudyError(f"unknown loss {loss!r}: expected ce or kd")
        for relax in self.relaxations:
            Relaxation.parse(relax)


@dataclass
class SweepRow:
    """One point of the curve."""

    label: str
    policy: str
    relax: str
    loss: str | None
    params: int
    stored_bytes: int
    acc_tied: float
    acc: float
    seconds: float
    groups: int = 0
    note: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    seed: int = 0
    acc_sd: float = 0.0  # over seeds, in rows that `aggregate` made
    runs: int = 1


def aggregate(rows: list[SweepRow]) -> list[SweepRow]:
    """One row per (point, loss): mean accuracy over its seeds, with the sample standard deviation."""
    by_point: dict[tuple[str, str | None], list[SweepRow]] = {}
    for row in rows:
        by_point.setdefault((row.label, row.loss), []).append(row)
    merged = []
    for runs in by_point.values():
        accs = [r.acc for r in runs]
        mean = sum(accs) / len(accs)
        sd = (sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5 if len(accs) > 1 else 0.0
        merged.append(dataclasses.replace(runs[0], acc=mean, acc_sd=sd, runs=len(runs), history=[],
                                          seconds=sum(r.seconds for r in runs) / len(runs)))
    return merged


def matched_budget(model: nn.Module, inspection: Inspection, target: int, relaxation: Relaxation,
                   policy: SharingConfig, max_bytes: int | None = None, metric: Metric | None = None
                   ) -> SharingPlan | None:
    """The budget plan that, with `relaxation` counted, stores the most parameters not above `target`
    (a whole-model count, such as another plan's `params_after`) and, given `max_bytes`, whose
    checkpoint is no larger; None when none fits. `metric`: group by output error (`build_plan`)."""
    stats = inspection.stats
    while True:
        fraction = (target - (stats.params - stats.conv_params)) / stats.conv_params
        try:
            plan = budget_plan(model, inspection, fraction, policy, relaxation=relaxation, metric=metric)
        except PlanError:  # out of reach: even the most sharing stores more
            return None
        over = 0 if max_bytes is None else stored_size(model, plan) - max_bytes
        if over <= 0:
            return plan
        itemsize = plan.groups[0].signature.itemsize if plan.groups else 4
        target = min(target, plan.totals.params_after) - math.ceil(over / itemsize)  # strictly less each time


def stored_size(model: nn.Module, plan: SharingPlan) -> int:
    """Bytes of the checkpoint `kshare.save` writes for a copy of `model` tied by `plan`."""
    with tempfile.TemporaryDirectory() as tmp:
        return save(apply_plan(copy.deepcopy(model), plan), Path(tmp) / "m.pt").stat().st_size


def _points(model: nn.Module, config: SweepConfig, size: tuple[int, ...]) -> list[tuple[str, SharingPlan | None,
                                                                                       str, str]]:
    """(label, plan or None when it cannot be built, relaxation, note) for every grid point."""
    base = analyze(model, "all", input_size=size)
    inspection, policy = base.inspection, PositionalConfig()
    points: list[tuple[str, SharingPlan | None, str, str]] = []
    plans: dict[str, SharingPlan] = {}
    for name in dict.fromkeys([*config.policies, *config.match]):
        plans[name] = analyze(model, name, input_size=size).plan
    for name in config.policies:
        for relax in config.relaxations:
            if Relaxation.parse(relax).auto:
                continue  # its ranks spend a budget; a positional plan has none to spend
            points.append((name if relax == "none" else f"{name}+{relax}", plans[name], relax, ""))
    for fraction in config.budgets:
        for relax in config.relaxations:  # the relaxation's parameters count against the budget too
            label = f"budget:{fraction:g}" + ("" if relax == "none" else f"+{relax}")
            try:
                points.append((label, budget_plan(model, inspection, fraction, policy,
                                                  relaxation=Relaxation.parse(relax)), relax, ""))
            except PlanError as exc:
                points.append((label, None, relax, str(exc)))
    for name in config.match:
        target = int(plans[name].totals.params_after * (1 + config.size_tolerance))
        max_bytes = int(stored_size(model, plans[name]) * (1 + config.size_tolerance))
        for relax in config.relaxations:
            plan = matched_budget(model, inspection, target, Relaxation.parse(relax), policy, max_bytes)
            label = f"budget≈{name}" + ("" if relax == "none" else f"+{relax}")
            note = "" if plan else f"no budget plan with {relax} fits in {target:,} parameters and {max_bytes:,} bytes"
            if plan and relax != "none" and not plan.relax_params:  # lora:auto gave no member a delta
                plan, note = None, f"{relax} leaves no room for a delta at this size: the plan is budget≈{name}'s"
            points.append((label, plan, relax, note))
    return points


def run_sweep(model: nn.Module, train: ImageData, test: ImageData, config: SweepConfig, out: str | Path,
              baseline: dict[str, Any] | None = None, progress: ProgressFn | None = None) -> list[SweepRow]:
    """Evaluate every grid point on copies of `model` (trained, untied); write the JSON to `out`.

    `baseline`: how the model was trained (a checkpoint's `finetune` record), kept in the JSON.
    `progress` follows each point's fine-tune; every point's result goes to the logger."""
    model = model.cpu().eval()
    channels = input_channels(model)
    test_adapter = adapter_for(model, test, config.image_size)
    points = _points(model, config, (channels, *(test_adapter.size or test.shape[1:])))
    rows: list[SweepRow] = []
    start = time.perf_counter()
    base_acc = evaluate(model, test, test_adapter)["acc"]
    with tempfile.TemporaryDirectory() as tmp:
        params = sum(p.numel() for p in model.parameters())
        rows.append(SweepRow("untied", "none", "none", None, params, save(copy.deepcopy(model),
                             Path(tmp) / "base.pt").stat().st_size, base_acc, base_acc,
                             time.perf_counter() - start))
        for index, (label, plan, relax, note) in enumerate(points):
            if plan is None or not plan.groups:
                rows.append(SweepRow(label, "-", relax, None, 0, 0, float("nan"), float("nan"), 0.0,
                                     note=note or "the policy ties nothing"))
                log.warning(f"skip {label}: {rows[-1].note}")
                continue
            runs = [(loss, seed) for seed in config.seeds for loss in config.losses] if config.epochs > 0 else [
                (None, config.seeds[0])]
            for loss, seed in runs:
                t0 = time.perf_counter()
                tied = copy.deepcopy(model)
                train_config = None if loss is None else TrainConfig(
                    epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, distill=loss == "kd", seed=seed,
                    image_size=config.image_size)
                recal = (RecalibrateConfig(config.calibrate, config.batch_size, choose="all") if config.calibrate
                         else False)  # every statistic: the mean init left them all stale
                report = retrofit(tied, plan, train, fit=None, init=config.init, relax=relax, recalibrate=recal,
                                  finetune=train_config, test=test, held_out=0, image_size=config.image_size,
                                  out=Path(tmp) / f"p{index}.pt", measure_untied=False, progress=progress)
                before = report.step("BatchNorm recalibrated") or report.steps[0]  # after tying
                acc_tied, acc, history = before.accuracy, report.final.accuracy, list(report.history)
                assert acc_tied is not None and acc is not None
                path = save(tied.cpu(), Path(tmp) / f"s{index}.pt")
                tied_plan = plan_of(tied)  # the plan with the relaxation counted
                assert tied_plan is not None
                rows.append(SweepRow(label, plan.policy, relax, loss, tied_plan.totals.params_after,
                                     path.stat().st_size, acc_tied, acc, time.perf_counter() - t0,
                                     groups=len(plan.groups), note=note, history=history, seed=seed))
                log.info(f"{label} ({loss or 'no fine-tune'}, seed {seed}): "
                         f"{tied_plan.totals.params_after:,} params, tied {acc_tied:.4f} → {acc:.4f}")
                write_sweep(out, model, train, config, rows, baseline)
    write_sweep(out, model, train, config, rows, baseline)
    return rows


def write_sweep(path: str | Path, model: nn.Module, data: ImageData, config: SweepConfig,
                rows: list[SweepRow], baseline: dict[str, Any] | None = None) -> None:
    spec = spec_of(model)
    payload = {"format": SWEEP_FORMAT, "command": "kshare " + shlex.join(sys.argv[1:]),
               "model": spec.to_dict() if spec else None, "baseline": baseline, "data": data.name,
               "train_images": len(data.labels), "config": asdict(config),
               "matched_bytes": True,  # `match` points fit the policy's file size too (older sweeps: parameters)
               "rows": [asdict(r) for r in rows]}
    Path(path).write_text(json.dumps(payload, indent=1, default=str))


def read_sweep(path: str | Path) -> dict[str, Any]:
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StudyError(f"cannot read sweep file {path}: {exc}") from None
    if payload.get("format") != SWEEP_FORMAT:
        raise StudyError(f"{path} is not a kshare sweep file")
    return payload


def pareto(rows: list[SweepRow]) -> list[SweepRow]:
    """The rows no other row beats on both stored bytes (fewer) and accuracy (higher)."""
    valid = [r for r in rows if r.stored_bytes > 0 and r.acc == r.acc]
    return sorted((r for r in valid if not any((o.stored_bytes <= r.stored_bytes and o.acc > r.acc) or
                                                 (o.stored_bytes < r.stored_bytes and o.acc >= r.acc) for o in valid)),
                  key=lambda r: r.stored_bytes)
