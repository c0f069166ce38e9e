"""The retrofit study in its smoke preset: every record made, the section rendered from them."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import pytest
import retrofit_study
from retrofit_pages import retrofit_section


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("retrofit")
    out = tmp / "study.json"
    assert retrofit_study.main(["--preset", "smoke", "--out", str(out), "--work", str(tmp / "work")]) == 0
    return out


def test_every_point_is_recorded(smoke: Path) -> None:
    header, records = retrofit_study.read_study(smoke)
    study = retrofit_study.PRESETS["smoke"]
    keys = {r.key for r in records}
    for base in study.baselines:
        assert f"{base.label}|untied" in keys
        same = header["notes"][base.label]["same_plan"]
        for policy in study.policies:
            if policy in same:  # a plan equal to an earlier policy's is recorded once, under that one
                assert same[policy] in study.policies and not any(r.policy == policy for r in records)
                continue
            for init in retrofit_study.inits_for(study, policy):
                for seed in study.seeds:
                    prefix = f"{base.label}|{policy}|{init}|{seed}"
                    assert {f"{prefix}|tied", f"{prefix}|recalibrated"} <= keys, prefix
                    fitted = next(r for r in records if r.key == f"{prefix}|tied")
                    assert (fitted.output_error is not None) == (init in ("oneshot", "sequential", "reconstructed"))
                    if init == "reconstructed":  # BatchNorm was re-estimated before the steps: no second pass
                        assert next(r for r in records if r.key == f"{prefix}|recalibrated").acc == fitted.acc
    untied = next(r for r in records if r.policy == "untied")
    assert all(r.params < untied.params for r in records if r.policy != "untied")
    assert header["notes"][study.baselines[0].label]["steps"] > 0


def test_rerun_skips_finished_points(smoke: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = smoke.read_text()

    def no_fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished point was fitted again")

    monkeypatch.setattr(retrofit_study, "_retrofit", no_fit)
    assert retrofit_study.main(["--preset", "smoke", "--out", str(smoke), "--work", str(smoke.parent / "work")]) == 0
    assert smoke.read_text().split('"records"')[1] == before.split('"records"')[1]


def test_section_is_computed_from_the_records(smoke: Path) -> None:
    header, records = retrofit_study.read_study(smoke)
    page = retrofit_section([(header, records)], "python examples/retrofit_study.py")
    label = retrofit_study.PRESETS["smoke"].baselines[0].label
    recal = [r.acc for r in records if r.baseline == label and r.policy == "all" and r.init == "sequential"
             and r.stage == "recalibrated"]
    cell = f"{100 * statistics.fmean(recal):.2f} ± {100 * statistics.stdev(recal):.2f}"
    params = next(r.params for r in records if r.policy == "all")
    assert f"| all | {params:,} | data, sequential |" in page and cell in page
    assert "## 4. Retrofit without retraining" in page and f"### {label}" in page


def test_section_refuses_files_of_different_settings(smoke: Path) -> None:
    header, records = retrofit_study.read_study(smoke)
    other = {**header, "study": {**header["study"], "seeds": [5]}}
    with pytest.raises(ValueError, match="seeds"):
        retrofit_section([(header, records), (other, records)], "cmd")
    page = retrofit_section([(header, records)], "cmd")
    assert f"{header['machine']['threads']} thread(s)" in page.split("### ")[1]  # the machine under its baseline


def test_a_policy_with_the_same_plan_is_fitted_once() -> None:
    import kshare

    model = kshare.load_model("resnet18", {"num_classes": 10})[0]
    found = {p: kshare.plan(model, p, input_size=(3, 32, 32)) for p in ("stage", "all", "chunk:2")}
    # resnet18 has no two 3x3 convs of equal shape in different stages: `all` ties what `stage` ties
    assert retrofit_study.same_plans(found) == {"all": "stage"}
    # a lora:auto plan that gave no member a rank is the plain plan; one with deltas is not
    stage = found["stage"]
    bare = dataclasses.replace(stage, relax="lora:auto", groups=tuple(
        dataclasses.replace(g, ranks=(0,) * len(g.members)) for g in stage.groups))
    ranked = dataclasses.replace(bare, relax_params=64, groups=(
        dataclasses.replace(bare.groups[0], ranks=(1,) * len(bare.groups[0].members)), *bare.groups[1:]))
    assert retrofit_study.same_plans({"stage": stage, "bare": bare, "ranked": ranked}) == {"bare": "stage"}


def test_an_interrupted_fine_tune_is_run_on_rerun(smoke: Path, tmp_path: Path) -> None:
    import json

    data = json.loads(smoke.read_text())
    gone = next(r for r in data["records"] if r["stage"] == "finetuned")
    kept = [r for r in data["records"] if r is not gone]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({**data, "records": kept}))
    assert retrofit_study.main(["--preset", "smoke", "--out", str(partial), "--work", str(smoke.parent / "work")]) == 0
    _, records = retrofit_study.read_study(partial)
    by_key = {r.key: r for r in records}
    assert gone["key"] in by_key and by_key[gone["key"]].steps == gone["steps"]
    assert all(by_key[r["key"]].acc == r["acc"] for r in kept)  # the finished records stay as they were


def test_a_study_resumed_elsewhere_names_both_machines() -> None:
    merged = retrofit_study.merge_machines({"device": "cpu", "threads": 1}, {"device": "cpu", "threads": 2})
    assert merged == {"device": "cpu", "threads": [1, 2]}
    assert retrofit_study.merge_machines(merged, {"device": "cpu", "threads": 2}) == merged


def test_fine_tunes_run_after_every_fit_in_the_order_of_finetune_inits(smoke: Path) -> None:
    _, records = retrofit_study.read_study(smoke)  # records keep the order they were made in
    stages = [r.stage for r in records if r.policy != "untied"]
    first_tune = stages.index("finetuned")
    assert "finetuned" not in stages[:first_tune] and set(stages[first_tune:]) == {"finetuned"}
    order = retrofit_study.PRESETS["smoke"].finetune_inits
    ranks = [(order.index(r.init), r.seed) for r in records if r.stage == "finetuned"]
    assert ranks == sorted(ranks) and len({init for init, _ in ranks}) == len(order)  # one seed of every point first


def test_a_budget_in_percent_stores_at_most_that_share_of_the_untied_parameters() -> None:
    import kshare

    model = kshare.load_model("resnet18", {"num_classes": 10})[0]
    total = sum(p.numel() for p in model.parameters())
    study = retrofit_study.Study(baselines=(), policies=("budget≈50%", "budget≈60%", "budget≈70%+lora:auto"))
    found = retrofit_study.plans(model, study, (3, 32, 32), kshare.load_data("digits", "train"), 32)
    sizes = {name: plan.totals.params_after for name, plan in found.items()}  # deltas counted
    for name, share in (("budget≈50%", 0.5), ("budget≈60%", 0.6), ("budget≈70%+lora:auto", 0.7)):
        assert sizes[name] <= share * total, name
    assert sizes["budget≈50%"] < sizes["budget≈60%"] < sizes["budget≈70%+lora:auto"]
    assert found["budget≈70%+lora:auto"].relax_params > 0


def test_a_file_made_before_a_setting_existed_resumes(smoke: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    data = json.loads(smoke.read_text())
    del data["study"]["finetune_warmup"]  # files written before the field existed were made at its default
    older = tmp_path / "older.json"
    older.write_text(json.dumps(data))
    monkeypatch.setattr(retrofit_study, "_retrofit", lambda *a, **k: pytest.fail("a finished point was refitted"))
    assert retrofit_study.main(["--preset", "smoke", "--out", str(older), "--work", str(smoke.parent / "work")]) == 0
    data["study"]["finetune_lr"] = 1.0  # a setting that differs is still refused
    older.write_text(json.dumps(data))
    assert retrofit_study.main(["--preset", "smoke", "--out", str(older), "--work", str(smoke.parent / "work")]) == 2


def test_the_section_names_the_fine_tune_warmup(smoke: Path) -> None:
    header, records = retrofit_study.read_study(smoke)
    assert "warmed up" not in retrofit_section([(header, records)], "cmd")
    warm = {**header, "study": {**header["study"], "finetune_warmup": 0.25}}
    assert "warmed up linearly over the first 25% of the steps" in retrofit_section([(warm, records)], "cmd")


def test_each_file_names_the_command_that_made_it(smoke: Path) -> None:
    import json

    header, _ = retrofit_study.read_study(smoke)
    label = retrofit_study.PRESETS["smoke"].baselines[0].label
    assert retrofit_study.command_for(smoke, header["study"]) == (
        f'python examples/retrofit_study.py --preset smoke --only "{label}" --out {smoke}')
    odd = json.loads(json.dumps(header["study"]))
    odd["seeds"] = [7]
    with pytest.raises(retrofit_study.StudyError, match="no preset"):
        retrofit_study.command_for(smoke, odd)


def test_a_fine_tune_cell_with_fewer_seeds_says_how_many(smoke: Path) -> None:
    header, records = retrofit_study.read_study(smoke)
    tuned = [r for r in records if r.stage == "finetuned"]
    assert "(n=" not in retrofit_section([(header, records)], "cmd")
    dropped = next(r for r in tuned if r.seed == 0)
    page = retrofit_section([(header, [r for r in records if r is not dropped])], "cmd")
    assert page.count(f"(n={len(header['study']['seeds']) - 1})") == 1


def test_the_section_names_feature_matching(smoke: Path) -> None:
    header, records = retrofit_study.read_study(smoke)
    assert "feature matching" not in retrofit_section([(header, records)], "cmd")
    matched = {**header, "study": {**header["study"], "finetune_feature_weight": 10.0}}
    page = retrofit_section([(header, records), (matched, records)], "cmd")  # other fine-tunes: one page
    assert page.count("feature matching at weight 10") == 1 and ", fine-tuned with feature matching" in page


def test_a_verdict_without_data_free_rows_reads_whole(smoke: Path) -> None:
    header, records = retrofit_study.read_study(smoke)
    fitted_only = [r for r in records if r.init in ("oneshot", "sequential") or r.policy == "untied"]
    page = retrofit_section([(header, fitted_only)], "cmd")
    assert "with no gradient step: the sequential data fit keeps" in page and ":;" not in page
    rebuilt = [r for r in records if r.init == "reconstructed" or r.policy == "untied"]
    page = retrofit_section([(header, rebuilt)], "cmd")  # reconstruction takes (unlabelled) gradient steps
    assert "before any fine-tune (block reconstruction takes gradient steps, on unlabelled images): the " \
           "sequential + block reconstruction data fit keeps" in page and "with no gradient step" not in page


def test_the_most_sharing_within_half_a_point_is_named() -> None:
    from collections import defaultdict

    from retrofit_pages import _most_sharing

    def rec(policy: str, params: int, acc: float, steps: int) -> retrofit_study.Record:
        stage = "finetuned" if steps else "tied"
        return retrofit_study.Record(f"{policy}|{steps}", "B", policy, "sequential", 0, stage, acc, params, steps)

    records = [rec("untied", 1000, 0.90, 0), rec("small", 300, 0.85, 5), rec("middle", 500, 0.897, 5),
               rec("large", 800, 0.899, 5), rec("small", 300, 0.95, 50)]  # 50 steps: beyond 5% of 100
    by: dict[tuple[str, str, str, str], list[retrofit_study.Record]] = defaultdict(list)
    for r in records:
        by[(r.baseline, r.policy, r.init, r.stage + (f"|{r.steps}" if r.stage == "finetuned" else ""))].append(r)
    params = {r.policy: r.params for r in records}
    lines = _most_sharing("B", 0.90, by, {"steps": 100}, params)
    assert lines == ["- Most sharing within 0.5 points of untied after at most 5% of the baseline's steps: `middle`, "
                     "2.00x fewer parameters, 89.70% after 5 steps.",
                     "- Most sharing within 1 point of untied after at most 5% of the baseline's steps: `middle`, "
                     "2.00x fewer parameters, 89.70% after 5 steps."]
    far = _most_sharing("B", 0.95, by, {"steps": 100}, params)
    assert far[0].startswith("- No plan here comes within 0.5 or 1 point") and "`large`" in far[0] and len(far) == 1
