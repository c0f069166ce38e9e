"""Sweep pages from sweep JSON: per-point means, size-matched comparisons seed by seed, verdicts."""

from __future__ import annotations

import dataclasses

import pytest
from sweep_pages import matched_comparisons, sweep_markdown, sweeps_summary

from kshare.sweep import SweepRow, aggregate


def _payload(mine: list[float], theirs: list[float], baseline: dict | None = None) -> dict:
    rows = [SweepRow(label, "", "", "kd", params, 1, 0.1, acc, 0, seed=seed)
            for label, params, accs in (("stage", 100, theirs), ("budget≈stage+lora:1", 99, mine),
                                        ("budget≈stage", 100, [a + 0.5 for a in theirs]))
            for seed, acc in enumerate(accs)]
    return {"rows": [dataclasses.asdict(r) for r in rows], "train_images": 256, "baseline": baseline,
            "config": {"match": ["stage"], "losses": ["kd"], "epochs": 1, "batch_size": 128}}


def test_sweeps_summary_counts_wins_seed_by_seed_across_sweeps() -> None:
    record = {"epoch": 2, "train_images": 1024, "config": {"batch_size": 128, "seed": 3}, "metrics": {"test_acc": 0.9}}
    every = _payload([0.82, 0.81, 0.83], [0.80, 0.80, 0.80], record)
    mostly = _payload([0.90, 0.70, 0.81], [0.80, 0.80, 0.80])  # higher mean (+0.33), but not in every seed
    relaxed = [c for c in matched_comparisons(mostly) if c.relaxed]
    assert [(c.mine.label, c.wins, c.seeds, c.every_seed) for c in relaxed] == [("budget≈stage+lora:1", 2, 3, False)]
    assert relaxed[0].delta == pytest.approx(100 * (0.80333333 - 0.80), abs=1e-4)
    table = sweeps_summary({"a.json": every, "b.json": mostly})
    assert "| `a.json` | 3 | 90.00 | 2 / 16 | vs `stage`: +lora:1 +2.00 | 1 of 1 |" in table
    assert "| `b.json` | – | – | – | vs `stage`: +lora:1 +0.33 | 0 of 1 |" in table
    assert table.endswith("Higher in every seed in 1 of 2 size-matched comparisons across 2 sweeps.")


def test_sweep_markdown_shows_means_spreads_and_seed_by_seed_wins() -> None:
    mine, theirs = [0.84, 0.79, 0.83], [0.80, 0.81, 0.80]
    payload = _payload(mine, theirs) | {
        "data": "digits", "model": {"name": "kshare:convmixer_32_4", "kwargs": {"in_chans": 1}},
        "command": "kshare sweep base.pt --data digits"}
    payload["config"] |= {"init": "mean", "lr": 1e-3, "seeds": [0, 1, 2], "size_tolerance": 0.005}
    page = sweep_markdown(payload, "img/s.png")
    rows = {r.label: r for r in aggregate([SweepRow(**r) for r in payload["rows"]])}
    matched, plain = rows["budget≈stage+lora:1"], rows["stage"]
    wins = sum(a > b for a, b in zip(mine, theirs, strict=True))
    assert "Model: `kshare:convmixer_32_4 in_chans=1`" in page and "kshare sweep base.pt --data digits" in page
    assert f"| budget≈stage+lora:1 vs stage | kd | {matched.params:,} vs {plain.params:,} " in page
    assert f"{100 * matched.acc:.2f} ± {100 * matched.acc_sd:.2f} vs {100 * plain.acc:.2f}" in page
    assert f"| {wins} of 3 |" in page and "![sweep](img/s.png)" in page
    delta = 100 * (matched.acc - plain.acc)
    assert (f"higher in every seed in 0 of 1 comparisons (Δ of the means from {delta:+.2f} to {delta:+.2f} "
            "points)") in page
