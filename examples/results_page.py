"""Tables and plots from a study's records: the markdown page and PNGs of `docs/results.md`.

Everything on the page is computed from the records; nothing is typed in by hand except the
paper's own figures, which are labelled as the paper's.
"""

from __future__ import annotations

import os
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paper_study import RunRecord, Study
from sweep_pages import sweep_markdown, sweeps_summary

from kshare.errors import StudyError
from kshare.sweep import read_sweep

# Azadbakht et al. (arXiv 2210.14151), ConvMixer-256/16 with every isomorphic layer shared.
PAPER_ROWS = (
    ("CIFAR-10", "ConvMixer-256/16", "all", -1.8, 13.4),
    ("CIFAR-100", "ConvMixer-256/16", "all", -3.6, 9.6),
)


@dataclass(frozen=True)
class Summary:
    """Mean and spread over seeds of one (arch, policy) of the scratch setting."""

    arch: str
    policy: str
    n: int
    params: int
    file_bytes: float
    test_mean: float
    test_std: float
    train_mean: float
    gap_mean: float
    gap_std: float
    seconds: float


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize_scratch(records: list[RunRecord]) -> list[Summary]:
    groups: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.setting == "scratch":
            groups[(r.arch, r.policy)].append(r)
    out = []
    for (arch, policy), rs in groups.items():
        tests, gaps = [r.test_acc for r in rs], [r.gap for r in rs]
        out.append(Summary(arch, policy, len(rs), rs[0].params, statistics.mean(r.file_bytes for r in rs),
                           statistics.mean(tests), _std(tests), statistics.mean(r.train_acc for r in rs),
                           statistics.mean(gaps), _std(gaps), statistics.mean(r.seconds for r in rs)))
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _kib(n: float) -> str:
    return f"{n / 1024:,.0f} KiB"


def scratch_table(summaries: list[Summary]) -> str:
    base = {s.arch: s for s in summaries if s.policy == "none"}
    lines = ["| architecture | sharing | seeds | stored params | fewer | file | test acc % (mean ± sd) | "
             "Δ vs unshared | train acc % | train−test gap | time/run |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in summaries:
        b = base.get(s.arch)
        fewer = f"{b.params / s.params:.1f}x" if b else "–"
        delta = f"{100 * (s.test_mean - b.test_mean):+.2f}" if b and s.policy != "none" else "–"
        lines.append(f"| {s.arch} | {s.policy if s.policy != 'none' else 'unshared'} | {s.n} | {s.params:,} | "
                     f"{fewer} | {_kib(s.file_bytes)} | {_pct(s.test_mean)} ± {_pct(s.test_std)} | {delta} | "
                     f"{_pct(s.train_mean)} | {_pct(s.gap_mean)} ± {_pct(s.gap_std)} | {s.seconds:.0f} s |")
    return "\n".join(lines)


def paper_table() -> str:
    lines = ["| source | data | architecture | sharing | Δ test acc (points) | fewer params |",
             "| --- | --- | --- | --- | ---: | ---: |"]
    for data, arch, policy, delta, ratio in PAPER_ROWS:
        lines.append(f"| the paper (reported) | {data} | {arch} | {policy} | {delta:+.1f} | {ratio:.1f}x |")
    return "\n".join(lines)


def _best_delta(r: RunRecord) -> float:
    assert r.baseline_acc is not None
    return max(row["test_acc"] for row in r.history) - r.baseline_acc


def retrofit_table(records: list[RunRecord]) -> str:
    groups: dict[tuple[str, str, str | None, bool | None], list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.setting == "retrofit":
            groups[(r.arch, r.policy, r.init, r.distill)].append(r)
    lines = ["| architecture | sharing | init | loss | seeds | stored params | acc right after tying % | "
             "after fine-tune % | Δ vs its baseline | epochs to within 1 point |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    outcome: dict[tuple[object, ...], str | None] = {}  # identical results: the same model (e.g. medoid of 2)
    for (arch, policy, init, distill), rs in groups.items():
        same = outcome.setdefault((arch, policy, distill, tuple((r.acc_before, r.test_acc) for r in rs)), init)
        if same != init:
            init = f"{init} (= {same}: same model)"
        before = statistics.mean(r.acc_before or 0.0 for r in rs)
        after = statistics.mean(r.test_acc for r in rs)
        delta = statistics.mean(r.test_acc - (r.baseline_acc or 0.0) for r in rs)
        reached = [r.epochs_to_1pt for r in rs]
        if all(e is not None for e in reached):
            within = ", ".join(str(e) for e in reached) + f" of {rs[0].epochs}"
        else:
            best = statistics.mean(_best_delta(r) for r in rs)
            within = f"not in {rs[0].epochs} (best {100 * best:+.2f})"
        lines.append(f"| {arch} | {policy} | {init} | {'CE + KD' if distill else 'CE'} | {len(rs)} | "
                     f"{rs[0].params:,} | {_pct(before)} | {_pct(after)} | {100 * delta:+.2f} | {within} |")
    return "\n".join(lines)


def findings(summaries: list[Summary], records: list[RunRecord]) -> list[str]:
    """Sentences computed from the records (no numbers typed by hand)."""
    out = []
    base = {s.arch: s for s in summaries if s.policy == "none"}
    for s in summaries:
        b = base.get(s.arch)
        if b is None or s.policy == "none":
            continue
        out.append(f"{s.arch}, `{s.policy}` from scratch: {b.params / s.params:.1f}x fewer stored parameters, "
                   f"{100 * (s.test_mean - b.test_mean):+.2f} points of test accuracy, train−test gap "
                   f"{_pct(s.gap_mean)} vs {_pct(b.gap_mean)} unshared.")
    retro = [r for r in records if r.setting == "retrofit"]
    if retro:
        best = max(retro, key=lambda r: r.test_acc)
        out.append(f"Best retrofit: {best.arch} `{best.policy}` init `{best.init}` "
                   f"{'with' if best.distill else 'without'} distillation, {_pct(best.acc_before or 0)}% right "
                   f"after tying → {_pct(best.test_acc)}% after {best.epochs} epochs "
                   f"({100 * (best.test_acc - (best.baseline_acc or 0)):+.2f} vs its baseline).")
    return out


def plot(records: list[RunRecord], folder: str | Path, prefix: str = "paper") -> list[Path]:
    """Three PNGs: accuracy vs stored parameters, train−test gap, retrofit curves."""
    try:
        import matplotlib
    except ImportError:
        raise StudyError("plots need matplotlib: pip install 'kshare[plots]' (or pass --no-docs)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summaries = summarize_scratch(records)
    archs = sorted({s.arch for s in summaries})
    colors = {a: plt.get_cmap("tab10")(i) for i, a in enumerate(archs)}
    markers = {"none": "o", "all": "s", "stage": "^", "chunk:2": "D"}
    paths = []

    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4.2), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        for s in (s for s in summaries if s.arch == arch):
            ax.errorbar(s.params, 100 * s.test_mean, yerr=100 * s.test_std, fmt=markers.get(s.policy, "D"),
                        color=colors[s.arch], capsize=3, ms=8,
                        label=f"{s.policy if s.policy != 'none' else 'unshared'}, scratch (mean ± sd)")
        retro = [r for r in records if r.setting == "retrofit" and r.arch == arch]
        for r in retro:
            ax.scatter(r.params, 100 * r.test_acc, marker=markers.get(r.policy, "D"), facecolors="none",
                       edgecolors="grey" if not r.distill else "k", alpha=0.7, s=40)
        if retro:
            ax.scatter([], [], marker="o", facecolors="none", edgecolors="grey", label="retrofit, CE (hollow)")
            ax.scatter([], [], marker="o", facecolors="none", edgecolors="k", label="retrofit, CE + KD (hollow)")
        ax.set_xscale("log")
        ax.set_xlabel("stored parameters (log scale)")
        ax.set_ylabel("test accuracy %")
        ax.set_title(arch)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Test accuracy vs stored parameters")
    paths.append(_save(fig, folder / f"{prefix}_accuracy_vs_params.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    policies = ["none", *dict.fromkeys(s.policy for s in summaries if s.policy != "none")]
    width = 0.8 / max(1, len(policies))
    for j, policy in enumerate(policies):
        rows = [next((s for s in summaries if s.arch == a and s.policy == policy), None) for a in archs]
        xs = [i + j * width for i in range(len(archs))]
        gaps = [100 * r.gap_mean if r else 0.0 for r in rows]
        spreads = [100 * r.gap_std if r else 0.0 for r in rows]
        ax.bar(xs, gaps, width, yerr=spreads, capsize=3, label=policy if policy != "none" else "unshared")
    ax.set_xticks([i + width for i in range(len(archs))], archs)
    ax.set_ylabel("train − test accuracy (points)")
    ax.set_title("Overfitting: train−test gap, trained from scratch")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, folder / f"{prefix}_train_test_gap.png"))

    retro = [r for r in records if r.setting == "retrofit"]
    if retro:
        fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4), squeeze=False)
        for ax, arch in zip(axes[0], archs, strict=True):
            rs = [r for r in retro if r.arch == arch and r.seed == min(x.seed for x in retro)]
            for r in rs:
                xs = [0] + [row["epoch"] for row in r.history]
                ys = [100 * (r.acc_before or 0)] + [100 * row["test_acc"] for row in r.history]
                ax.plot(xs, ys, marker=markers.get(r.policy, "D"), ls="-" if r.distill else "--", ms=4,
                        label=f"{r.policy} {r.init} {'KD' if r.distill else 'CE'}")
            if rs and rs[0].baseline_acc is not None:
                ax.axhline(100 * rs[0].baseline_acc, color="k", lw=1, label="unshared baseline")
                ax.axhline(100 * rs[0].baseline_acc - 1, color="k", lw=0.8, ls=":", label="baseline − 1 point")
            ax.set_title(f"{arch}: retrofit fine-tuning (seed {rs[0].seed if rs else '?'})")
            ax.set_xlabel("fine-tune epoch (0: right after tying)")
            ax.set_ylabel("test accuracy %")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
        paths.append(_save(fig, folder / f"{prefix}_retrofit_curves.png"))
    return paths


def _same_plan_lines(same: dict[str, dict[str, str]]) -> list[str]:
    """Policies not trained because they tie exactly what another policy ties."""
    lines = [f"- {arch}: `{p}` ties the same groups as `{q}`" + (" (nothing)" if q == "none" else "")
             for arch, m in same.items() for p, q in m.items()]
    return ["Not run separately (same plan, same model):", "", *lines, ""] if lines else []


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _own_size_lines(machine: dict[str, Any]) -> list[str]:
    """Where this page was made without a GPU, say that the paper's own size is still to run."""
    if machine.get("device", "cpu") != "cpu":
        return []
    return ["This page was made on a CPU. The paper's own model at its own size (ConvMixer-256/8, kernel 9, "
            "patch 1, on all of Fashion-MNIST: unshared vs `all` vs `stage`) needs a GPU: "
            "`python examples/reproduce_paper.py --preset gpu`, not run yet because no GPU was lent to this work.",
            ""]


def markdown(header: dict[str, Any], records: list[RunRecord], study: Study, command: str,
             images: list[Path], relative_to: Path) -> str:
    """The results page."""
    summaries = summarize_scratch(records)
    m = header.get("machine", {})
    lines = [
        "# Results: kernel sharing on real data",
        "",
        "Generated by the command below from its own JSON; no number on this page was typed by hand",
        "except the paper's, which are labelled as such.",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Data: `{study.data}` ({'all' if study.train_limit is None else f'first {study.train_limit:,}'} "
        f"training images, {'all' if study.test_limit is None else f'first {study.test_limit:,}'} test images). "
        f"Machine: {m.get('device', '?')}, {m.get('cpus', '?')} CPUs, {m.get('threads', '?')} threads, "
        f"torch {m.get('torch', '?')}. Training time of all {len(records)} runs: "
        f"{sum(r.seconds for r in records) / 60:.1f} min (evaluation and plots aside).",
        "",
        *[f"- {a.label}: `{a.ref}`{''.join(f' {k}={v}' for k, v in a.kwargs.items())}, {a.epochs} epochs at "
          f"lr {a.lr:g}, batch {a.batch_size}"
          + (f", images resized to {a.image_size}×{a.image_size}" if a.image_size else "") + "."
          for a in study.archs],
        "",
        "## 1. The paper's setting: trained from scratch, unshared vs shared",
        "",
        "Same architecture, same budget (epochs, learning rate, batch size), seeds "
        f"{', '.join(map(str, study.seeds))}. `all` shares every isomorphic layer (the paper's extreme), "
        "`stage` only within a resolution stage. Train accuracy is measured in eval mode on "
        f"{study.train_eval_limit:,} training images after the last epoch.",
        "",
        scratch_table(summaries),
        "",
        *_same_plan_lines(header.get("notes", {}).get("same_plan", {})),
        "The paper's own figures (CIFAR, ConvMixer-256/16, 200 epochs on a GPU), for comparison:",
        "",
        paper_table(),
        "",
        *_own_size_lines(m),
        "## 2. Retrofit: tie a trained network, then fine-tune",
        "",
        "The paper trained shared networks from scratch only. Here the unshared network of section 1 "
        f"(seed {', '.join(map(str, study.retrofit_seeds))}) is tied with each policy and init strategy and "
        f"fine-tuned for {study.retrofit_fraction:.0%} of its training epochs at {study.retrofit_lr_scale:g}x its "
        "learning rate, with cross-entropy alone or with distillation from the untied original (`--distill`). "
        "The fine-tune epochs come on top of the baseline's, so a retrofit row can beat its baseline simply "
        "by training longer; the curves below show where each run starts (right after tying) and how fast it "
        "recovers.",
        "",
        retrofit_table(records),
        "",
        "## Findings (computed)",
        "",
        *[f"- {f}" for f in findings(summaries, records)],
        "",
        "## Plots",
        "",
    ]
    for img in images:
        rel = img.relative_to(relative_to) if img.is_relative_to(relative_to) else img
        lines += [f"![{img.stem}]({rel.as_posix()})", ""]
    return "\n".join(lines)


def results_page(header: dict[str, Any], records: list[RunRecord], study: Study, command: str, images: list[Path],
                 docs: Path, sweeps: Sequence[Path] = (), sweep_script: Path | None = None,
                 retrofit: Sequence[Path] = ()) -> str:
    """The whole `docs/results.md`: the study's sections, published sweeps as section 3, and the
    data-aware retrofit study as section 4."""
    page = markdown(header, records, study, command, images, docs)
    if sweeps:
        page = _sweep_section(page, docs, sweeps, sweep_script)
    if retrofit:
        from retrofit_pages import retrofit_section
        from retrofit_study import command_for
        from retrofit_study import read_study as read_retrofit

        studies = [read_retrofit(path) for path in retrofit]
        page += "\n" + retrofit_section(studies, "python examples/retrofit_study.py --only BASELINE --out JSON",
                                        [command_for(path, header["study"]) for path, (header, _) in
                                         zip(retrofit, studies, strict=True)])
    return page


def _sweep_section(page: str, docs: Path, sweeps: Sequence[Path], sweep_script: Path | None) -> str:
    page += "\n## 3. Beyond the paper: budget plans, relaxations, distillation\n\n"
    if sweep_script:
        page += f"Made end to end (baseline, sweeps, this section) by `bash {sweep_script}`.\n\n"
    payloads = {sweep: read_sweep(sweep) for sweep in sweeps}
    if len(sweeps) > 1:
        page += ("Each subsection is one `kshare sweep`; they differ in how long the baseline was trained, how "
                 "long each point is fine-tuned and whether BatchNorm statistics are re-estimated after tying. "
                 "In brief:\n\n" + sweeps_summary({p.name: d for p, d in payloads.items()}) + "\n\n")
    for number, sweep in enumerate(sweeps, 1):
        picture = sweep.with_suffix(".png")
        rel = os.path.relpath(picture, docs) if picture.is_file() else None
        if len(sweeps) > 1:
            page += f"### 3.{number}. `{sweep.name}`\n\n"
        page += sweep_markdown(payloads[sweep], rel) + "\n"
    return page
