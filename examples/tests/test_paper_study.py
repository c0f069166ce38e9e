"""The paper-reproduction script, in its smoke preset: JSON, markdown and plots are produced and sane."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

import paper_study
import pytest

from kshare.data import FASHION_MNIST_ROOT

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir() and not os.environ.get("KSHARE_REQUIRE_DATA"),
                                reason="apt-get install dataset-fashion-mnist (CI sets KSHARE_REQUIRE_DATA)")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reproduce_paper", ROOT / "examples" / "reproduce_paper.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, ModuleType]:
    tmp = tmp_path_factory.mktemp("smoke")
    module = script()
    out, docs = tmp / "study.json", tmp / "docs"
    assert module.main(["--preset", "smoke", "--out", str(out), "--docs", str(docs)]) == 0
    return out, docs, module


def test_json_holds_every_run_well_formed(smoke: tuple[Path, Path, ModuleType]) -> None:
    out, _, module = smoke
    data = json.loads(out.read_text())
    assert data["format"] == "kshare.study/1" and data["machine"]["torch"]
    study = module.PRESETS["smoke"]
    runs = {r["key"]: r for r in data["runs"]}
    same = data["notes"]["same_plan"]
    for arch in study.archs:
        trained = [p for p in study.policies if p not in same[arch.label]]
        scratch = [r for r in runs.values() if r["setting"] == "scratch" and r["arch"] == arch.label]
        retro = [r for r in runs.values() if r["setting"] == "retrofit" and r["arch"] == arch.label]
        assert sorted(r["policy"] for r in scratch) == sorted(["none", *trained]) * len(study.seeds)
        assert len(retro) == len(trained) * len(study.inits) * 2 * len(study.retrofit_seeds)
        base = next(r for r in scratch if r["policy"] == "none")
        for r in scratch + retro:
            assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["train_acc"] <= 1.0 and r["seconds"] > 0
            assert len(r["history"]) == r["epochs"] and r["history"][-1]["test_acc"] == r["test_acc"]
            if r["policy"] != "none":
                assert r["params"] < base["params"] and r["file_bytes"] < base["file_bytes"]
        for r in retro:
            assert r["baseline_acc"] == base["test_acc"] and r["acc_before"] is not None
    # ConvMixer has one resolution: `stage` ties what `all` ties and is not trained twice
    assert same["ConvMixer-32/2"]["stage"] == "all"


def test_markdown_and_plots(smoke: tuple[Path, Path, ModuleType]) -> None:
    out, docs, _ = smoke
    page = (docs / "results_smoke.md").read_text()
    assert "python examples/reproduce_paper.py --preset smoke" in page
    assert "| the paper (reported) | CIFAR-10 | ConvMixer-256/16 | all | -1.8 | 13.4x |" in page
    runs = json.loads(out.read_text())["runs"]
    unshared = next(r for r in runs if r["setting"] == "scratch" and r["policy"] == "none")
    assert f"| {unshared['arch']} | unshared | 1 | {unshared['params']:,} | 1.0x |" in page
    table_rows = [line for line in page.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table_rows) >= len(runs) // 2
    images = sorted((docs / "img").glob("smoke_*.png"))
    assert [p.name for p in images] == ["smoke_accuracy_vs_params.png", "smoke_retrofit_curves.png",
                                        "smoke_train_test_gap.png"]
    import matplotlib.image

    for png in images:
        assert png.read_bytes()[:8] == PNG_MAGIC and f"(img/{png.name})" in page
        pixels = matplotlib.image.imread(png)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400 and pixels.std() > 0.01


def test_rerun_skips_finished_runs_and_refuses_other_settings(smoke: tuple[Path, Path, ModuleType],
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out, docs, module = smoke
    before = out.read_text()

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(paper_study, "finetune", no_training)
    assert module.main(["--preset", "smoke", "--out", str(out), "--docs", str(docs)]) == 0
    assert json.loads(out.read_text())["runs"] == json.loads(before)["runs"]
    assert module.main(["--preset", "smoke", "--seeds", "5", "--out", str(out), "--no-docs"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert module.main(["--preset", "smoke", "--seeds", "x", "--out", str(out)]) == 2
