"""Published sweep pages: `kshare sweep` JSON in, markdown out (section 3 of docs/results.md).

Study code, not library: it reads the JSON `kshare sweep` writes and renders tables, the
size-matched comparisons seed by seed, and the verdicts across sweeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kshare.sweep import SweepRow, aggregate


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
