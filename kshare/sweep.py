"""`kshare sweep`: the whole trade-off curve of one trained model, not a single point.

A grid of positional policies, budgets and relaxations is applied to copies of one trained
(untied) model; each is evaluated right after tying and, optionally, after a short
fine-tune (cross-entropy, distillation from the untied original, or both). `match:POLICY`
points search the budget that, with a given relaxation, stores no more parameters and writes
no larger a checkpoint than `POLICY` does, so relaxed and plain sharing are compared at the
same size (a relaxation's tensors each cost a name in the file, not only their elements).
The rows go to a JSON file and a Pareto plot (test accuracy vs stored bytes).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import nn

from kshare.api import analyze
from kshare.budget import budget_plan
from kshare.calibrate import recalibrate_bn
from kshare.checkpoint import save
from kshare.data import Adapter, ImageData
from kshare.errors import PlanError, StudyError
from kshare.graph import Inspection
from kshare.plan import SharingPlan
from kshare.policy import Policy
from kshare.relax import Relaxation
from kshare.surgery import plan_of, tie
from kshare.train import TrainConfig, evaluate, finetune, input_channels
from kshare.zoo import spec_of

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
                   policy: Policy, max_bytes: int | None = None) -> SharingPlan | None:
    """The budget plan that, with `relaxation` counted, stores the most parameters not above `target`
    (a whole-model count, such as another plan's `params_after`) and, given `max_bytes`, whose
    checkpoint is no larger; None when none fits."""
    stats = inspection.stats
    while True:
        fraction = (target - (stats.params - stats.conv_params)) / stats.conv_params
        try:
            plan = budget_plan(model, inspection, fraction, policy, relaxation=relaxation)
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
        return save(tie(copy.deepcopy(model), plan), Path(tmp) / "m.pt").stat().st_size


def _points(model: nn.Module, config: SweepConfig, size: tuple[int, ...]) -> list[tuple[str, SharingPlan | None,
                                                                                       str, str]]:
    """(label, plan or None when it cannot be built, relaxation, note) for every grid point."""
    base = analyze(model, "all", input_size=size)
    inspection, policy = base.inspection, Policy()
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
              console: Console | None = None, baseline: dict[str, Any] | None = None) -> list[SweepRow]:
    """Evaluate every grid point on copies of `model` (trained, untied); write the JSON to `out`.

    `baseline`: how the model was trained (a checkpoint's `finetune` record), kept in the JSON."""
    console = console or Console(stderr=True)
    model = model.cpu().eval()
    channels = input_channels(model)
    test_adapter = Adapter.for_model(test, channels, config.image_size, augment=False)
    calibration_adapter = Adapter.for_model(train, channels, config.image_size, augment=False)
    h, w = test.shape[1:] if config.image_size is None else (config.image_size, config.image_size)
    points = _points(model, config, (channels, h, w))
    rows: list[SweepRow] = []
    start = time.perf_counter()
    base_acc = evaluate(model, test, test_adapter)["acc"]
    teacher = copy.deepcopy(model)  # finetune freezes its teacher: never hand it the model we copy from
    with tempfile.TemporaryDirectory() as tmp:
        params = sum(p.numel() for p in model.parameters())
        rows.append(SweepRow("untied", "none", "none", None, params, save(copy.deepcopy(model),
                             Path(tmp) / "base.pt").stat().st_size, base_acc, base_acc,
                             time.perf_counter() - start))
        for index, (label, plan, relax, note) in enumerate(points):
            if plan is None or not plan.groups:
                rows.append(SweepRow(label, "-", relax, None, 0, 0, float("nan"), float("nan"), 0.0,
                                     note=note or "the policy ties nothing"))
                console.print(f"[yellow]skip[/] {label}: {rows[-1].note}", soft_wrap=True)
                continue
            runs = [(loss, seed) for seed in config.seeds for loss in config.losses] if config.epochs > 0 else [
                (None, config.seeds[0])]
            acc_tied = None
            for loss, seed in runs:
                t0 = time.perf_counter()
                tied = tie(copy.deepcopy(model), plan, init=config.init, relax=relax)
                if config.calibrate:
                    recalibrate_bn(tied, train, images=config.calibrate, batch_size=config.batch_size,
                                   adapter=calibration_adapter)
                if acc_tied is None:  # tying is deterministic: the same for every seed and loss
                    acc_tied = evaluate(tied, test, test_adapter)["acc"]
                history: list[dict[str, Any]] = []
                acc = acc_tied
                if loss is not None:
                    train_config = TrainConfig(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
                                               distill=loss == "kd", seed=seed, image_size=config.image_size)
                    summary = finetune(tied, train, test, train_config, Path(tmp) / f"p{index}.pt",
                                       teacher=teacher if loss == "kd" else None, console=console)
                    history, acc = summary["history"], summary["history"][-1]["test_acc"]
                path = save(tied.cpu(), Path(tmp) / f"s{index}.pt")
                tied_plan = plan_of(tied)  # the plan with the relaxation counted
                assert tied_plan is not None
                rows.append(SweepRow(label, plan.policy, relax, loss, tied_plan.totals.params_after,
                                     path.stat().st_size, acc_tied, acc, time.perf_counter() - t0,
                                     groups=len(plan.groups), note=note, history=history, seed=seed))
                console.print(f"{label} ({loss or 'no fine-tune'}, seed {seed}): "
                              f"{tied_plan.totals.params_after:,} params, tied {acc_tied:.4f} → {acc:.4f}",
                              soft_wrap=True)
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


def _percent(row: SweepRow) -> str:
    return f"{100 * row.acc:.2f}" + (f" ± {100 * row.acc_sd:.2f}" if row.runs > 1 else "")


def _baseline_line(record: dict[str, Any] | None) -> list[str]:
    if not record:
        return []
    cfg, metrics = record.get("config", {}), record.get("metrics", {})
    images = f" ({record['train_images']:,} training images; " if "train_images" in record else " ("
    return ["", f"The untied baseline: {record.get('epoch', '?')} epoch(s) of `kshare finetune` on "
                f"`{record.get('data', '?')}`{images}{cfg.get('optimizer', '?')}, lr {cfg.get('lr', 0):g}, batch "
                f"{cfg.get('batch_size', '?')}, seed {cfg.get('seed', '?')}), test accuracy "
                f"{100 * metrics.get('test_acc', float('nan')):.2f}% when it finished."]


def _steps(epochs: int, images: int, batch_size: int) -> int:
    return epochs * math.ceil(images / batch_size)


def finetune_steps(payload: dict[str, Any]) -> tuple[int, int] | None:
    """(each point's fine-tune steps, the baseline's training steps), when the sweep records both."""
    record, config = payload.get("baseline") or {}, payload["config"]
    if "train_images" not in record or not isinstance(payload.get("train_images"), int) or not config["epochs"]:
        return None
    base = _steps(record.get("epoch", 0), record["train_images"], record.get("config", {}).get("batch_size", 128))
    return _steps(config["epochs"], payload["train_images"], config["batch_size"]), base


def _share_line(payload: dict[str, Any]) -> list[str]:
    """How long each point's fine-tune is next to the baseline's training, when both are known."""
    steps = finetune_steps(payload)
    if steps is None:
        return []
    point, base = steps
    return ["", f"Each point's fine-tune takes {point:,} optimiser steps, {point / max(base, 1):.1%} of the "
                f"{base:,} that trained the baseline."]


def sweeps_summary(payloads: dict[str, dict[str, Any]]) -> str:
    """One line per published sweep and matched policy: relaxed budget plans with distillation
    against the plain policy, so a claim that holds on one baseline only shows as such."""
    lines = ["| sweep | baseline seed | baseline test acc % | fine-tune steps / baseline's | budget plan + "
             "relaxation + KD vs the plain policy (Δ of means, points) | higher in every seed |",
             "| --- | ---: | ---: | ---: | --- | ---: |"]
    won = total = 0
    for name, payload in payloads.items():
        comparisons = [c for c in matched_comparisons(payload) if c.relaxed and c.loss == "kd"]
        steps = finetune_steps(payload)
        share = f"{steps[0]:,} / {steps[1]:,}" if steps else "–"
        record = payload.get("baseline") or {}
        acc, seed = record.get("metrics", {}).get("test_acc"), record.get("config", {}).get("seed", "–")
        for target in dict.fromkeys(c.target for c in comparisons):
            mine = [c for c in comparisons if c.target == target]
            wins = sum(c.every_seed for c in mine)
            won, total = won + wins, total + len(mine)
            deltas = ", ".join(f"{c.mine.label.removeprefix(f'budget≈{target}')} {c.delta:+.2f}" for c in mine)
            shown = "–" if acc is None else f"{100 * acc:.2f}"
            lines.append(f"| `{name}` | {seed} | {shown} | {share} | vs `{target}`: {deltas} | {wins} of {len(mine)} |")
    return "\n".join([*lines, "", f"Higher in every seed in {won} of {total} size-matched comparisons across "
                                   f"{len(payloads)} sweeps."])


@dataclass(frozen=True)
class Comparison:
    """A budget plan against the plain policy whose size it was fitted to, under one loss."""

    target: str
    loss: str
    mine: SweepRow  # mean over seeds
    plain: SweepRow
    wins: int  # seeds in which the budget plan scored higher
    seeds: int  # seeds both ran

    @property
    def delta(self) -> float:
        """Difference of the mean accuracies, in points."""
        return 100 * (self.mine.acc - self.plain.acc)

    @property
    def relaxed(self) -> bool:
        return "+" in self.mine.label

    @property
    def every_seed(self) -> bool:
        return self.wins == self.seeds > 0


def matched_comparisons(payload: dict[str, Any]) -> list[Comparison]:
    """Every size-matched comparison a sweep holds (`--match`), seed by seed."""
    runs = [SweepRow(**r) for r in payload["rows"]]
    rows = aggregate(runs)
    config = payload["config"]
    found = []
    for target in config.get("match", []):
        for loss in config.get("losses", []):
            plain = next((r for r in rows if r.label == target and r.loss == loss), None)
            if plain is None:
                continue
            theirs = {x.seed: x.acc for x in runs if x.label == target and x.loss == loss}
            for r in rows:
                if not (r.label.startswith(f"budget≈{target}") and r.loss == loss and r.stored_bytes):
                    continue
                mine = {x.seed: x.acc for x in runs if x.label == r.label and x.loss == loss}
                paired = [seed for seed in mine if seed in theirs]
                found.append(Comparison(target, loss, r, plain, sum(mine[x] > theirs[x] for x in paired),
                                        len(paired)))
    return found


def sweep_markdown(payload: dict[str, Any], image: str | None = None) -> str:
    """A results section from a sweep JSON: every point (mean over seeds), then the size-matched comparisons."""
    runs = [SweepRow(**r) for r in payload["rows"]]
    rows = aggregate(runs)
    config = payload["config"]
    model = payload.get("model") or {}
    source = model.get("name", "the model") + "".join(f" {k}={v}" for k, v in (model.get("kwargs") or {}).items())
    seeds = config.get("seeds", [config.get("seed", 0)])
    tolerance = config.get("size_tolerance", 0.0)
    calibrated = (f", BatchNorm statistics re-estimated on {config['calibrate']:,} training images"
                  if config.get("calibrate") else "")
    lines = [f"Model: `{source}`, trained untied by kshare's own commands; data `{payload['data']}`; "
             f"every point tied with init `{config['init']}`{calibrated} and fine-tuned for "
             f"{config['epochs']} epoch(s) at lr {config['lr']:g} on {payload.get('train_images', '?')} "
             f"training images, seed(s) {', '.join(map(str, seeds))}.", *_baseline_line(payload.get("baseline")),
             *_share_line(payload), "",
             "```bash", payload.get("command", "kshare sweep ..."), "```", "",
             "| point | loss | stored params | file | acc right after tying % | after fine-tune % |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.stored_bytes == 0:
            lines.append(f"| {r.label} | – | – | – | – | {r.note} |")
            continue
        lines.append(f"| {r.label} | {r.loss or '–'} | {r.params:,} | {r.stored_bytes / 1024:,.1f} KiB | "
                     f"{100 * r.acc_tied:.2f} | {_percent(r)} |")
    comparisons = matched_comparisons(payload)
    compare = [f"| {c.mine.label} vs {c.target} | {c.loss} | {c.mine.params:,} vs {c.plain.params:,} "
               f"({c.mine.params / c.plain.params - 1:+.2%}) | {c.mine.stored_bytes / 1024:,.1f} vs "
               f"{c.plain.stored_bytes / 1024:,.1f} KiB ({c.mine.stored_bytes / c.plain.stored_bytes - 1:+.2%}) | "
               f"{_percent(c.mine)} vs {_percent(c.plain)} | "
               f"{c.delta:+.2f} ({'higher' if c.delta > 0 else 'not higher'}) | {c.wins} of {c.seeds} |"
               for c in comparisons]
    relaxed_kd = [(c.every_seed, c.delta) for c in comparisons if c.relaxed and c.loss == "kd"]
    no_room = [t for t in config.get("match", [])
               if not any(r.label.startswith(f"budget≈{t}+") and r.stored_bytes for r in rows)]
    if compare:
        allowance = f"at most {tolerance:.1%} more" if tolerance else "no more"
        bytes_too = " and bytes" if payload.get("matched_bytes") else ""
        lines += ["", f"Same size, same fine-tune budget: a budget plan (with a relaxation, or none) fitted to "
                  f"store {allowance} parameters{bytes_too} than the plain policy, fine-tuned with the same seeds:", "",
                  "| comparison | loss | stored params | file | test acc % | Δ points (means) | seeds where higher |",
                  "| --- | --- | --- | --- | --- | --- | --- |", *compare]
    if relaxed_kd:
        deltas = [d for _, d in relaxed_kd]
        lines += ["", f"Budget plan + relaxation + distillation against the plain policy at its size: higher in "
                  f"every seed in {sum(w for w, _ in relaxed_kd)} of {len(relaxed_kd)} comparisons "
                  f"(Δ of the means from {min(deltas):+.2f} to {max(deltas):+.2f} points)."]
    if no_room:
        lines += ["", f"At the size of {', '.join(f'`{t}`' for t in no_room)} no relaxed budget plan fits: "
                  "it already shares every isomorphic kernel, which leaves no parameter for a relaxation."]
    if image:
        lines += ["", f"![sweep]({image})"]
    return "\n".join(lines)


def pareto(rows: list[SweepRow]) -> list[SweepRow]:
    """The rows no other row beats on both stored bytes (fewer) and accuracy (higher)."""
    valid = [r for r in rows if r.stored_bytes > 0 and r.acc == r.acc]
    return sorted((r for r in valid if not any((o.stored_bytes <= r.stored_bytes and o.acc > r.acc) or
                                                 (o.stored_bytes < r.stored_bytes and o.acc >= r.acc) for o in valid)),
                  key=lambda r: r.stored_bytes)


LOSS_STYLES = {None: ("grey", "o", "tied, no fine-tune"), "ce": ("tab:blue", "o", "fine-tuned, CE"),
               "kd": ("tab:red", "s", "fine-tuned, CE + KD")}


def plot_sweep(rows: list[SweepRow], path: str | Path, title: str) -> Path:
    """Two panels: accuracy vs stored bytes with the Pareto front (each point named once, at its
    best loss), and every point's accuracy as a bar, ordered by size, so crowded sizes stay readable.
    Means over seeds; error bars: one standard deviation."""
    rows = aggregate(rows)
    try:
        import matplotlib
    except ImportError:
        raise StudyError("the plot needs matplotlib: pip install 'kshare[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted((r for r in rows if r.stored_bytes > 0 and r.label != "untied"),
                    key=lambda r: (r.stored_bytes, r.label, r.loss or ""))
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(13, max(5.0, 0.22 * len(points) + 1.5)),
                                   gridspec_kw={"width_ratios": [3, 2]})
    for loss, (color, marker, name) in LOSS_STYLES.items():
        pts = [r for r in points if r.loss == loss]
        if pts:
            ax.errorbar([r.stored_bytes / 1024 for r in pts], [100 * r.acc for r in pts],
                        yerr=[100 * r.acc_sd for r in pts], fmt=marker, color=color, capsize=2, ms=5, label=name)
    best: dict[str, SweepRow] = {}
    for r in points:
        if r.label not in best or r.acc > best[r.label].acc:
            best[r.label] = r
    for r in best.values():
        ax.annotate(r.label, (r.stored_bytes / 1024, 100 * r.acc), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    base = next((r for r in rows if r.label == "untied"), None)
    if base is not None:
        ax.scatter([base.stored_bytes / 1024], [100 * base.acc], marker="*", s=160, c="k", label="untied original")
    front = pareto(points)
    if front:
        ax.plot([r.stored_bytes / 1024 for r in front], [100 * r.acc for r in front], "k--", lw=0.8,
                label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("stored bytes (KiB, log scale)")
    ax.set_ylabel("test accuracy %")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)

    y = range(len(points))
    bars.barh(list(y), [100 * r.acc for r in points], xerr=[100 * r.acc_sd for r in points],
              color=[LOSS_STYLES[r.loss][0] for r in points], capsize=2)
    bars.set_yticks(list(y), [f"{r.label} ({r.loss or 'tied'}) {r.params:,}" for r in points], fontsize=6)
    low = min((100 * (r.acc - r.acc_sd) for r in points), default=0.0)
    high = max((100 * (r.acc + r.acc_sd) for r in points), default=100.0)
    bars.set_xlim(max(0.0, low - 1), min(100.0, high + 0.5))
    bars.invert_yaxis()
    bars.set_xlabel("test accuracy % (point, loss, stored params; smallest first)")
    bars.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
