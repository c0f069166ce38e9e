"""The Pareto plot of a sweep (test accuracy vs stored bytes), drawn with matplotlib for
`kshare sweep`."""

from __future__ import annotations

from pathlib import Path

from kshare.errors import StudyError
from kshare.sweep import SweepRow, aggregate, pareto

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
