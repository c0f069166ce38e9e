"""Section 4 of docs/results.md from the retrofit study's JSON: what each init keeps of a trained
network right after tying, after BatchNorm recalibration, and after short fine-tunes."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from retrofit_study import Record, budget_target

INIT_NAMES = {"mean": "`mean` (weights)", "norm_mean": "`norm_mean` (weights)", "oneshot": "data, one-shot",
              "sequential": "data, sequential", "reconstructed": "data, sequential + block reconstruction"}
DATA_INITS = ("oneshot", "sequential", "reconstructed")


def _spread(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def _cell(records: list[Record], seeds: int) -> str:
    """Mean ± sd of a fine-tune cell; one that an interrupted study left with fewer seeds says how many."""
    if not records:
        return "–"
    return _spread([r.acc for r in records]) + (f" (n={len(records)})" if len(records) < seeds else "")


def _seen(machine: dict[str, Any], key: str) -> str:
    value = machine.get(key, "?")
    return " or ".join(map(str, value)) if isinstance(value, list) else str(value)


def retrofit_section(studies: list[tuple[dict[str, Any], list[Record]]], command: str,
                     commands: list[str] | None = None) -> str:
    """Section 4 from one or more study files (one per baseline, as `--only` writes them): the
    settings of the first, a subsection per baseline (`commands`: the one that made each file)."""
    header = studies[0][0]
    study = header["study"]
    shared = ("data", "seeds", "calib_images", "test_limit")  # what the section's opening paragraph states
    for other, _ in studies[1:]:
        if differing := [k for k in shared if other["study"][k] != study[k]]:
            raise ValueError(f"retrofit study files differ in {', '.join(differing)}: rerun them with one preset")
    limit = study["test_limit"]
    tested = "all" if limit is None else f"{limit:,}"
    lines = [
        "## 4. Retrofit without retraining: shared kernels fitted to data",
        "",
        f"Made by `{command}` (one run per baseline, each writing its JSON under `docs/results/`). Each trained, "
        f"untied baseline is tied "
        f"with each policy, each shared kernel computed from the members' kernels (`mean`, `norm_mean`) or fitted "
        f"to what the members output on {study['calib_images']:,} calibration images of the training split "
        f"(`kshare apply --fit data`, one-shot or sequential); then BatchNorm statistics are re-estimated on the same "
        f"images. No gradient step is taken until the fine-tune columns. Seeds {', '.join(map(str, study['seeds']))} "
        f"draw the calibration images (and seed the fine-tunes): mean ± sd over them. `budget≈stage` is the budget "
        f"plan that stores no more parameters than `stage` (plain, and with `lora:auto` deltas fitted in the same "
        f"metric), `budget≈N%` the one that stores at most N% of the untied network's; `@data` marks the budget "
        f"plans that group kernels and allot delta ranks by output error on the "
        f"calibration images (fitted by the sequential fit). Test accuracy on {tested} "
        f"`{study['data']}` test images. Fit times are wall times of the whole fit (statistics, solves, tying), "
        "on the machine named under each baseline.",
    ]
    for i, (header, records) in enumerate(studies):
        _baseline(lines, header, records, commands[i] if commands else None)
    return "\n".join(lines) + "\n"


def _baseline(lines: list[str], header: dict[str, Any], records: list[Record], command: str | None) -> None:
    """The subsections of one study file: a table per baseline, fine-tunes, verdicts."""
    study, notes, m = header["study"], header.get("notes", {}), header.get("machine", {})
    by: dict[tuple[str, str, str, str], list[Record]] = defaultdict(list)
    for r in records:
        by[(r.baseline, r.policy, r.init, r.stage + (f"|{r.steps}" if r.stage == "finetuned" else ""))].append(r)
    for base in study["baselines"]:
        label = base["label"]
        note = notes.get(label, {})
        untied = next(r.acc for r in records if r.baseline == label and r.policy == "untied")
        features = study.get("finetune_feature_weight", 0.0)
        rebuilt = study.get("reconstruct", 0)
        sizes = any((budget_target(p) or ("",))[0].endswith("%") for p in study["policies"])
        title = (label + (", budget plans of several sizes" if sizes else "")
                 + (", with block reconstruction" if rebuilt else "")
                 + (", fine-tuned with feature matching" if features else ""))
        lines += ["", f"### {title}", "",
                  f"`{base['ref']}`{''.join(f' {k}={v}' for k, v in base['kwargs'].items())}, trained untied by "
                  f"`kshare finetune`: {note.get('epochs', '?')} epoch(s) on {note.get('train_images', 0):,} images "
                  f"({note.get('steps', 0):,} optimiser steps, lr {base['lr']:g}"
                  + (f", images resized to {base['image_size']}×{base['image_size']}" if base["image_size"] else "")
                  + f"); untied test accuracy **{100 * untied:.2f}%**. Machine: {_seen(m, 'device')}, "
                  f"{_seen(m, 'cpus')} CPUs, {_seen(m, 'threads')} thread(s), torch {_seen(m, 'torch')}"
                  + (" (the study was resumed with other settings)" if any(isinstance(v, list) for v in m.values())
                     else "") + "." + (f" Made by `{command}`." if command else ""), "",
                  "| policy | params | init | right after tying % | + BatchNorm recalibrated % | of untied | "
                  "output error | fit s |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        policies = [p for p in study["policies"] if any(r.baseline == label and r.policy == p for r in records)]
        for policy in policies:
            for init in INIT_NAMES:
                tied = by.get((label, policy, init, "tied"), [])
                recal = by.get((label, policy, init, "recalibrated"), [])
                if not tied:
                    continue
                errors = [r.output_error for r in tied if r.output_error is not None]
                seconds = statistics.fmean(r.seconds for r in tied)
                share = statistics.fmean(r.acc for r in recal) / untied
                lines.append(f"| {policy} | {tied[0].params:,} | {INIT_NAMES[init]} | {_spread([r.acc for r in tied])} "
                             f"| {_spread([r.acc for r in recal])} | {share:.1%} | "
                             + (f"{statistics.fmean(errors):.3f}" if errors else "–")
                             + f" | {seconds:.1f} |")
        if rebuilt and any(r.baseline == label and r.init == "reconstructed" for r in records):
            lines += ["", f"Block reconstruction (`--reconstruct {rebuilt}`): after the sequential fit and the "
                      f"BatchNorm re-estimate, each unit of blocks that a sharing group spans (here a stage) is "
                      f"trained for {rebuilt} Adam steps (lr 1e-3, cosine, 64 images a step) towards the untied "
                      "network's block outputs and its final output on the same calibration images, in network "
                      "order; no labels. A unit whose steps worsen the network's output on 256 held-out images is "
                      "undone. Its two accuracy columns are the same model (BatchNorm was re-estimated before the "
                      "steps); its fit time includes the steps."]
        same = note.get("same_plan", {})
        if same:
            lines += ["", "Not fitted again, because on this network they tie exactly what another policy ties "
                      "(their rows would repeat it):", "", *(f"- `{p}`: the plan of `{q}`" for p, q in same.items())]
        tuned = [r for r in records if r.baseline == label and r.stage == "finetuned"]
        if tuned:
            steps = sorted({r.steps for r in tuned})
            shares = {s: s / max(note.get("steps", 1), 1) for s in steps}
            warmup = study.get("finetune_warmup", 0.0)
            lines += ["", "After a short distillation fine-tune from the untied baseline (AdamW, lr "
                      f"{study['finetune_lr']:g}"
                      + (f" warmed up linearly over the first {warmup:.0%} of the steps" if warmup else "")
                      + (f"; plus feature matching at weight {features:g}: the output of each block holding a "
                         "tied conv pulled towards the untied network's, `--feature-weight`" if features else "")
                      + ", one pass over a class-balanced sample), starting from the "
                      "recalibrated model; columns: optimiser steps (share of the baseline's):", "",
                      "| policy | init | " + " | ".join(f"{s} steps ({shares[s]:.0%}) %" for s in steps) + " |",
                      "| --- | --- | " + " | ".join("---:" for _ in steps) + " |"]
            for policy, _ in study["finetunes"]:
                for init in study["finetune_inits"]:
                    cells = [by.get((label, policy, init, f"finetuned|{s}"), []) for s in steps]
                    if any(cells):
                        lines.append(f"| {policy} | {INIT_NAMES[init]} | "
                                     + " | ".join(_cell(c, len(study["seeds"])) for c in cells) + " |")
        lines += ["", *_verdicts(label, untied, by, study, note)]


def _verdicts(label: str, untied: float, by: dict[tuple[str, str, str, str], list[Record]], study: dict[str, Any],
              note: dict[str, Any]) -> list[str]:
    """The findings, computed: what the best data-free and data-aware inits keep of `stage` and
    `all`, and the gap to the untied network after the longest fine-tune up to 5% of its steps."""
    found = []
    params = {k[1]: r[0].params for k, r in by.items() if k[0] == label and r}  # stored, by policy ("untied" too)
    for policy in ("stage", "all"):
        if policy in note.get("same_plan", {}):
            found.append(f"- `{policy}` is `{note['same_plan'][policy]}` here: the same groups, the same results.")
            continue
        best = {}
        for init in study["inits"]:
            recal = by.get((label, policy, init, "recalibrated"), [])
            if recal:
                best[init] = statistics.fmean(r.acc for r in recal)
        if not best:
            continue
        data_free = max((best[i], i) for i in best if i in ("mean", "norm_mean")) if any(
            i in best for i in ("mean", "norm_mean")) else None
        fitted = max((best[i], i) for i in best if i in DATA_INITS) if any(i in best for i in DATA_INITS) else None
        parts = []
        if data_free:
            parts.append(f"the best weight-space init (`{data_free[1]}`) keeps {data_free[0] / untied:.1%} of the "
                         "untied accuracy")
        if fitted:
            parts.append(f"the {INIT_NAMES[fitted[1]].removeprefix('data, ')} data fit keeps {fitted[0] / untied:.1%}"
                         + ("" if data_free else " of the untied accuracy"))
        when = ("before any fine-tune (block reconstruction takes gradient steps, on unlabelled images)"
                if fitted and fitted[1] == "reconstructed" else "with no gradient step")
        smaller = (f" ({params['untied'] / params[policy]:.2f}x fewer parameters)"
                   if params.get(policy) and params.get("untied") else "")
        found.append(f"- `{policy}`{smaller} {when}: {'; '.join(parts)}.")
        for init in ("sequential", "reconstructed"):
            steps = [int(k[3].split("|")[1]) for k in by if k[:3] == (label, policy, init) and
                     k[3].startswith("finetuned|")]
            within = [s for s in steps if s <= max(1, round(0.05 * note.get("steps", 0)))]  # as the study rounds
            if within:
                s = max(within)
                acc = statistics.fmean(r.acc for r in by[(label, policy, init, f"finetuned|{s}")])
                share = s / max(note.get("steps", 1), 1)
                what = "data fit" if init == "sequential" else "data fit and block reconstruction"
                found.append(f"- `{policy}`, {what}, after {s} fine-tune steps ({share:.0%} of the baseline's): "
                             f"{100 * acc:.2f}%, {100 * (acc - untied):+.2f} points from untied.")
    return found + _most_sharing(label, untied, by, note, params)


def _most_sharing(label: str, untied: float, by: dict[tuple[str, str, str, str], list[Record]],
                  note: dict[str, Any], params: dict[str, int]) -> list[str]:
    """Which plan stores least while staying within 0.5 (and 1) points of untied after a fine-tune of
    at most 5% of the baseline's steps: the trade-off a study of several sizes is for. `params`:
    stored parameters by policy, the untied network's under "untied"."""
    limit = max(1, round(0.05 * note.get("steps", 0)))
    total = params.get("untied", 0)
    ends: dict[str, tuple[float, int]] = {}  # policy: (best mean accuracy, steps), fine-tuned within the limit
    for (base, policy, _, stage), records in by.items():
        steps = int(stage.split("|")[1]) if base == label and stage.startswith("finetuned|") else limit + 1
        if steps <= limit:
            acc = statistics.fmean(r.acc for r in records)
            ends[policy] = max(ends.get(policy, (acc, steps)), (acc, steps))
    if len(ends) < 2 or not total:
        return []
    lines = []
    for gap in (0.5, 1.0):
        within = [p for p, (acc, _) in ends.items() if untied - acc <= gap / 100]
        if within:
            best = min(within, key=lambda p: params[p])
            acc, steps = ends[best]
            lines.append(f"- Most sharing within {gap:g} point{'s' if gap != 1 else ''} of untied after at most 5% of "
                         f"the baseline's steps: `{best}`, {total / params[best]:.2f}x fewer parameters, "
                         f"{100 * acc:.2f}% after {steps} steps.")
    if len(lines) < 2:  # not even within 1 point (or only that): the closest plan
        closest = max(ends, key=lambda p: ends[p][0])
        lines.insert(0, f"- No plan here comes within {'0.5 or 1 point' if not lines else '0.5 points'} of untied "
                        f"after at most 5% of the baseline's steps; the closest is `{closest}` "
                        f"({total / params[closest]:.2f}x fewer parameters, {100 * ends[closest][0]:.2f}%).")
    return lines
