"""Plots drawn with matplotlib: the Pareto plot of a sweep (test accuracy vs stored bytes) for
`kshare sweep`, and the trials of a fidelity search for `kshare retrofit --target`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kshare.errors import StudyError
from kshare.sweep import SweepRow, aggregate, pareto

LOSS_STYLES = {None: ("grey", "o", "tied, no fine-tune"), "ce": ("tab:blue", "o", "fine-tuned, CE"),
               "kd": ("tab:red", "s", "fine-tuned, CE + KD")}


def _pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only; a clear error where it is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise StudyError("the plot needs matplotlib: pip install 'kshare[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(rows: list[SweepRow], path: str | Path, title: str) -> Path:
    """Two panels: accuracy vs stored bytes with the Pareto front (each point named once, at its
    best loss), and every point's accuracy as a bar, ordered by size, so crowded sizes stay readable.
    Means over seeds; error bars: one standard deviation."""
    rows = aggregate(rows)
    plt = _pyplot()

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


def plot_search(record: dict[str, Any], path: str | Path, title: str) -> Path:
    """A fidelity search (`SearchReport.record()`): each trial's stored parameters against the
    figure the target is on, numbered in the order run, the target as a line, the plan kept
    ringed, and the untied model for scale."""
    plt = _pyplot()

    metric, _, value = str(record["target"]).partition("=")
    key = "top1" if metric == "agree" else "kl"
    trials = record["trials"]
    xs = [t["params"] / 1e6 for t in trials]
    ys = [t["fidelity"][key] for t in trials]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, ys, color="lightgrey", lw=0.8, zorder=1)
    ax.scatter(xs, ys, c=["tab:green" if t["met"] else "tab:red" for t in trials], s=30, zorder=2,
               label="trial (green: meets the target)")
    for t, x, y in zip(trials, xs, ys, strict=True):
        ax.annotate(str(t["index"]), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        if t.get("estimate") is not None:
            ax.plot([x, x], [t["estimate"], y], ":", color="tab:blue", lw=0.8, zorder=1)
    if any(t.get("estimate") is not None for t in trials):
        ax.plot([], [], ":", color="tab:blue", label="estimate that chose the trial → measured")
    chosen = trials[record["chosen"]]
    ax.scatter([chosen["params"] / 1e6], [chosen["fidelity"][key]], s=160, facecolors="none", edgecolors="k",
               zorder=3, label="kept" + ("" if record["reached"] else " (closest; target not reached)"))
    ax.axhline(float(value), color="k", ls="--", lw=0.8, label=f"target {record['target']}")
    untied = record["params_before"] / 1e6
    ax.scatter([untied], [1.0 if key == "top1" else 0.0], marker="*", s=140, c="k", zorder=3,
               label=f"untied original ({untied:.2f}M)")
    ax.set_xlabel("stored parameters (millions)")
    ax.set_ylabel("held-out top-1 agreement with the untied model" if key == "top1"
                  else "held-out KL to the untied model")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
