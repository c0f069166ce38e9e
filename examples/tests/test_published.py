"""The published results page is what its command renders from the committed JSON: no hand edits."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

from paper_study import _jsonable, read_study
from results_page import results_page, retrofit_table

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "results.md"


def test_results_page_is_rendered_from_the_committed_study_and_sweep(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # the page's paths are relative to the project root, as its command ran
    spec = importlib.util.spec_from_file_location("reproduce_paper", ROOT / "examples" / "reproduce_paper.py")
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    published = PAGE.read_text()
    command = re.search(r"```bash\n(python examples/reproduce_paper\.py[^\n]*)\n```", published)
    assert command, "the page names the command that made it"
    args = script.build_parser().parse_args(shlex.split(command[1])[2:])
    header, records = read_study(args.out)
    study = script.PRESETS[args.preset]
    assert header["study"] == _jsonable(study)  # the JSON was made with the preset the command names
    images = sorted((args.docs / "img").glob(f"{args.preset}_*.png"))
    assert len(images) == 3
    order = [m[1] for m in re.finditer(r"!\[(\w+)\]\(img/", published)]
    images = sorted(images, key=lambda p: order.index(p.stem))
    rendered = results_page(header, records, study, command[1], images, args.docs, args.sweep, args.sweep_script,
                            args.retrofit)
    assert rendered == published


def test_retrofit_rows_that_are_the_same_model_say_so() -> None:
    _, records = read_study(ROOT / "results" / "paper_study.json")
    rows = [line.split(" | ") for line in retrofit_table(records).splitlines()[2:]]
    marked = [(r[1], r[2]) for r in rows if "same model" in r[2]]
    assert marked and all(policy == "chunk:2" and init.startswith("medoid (= first") for policy, init in marked)
    # the marked rows really repeat their twin's figures, and no other row repeats another's
    figures = {}
    for r in rows:
        figures.setdefault((r[0], r[1], r[3], tuple(r[6:8])), []).append(r[2])
    assert all(len(inits) == 1 or any("same model" in i for i in inits[1:]) for inits in figures.values())



def test_readme_claim_lora_auto_beats_stage_at_its_size_on_both_trained_baselines() -> None:
    """The README's issue-6 claim, checked against the published sweeps it cites."""
    from sweep_pages import matched_comparisons

    from kshare.sweep import read_sweep

    for name in ("sweep_densenet_trained.json", "sweep_densenet_trained_seed1.json"):
        payload = read_sweep(ROOT / "docs" / "results" / name)
        tolerance = payload["config"]["size_tolerance"]
        assert payload.get("matched_bytes") and tolerance <= 0.005, name
        (auto,) = [c for c in matched_comparisons(payload)
                   if c.target == "stage" and c.loss == "kd" and c.mine.label == "budget≈stage+lora:auto"]
        assert auto.mine.params <= auto.plain.params * (1 + tolerance), name
        assert auto.mine.stored_bytes <= auto.plain.stored_bytes * (1 + tolerance), name
        assert auto.seeds == 3 and auto.every_seed and auto.delta > 0, name
