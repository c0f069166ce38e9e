"""Render analyses for people (rich tables) and scripts (JSON); no computation here."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kshare.analysis.signature import Signature
from kshare.api import Analysis
from kshare.fit.blocks import UnitReconstruction
from kshare.fit.fidelity import Fidelity, kl_per_million, smooth_measure
from kshare.fit.order import FitReport
from kshare.planning.plan import SharingPlan
from kshare.retrofit import RetrofitReport


def count(n: float) -> str:
    """Parameter counts as people read them: 1.41M, 107.3K, 512."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}" if n / scale < 100 else f"{n / scale:.1f}{unit}"
    return str(int(n))


def size(n: float) -> str:
    """Bytes in binary units: 5.38 MiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _members(names: tuple[str, ...], shown: int = 4) -> str:
    if len(names) <= shown:
        return ", ".join(names)
    return ", ".join(names[: shown - 1]) + f", … {names[-1]} (+{len(names) - shown} more)"


def _res(res: tuple[int, ...]) -> str:
    return "x".join(map(str, res)) if res else "-"


def render_analysis(analysis: Analysis, console: Console) -> None:
    """The `kshare analyze` report: groups, totals, stage map, and what stays unshared."""
    plan, insp = analysis.plan, analysis.inspection
    name = analysis.spec.ref if analysis.spec else (plan.source or "model")
    path = "torch.fx trace + shape propagation" if insp.method == "fx" else "forward hooks on one real pass"
    console.print(
        f"[bold]{name}[/]  policy [cyan]{plan.policy}[/] match [cyan]{plan.match}[/]"
        f"{'' if plan.share_bias else ' (bias not shared)'}  input {','.join(map(str, insp.input_size))}"
    )
    console.print(f"{len(insp.sites)} conv layers found via {path}")
    if insp.fallback_reason:
        console.print(f"[yellow]fell back to hooks: {insp.fallback_reason}[/]")

    if plan.groups:
        table = Table(title="Sharing groups", title_justify="left")
        errors = any(g.error is not None for g in plan.groups)
        for col, kw in (("group", {}), ("signature", {}), ("n", {"justify": "right"}), ("stage", {}),
                        ("members", {"overflow": "fold"}), ("params saved", {"justify": "right"})):
            table.add_column(col, **kw)
        if errors:
            table.add_column("rel. error", justify="right")
        ranks = any(g.ranks for g in plan.groups)
        if ranks:
            table.add_column("delta ranks", overflow="fold")
        for g in plan.groups:
            stages = ",".join(map(str, g.stages))
            row = [g.name, g.signature.describe(), str(len(g.members)), stages, _members(g.members),
                   count(g.params_saved)]
            row += [f"{g.error:.3f}" if g.error is not None else ""] if errors else []
            table.add_row(*row, *([_ranks(g.ranks)] if ranks else []))
        console.print(table)
        if errors:
            console.print("rel. error: ‖members − shared kernel‖² / ‖members‖² with each group's init")
    for note in plan.notes:
        console.print(f"[yellow]{note}[/]")

    t = plan.totals
    totals = Table(title="Totals", title_justify="left")
    for col in ("", "before", "after", "ratio"):
        totals.add_column(col, justify="right" if col else "left")
    totals.add_row("parameters", f"{t.params_before:,}", f"{t.params_after:,}", f"{t.ratio:.2f}x")
    totals.add_row("conv parameters", f"{t.conv_params_before:,}", f"{t.conv_params_after:,}", f"{t.conv_ratio:.2f}x")
    totals.add_row("parameter bytes", size(t.param_bytes_before), size(t.param_bytes_after), "")
    totals.add_row("state bytes (+buffers)", size(t.state_bytes_before), size(t.state_bytes_after), "")
    console.print(totals)

    stages = Table(title="Stage map (runs of one output resolution)", title_justify="left")
    for col in ("stage", "resolution", "conv layers"):
        stages.add_column(col, justify="right")
    for stage, res, n in insp.stage_map():
        stages.add_row(str(stage), _res(res), str(n))
    console.print(stages)

    if plan.unshared:
        sigs = {s.name: s.signature.describe() for s in insp.sites}
        left = Table(title=f"Left unshared ({len(plan.unshared)})", title_justify="left")
        for col in ("layer", "signature", "reason"):
            left.add_column(col)
        for u in plan.unshared:
            left.add_row(u.name, sigs.get(u.name, "-"), u.reason)
        console.print(left)


def analysis_json(analysis: Analysis) -> str:
    """The plan as JSON (loadable by `SharingPlan.from_json`), plus the model's source spec."""
    data: dict[str, Any] = analysis.plan.to_dict()
    if analysis.spec is not None:
        data["spec"] = analysis.spec.to_dict()
    return json.dumps(data, indent=2)


def _ranks(ranks: Sequence[int]) -> str:
    """Each member's LoRA rank under lora:auto, in member order."""
    return ",".join(map(str, ranks))


def _groups_table(groups: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    errors = any(g.get("error") is not None for g in groups)
    for col, kw in (("group", {}), ("signature", {}), ("n", {"justify": "right"}), ("init", {}),
                    ("members", {"overflow": "fold"}), ("params saved", {"justify": "right"})):
        table.add_column(col, **kw)
    if errors:
        table.add_column("rel. error", justify="right")
    outputs = any(g.get("output_error") is not None for g in groups)
    if outputs:
        table.add_column("output error", justify="right")
    ranks = any(g.get("ranks") for g in groups)
    if ranks:
        table.add_column("delta ranks", overflow="fold")
    for g in groups:
        row = [g["name"], Signature.from_dict(g["signature"]).describe(), str(len(g["members"])), g["init"],
               _members(tuple(g["members"])), count(g["params_saved"])]
        if errors:
            row.append(f"{g['error']:.3f}" if g.get("error") is not None else "")
        if outputs:
            row.append(f"{g['output_error']:.3f}" if g.get("output_error") is not None else "")
        if ranks:
            row.append(_ranks(g.get("ranks", ())))
        table.add_row(*row)
    return table


def render_applied(plan: SharingPlan | None, path: Path, console: Console) -> None:
    """What `kshare apply` did: the groups tied, the savings, the file written."""
    if plan is None or not plan.groups:
        console.print("[yellow]no sharing group was tied: the saved model is unchanged[/]")
    else:
        console.print(_groups_table([g.to_dict() for g in plan.groups], f"Tied {len(plan.groups)} groups"))
        if any(g.output_error is not None for g in plan.groups):
            console.print("rel. error: ‖members − shared kernel‖² / ‖members‖² (weights); output error: the same "
                          "for the members' outputs on the calibration images")
        t = plan.totals
        relaxed = f", relaxation {plan.relax} included (+{plan.relax_params:,})" if plan.relax != "none" else ""
        console.print(f"parameters {t.params_before:,} → {t.params_after:,} ({t.ratio:.2f}x fewer{relaxed})")
    console.print(f"wrote {path} ({size(path.stat().st_size)})")


def render_fit(report: FitReport, console: Console) -> None:
    """One line on a data fit: how many groups, images, how long; and what moved most."""
    fitted = [g for g in report.groups if g.fitted]
    mean = sum(g.mean_output_error for g in fitted) / max(len(fitted), 1)
    after = sum(g.output_error for g in fitted) / max(len(fitted), 1)
    recal = f"; BatchNorm re-estimated in {report.recalibrated} layers" if report.recalibrated else ""
    console.print(f"fitted {len(fitted)} of {len(report.groups)} groups to {report.images:,} images ({report.mode}) in "
                  f"{report.seconds:.1f} s: mean output error {mean:.3f} with the mean kernel → {after:.3f}{recal}")
    if report.reconstructed:
        render_reconstruction(report.reconstructed, console)


def render_retrofit(report: RetrofitReport, console: Console) -> None:
    """A data fit's lines, then each measured step: accuracy where labelled, fidelity where held out."""
    if report.fit is not None:
        render_fit(report.fit, console)
    untied = next((s.accuracy for s in report.steps if s.name == "untied"), None)
    for step in report.steps:
        if step.name == "untied" or (step.accuracy is None and step.fidelity is None):
            continue
        parts = []
        if step.accuracy is not None:
            parts.append(f"test acc {step.accuracy:.4f}" + (f" ({step.accuracy / untied:.1%} of untied)" if untied
                                                            else ""))
        if step.fidelity is not None:
            parts.append(step.fidelity.line())
        console.print(f"{step.name}: " + "; ".join(parts))
    if report.batchnorm is not None:
        console.print(report.batchnorm.line())
    if report.distillation:
        kept = max((e for e in report.distillation if e.best), key=lambda e: e.epoch)
        measure = smooth_measure(kept.fidelity.kind)
        console.print(f"distillation, held-out {measure} by epoch: "
                      + " → ".join(f"{e.fidelity.kl:.4f}{'*' if e is kept else ''}" for e in report.distillation)
                      + f" (epoch 0: before; * kept, epoch {kept.epoch})")
    if report.costs:
        console.print(costs_table([dataclasses.asdict(c) for c in report.costs]))
    if not report.held_out_images:
        console.print("fidelity not measured: no image of the data was left to hold out (--held-out)")


COST_COLUMNS = {  # what `GroupCost.kl` and `.top1` are, by the kind of output measured (`Fidelity.kind`)
    "classes": ("KL added", "top-1 agreement taken"),
    "pixels": ("KL added", "pixel agreement taken"),
    "boxes": ("feature error added", "box agreement taken"),
    "features": ("output error added", ""),  # no decisions: nothing to agree on
}


def costs_table(costs: Sequence[dict[str, Any]]) -> Table:
    """What tying each group alone costs on the held-out images, the worst bargain first (the
    order a fidelity search leaves groups untied in). Columns are named for what was measured:
    on a detector the smooth measure is the feature error, not a KL."""
    kind = str(costs[0].get("kind") or "classes") if costs else "classes"
    added, taken = COST_COLUMNS.get(kind, COST_COLUMNS["classes"])
    per = added.removesuffix(" added")
    table = Table(title="What tying each group alone costs (held-out images)", title_justify="left")
    for column in ("group", "params saved", added, *([taken] if taken else []), f"{per} per M saved"):
        table.add_column(column, justify="left" if column == "group" else "right")

    def per_million(c: dict[str, Any]) -> float:  # the record's figures: a file may hold anything
        return kl_per_million(float(c.get("kl") or 0.0), int(c.get("params_saved") or 0))

    for c in sorted(costs, key=lambda c: -per_million(c)):
        agreement = [f"{float(c.get('top1') or 0):.1%}"] if taken else []
        table.add_row(str(c.get("group")), f"{int(c.get('params_saved') or 0):,}", f"{float(c.get('kl') or 0):.4f}",
                      *agreement, f"{per_million(c):.3g}")
    return table


def search_table(record: dict[str, Any]) -> Table:
    """A fidelity search's trials (`SearchReport.record()`), in the order run, the kept one marked."""
    reached = "reached" if record.get("reached") else "not reached"
    table = Table(title=f"Fidelity search for {record.get('target')} ({reached}; stopped: {record.get('stopped')})",
                  title_justify="left")
    for column in ("trial", "untied", "tied", "params", "fewer", "top-1", "KL", "est.", "meets", "s"):
        table.add_column(column, justify="right")  # groups left untied and tied; the estimate that chose it
    before = int(record.get("params_before") or 0)
    for t in record.get("trials") or []:
        fidelity = t.get("fidelity") or {}
        params = int(t.get("params") or 0)
        mark = " ←" if t.get("index") == record.get("chosen") else ""
        table.add_row(f"{t.get('index')}{mark}", str(t.get("reverted")), str(t.get("groups")), f"{params:,}",
                      f"{before / params:.2f}x" if params else "?", f"{float(fidelity.get('top1', 0)):.3f}",
                      f"{float(fidelity.get('kl', 0)):.4f}",
                      f"{t['estimate']:.4f}" if isinstance(t.get("estimate"), float) else "",
                      "yes" if t.get("met") else "no", f"{float(t.get('seconds') or 0):.0f}")
    return table


def render_reconstruction(units: Sequence[UnitReconstruction], console: Console) -> None:
    """One line on block reconstruction: units, steps, time, and the block output error it left."""
    before = sum(u.start_error for u in units) / len(units)
    after = sum(u.error for u in units) / len(units)
    undone = [u for u in units if not u.kept]
    network = (units[0].network_start_error,
               units[-1].network_error if units[-1].kept else units[-1].network_start_error)
    console.print(f"reconstructed {len(units)} unit(s) of blocks, {max(u.steps for u in units)} steps each on "
                  f"{units[0].images:,} images, in "
                  f"{sum(u.seconds for u in units):.1f} s: block output error {before:.3f} → {after:.3f}, "
                  f"network output error {network[0]:.3f} → {network[1]:.3f}"
                  + (f"; {len(undone)} unit(s) undone (their steps made the network's output worse)" if undone else ""))


def fidelity_line(record: dict[str, Any]) -> str:
    """A checkpoint's fidelity record in `Fidelity.line`'s words (its kind decides them); a record
    from another version, missing fields, in the classifier's."""
    known = {f.name for f in dataclasses.fields(Fidelity)}
    try:
        return Fidelity(**{k: v for k, v in record.items() if k in known}).line()
    except (TypeError, ValueError):
        nan = float("nan")
        return (f"top-1 agreement {record.get('top1', nan):.1%}, top-5 {record.get('top5', nan):.1%}, "
                f"KL {record.get('kl', nan):.4f} on {record.get('images', '?')} held-out images")


def render_onnx_info(summary: dict[str, Any], console: Console) -> None:
    """`kshare info FILE.onnx`: bytes, shared kernels, inputs, and the measured session."""
    console.print(f"[bold]{summary['path']}[/]  {size(summary['file_bytes'])}  (ONNX opset {summary['opset']}, "
                  f"{summary['nodes']} nodes)")
    console.print(f"initializers: {summary['initializers']} ({size(summary['initializer_bytes'])}, each stored once); "
                  f"{summary['shared_kernels']} kernels read by several nodes ({summary['kept_shared']} of them "
                  f"kept as graph inputs, {summary.get('affine_batchnorms', 0)} member BatchNorms written as 1x1 "
                  "depthwise convs: the forms in which ONNX Runtime keeps one copy of each)")
    console.print("inputs: " + ", ".join(f"{i['name']} {i['shape']}" for i in summary["inputs"])
                  + "; outputs: " + ", ".join(summary["outputs"]))
    session = summary.get("session")
    if session:
        console.print(f"ONNX Runtime default session: +{size(session['memory_bytes'])} resident, "
                      f"{session['latency_s'] * 1e3:.1f} ms per example (one thread)")
    else:
        console.print("session not measured: pip install onnxruntime to have it measured")


def render_info(summary: dict[str, Any], console: Console) -> None:
    """`kshare info`: source, plan, figures, groups."""
    console.print(f"[bold]{summary['path']}[/]  {size(summary['file_bytes'])}  "
                  f"(kshare {summary['kshare_version']})")
    console.print(f"source: {summary['source'] or 'a user model (pass it to kshare.load)'}"
                  + (f"  kwargs {summary['kwargs']}" if summary["kwargs"] else ""))
    console.print(f"tensors stored: {summary['tensors_stored']} ({size(summary['stored_tensor_bytes'])}), "
                  f"{summary['aliases']} more names alias them (untied: {size(summary['untied_tensor_bytes'])})")
    training = summary.get("training")
    if training:
        metrics = training.get("metrics", {})
        console.print(f"fine-tuned: epoch {training.get('epoch')} on {training.get('data', '?')}"
                      + (f", test acc {metrics['test_acc']:.4f}" if "test_acc" in metrics else "")
                      + (" (resumable state)" if training.get("resumable") else ""))
    retrofit = summary.get("retrofit")
    if retrofit and retrofit.get("steps"):
        last = retrofit["steps"][-1]
        fidelity = last.get("fidelity") or {}
        line = f"retrofit on {retrofit.get('data') or '?'}: after {last.get('name', '?')}"
        if fidelity:
            line += ", " + fidelity_line(fidelity)
        if isinstance(last.get("accuracy"), float):
            line += f", test acc {last['accuracy']:.4f}"
        console.print(line)
        check = retrofit.get("statistics")
        if isinstance(check, dict) and isinstance(check.get("top1"), float):
            console.print(f"BatchNorm statistics re-estimated on {check.get('images')} fit images kept "
                          f"{check['top1']:.1%} top-1 agreement of the untied model with itself: "
                          + ("they describe the images (fitted as --batchnorm all)" if check.get("describes") else
                             "learned on other images (fitted as --batchnorm measure)"))
        choice = retrofit.get("batchnorm")
        if isinstance(choice, dict) and isinstance(choice.get("kept"), list):
            console.print(f"BatchNorm: {len(choice.get('reestimated') or [])} layer(s) re-estimated, "
                          f"{len(choice['kept'])} kept (chosen by measured KL)")
        if isinstance(retrofit.get("costs"), list) and retrofit["costs"]:
            console.print(costs_table([c for c in retrofit["costs"] if isinstance(c, dict)]))
    search = summary.get("search")
    if isinstance(search, dict) and isinstance(search.get("trials"), list) and search["trials"]:
        console.print(search_table(search))
        if isinstance(search.get("costs"), list) and search["costs"] and not (retrofit or {}).get("costs"):
            console.print(costs_table([c for c in search["costs"] if isinstance(c, dict)]))
    recipe = summary.get("input")
    if recipe:
        console.print(f"fed as trained: input {','.join(map(str, recipe['input_size']))}, mean "
                      f"{tuple(round(v, 4) for v in recipe['mean'])}, std {tuple(round(v, 4) for v in recipe['std'])}"
                      + (f", centre crop {recipe['crop_pct']:.3g} of the shorter side ({recipe['interpolation']})"
                         if recipe.get("crop_pct") is not None and recipe.get("interpolation") else "")
                      + (f", {len(recipe['classes'])} classes" if recipe.get("classes") else "")
                      + (f" ({recipe['data']})" if recipe.get("data") else "")
                      + (f" [{recipe['source']}]" if recipe.get("source") else ""))
    plan = summary["plan"]
    if not plan:
        console.print("not tied: no sharing plan in this checkpoint")
        return
    t = plan["totals"]
    relax = plan.get("relax", "none")
    console.print(f"plan: policy [cyan]{plan['policy']}[/] match [cyan]{plan['match']}[/], "
                  f"{len(plan['groups'])} groups"
                  + (f", relaxation [cyan]{relax}[/] (+{plan.get('relax_params', 0):,} parameters)"
                     if relax != "none" else "")
                  + f"; parameters {t['params_before']:,} → {t['params_after']:,} ({t['ratio']:.2f}x fewer)")
    if plan["groups"]:
        console.print(_groups_table(plan["groups"], "Groups"))
