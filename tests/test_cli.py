"""The CLI through Typer's runner: reports, JSON, and one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import kshare
from kshare.cli import app
from kshare.planning.plan import SharingPlan

runner = CliRunner()
NET = "from torch import nn\ndef net():\n    return nn.Sequential(nn.Conv2d(3, {a}, 3), nn.Conv2d({a}, {b}, 3))\n"


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_default_model_report() -> None:
    code, out = run("analyze")
    assert code == 0, out
    assert "kshare:convmixer_256_16" in out and "13.13x" in out
    assert "Left unshared" in out and "alone in its signature" in out
    assert "Stage map" in out


def test_json_output_is_a_plan() -> None:
    code, out = run("analyze", "resnet18", "--groups", "stage", "--json")
    assert code == 0, out
    plan = SharingPlan.from_json(out)
    assert plan.policy == "stage" and plan.source == "torchvision:resnet18" and plan.groups


def test_options_reach_the_policy() -> None:
    code, out = run("analyze", "resnet18", "-g", "stage+chunk:2", "--exclude", "layer4.*", "--match", "shape",
                    "--min-size", "2", "--input-size", "3,64,64", "--json")
    assert code == 0, out
    plan = SharingPlan.from_json(out)
    assert plan.policy == "stage+chunk:2" and plan.match == "shape" and plan.input_size == (3, 64, 64)
    assert all(len(g.members) <= 2 for g in plan.groups)
    assert not any(m.startswith("layer4.") for g in plan.groups for m in g.members)


def test_user_model_from_file_via_fallback() -> None:
    conftest = Path(__file__).with_name("conftest.py")
    code, out = run("analyze", f"{conftest}:make_data_dependent", "--input-size", "3,16,16", "-g", "stage")
    assert code == 0, out
    assert "fell back to hooks" in out and "never called" in out


def test_policy_matching_nothing_says_so(tmp_path: Path) -> None:
    src = tmp_path / "net.py"
    src.write_text(NET.format(a=8, b=4))
    code, out = run("analyze", f"{src}:net", "--input-size", "3,16,16")
    assert code == 0 and "forms no sharing group" in out


def test_models_listing() -> None:
    code, out = run("models", "convmixer_256*")
    assert code == 0
    assert "kshare:convmixer_256_16" in out and "kshare:convmixer_256_16_shared" in out


def _weights(tmp_path: Path, out_channels: int) -> str:
    path = tmp_path / f"w{out_channels}.pt"
    net = nn.Sequential(nn.Conv2d(3, out_channels, 3), nn.Conv2d(out_channels, out_channels, 3))
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["analyze", "resnt50"], "unknown model 'resnt50'; did you mean"),
        (["analyze", "resnet18", "--groups", "stag"], "bad policy 'stag'"),
        (["analyze", "resnet18", "--groups", "chunk:1"], "chunk size must be at least 2"),
        (["analyze", "resnet18", "--input-size", "3,abc"], "bad input size"),
        (["analyze", "resnet18", "--input-size", "3,224"], "convolutions are 2-D"),
        (["analyze", "vit_b_16", "--input-size", "3,64,64"], "failed on an example input"),
        (["analyze", "resnet18", "--weights", "/no/such/file.pt"], "file not found"),
        (["analyze", "resnet18", "--exclude", "nothing*"], "matches no convolution"),
        (["analyze", "resnet18", "--kwarg", "pretrained=True"], "never downloads"),
        (["analyze", "resnet18", "--kwarg", "oops"], "expected KEY=VALUE"),
    ],
)
def test_bad_input_is_one_line_exit_2(args: list[str], message: str) -> None:
    code, out = run(*args)
    assert code == 2, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    src = tmp_path / "net.py"
    src.write_text(NET.format(a=8, b=8))
    code, out = run("analyze", f"{src}:net", "--input-size", "3,16,16", "--weights", _weights(tmp_path, 8))
    assert code == 0, out
    code, out = run("analyze", f"{src}:net", "--input-size", "3,16,16", "--weights", _weights(tmp_path, 5))
    assert code == 2 and out.startswith("error: weights") and "do not fit the model" in out
    assert len(out.strip().splitlines()) == 1


def test_bad_match_choice_exits_2() -> None:
    code, out = run("analyze", "resnet18", "--match", "fuzzy")
    assert code == 2 and "--match: 'fuzzy' is not one of strict, shape" in out
    assert len(out.strip().splitlines()) == 1, out


def test_files_the_os_refuses_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()  # the target is a folder: the final rename fails
    code, out = run("apply", "kshare:convmixer_32_2", "--out", str(tmp_path / "taken"))
    assert code == 2 and out.startswith("error: ") and "taken" in out and len(out.strip().splitlines()) == 1, out
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no temporary file left behind


def test_timm_arguments_that_load_files_are_refused(tmp_path: Path) -> None:
    code, out = run("analyze", "timm:resnet18", "-k", f"checkpoint_path={tmp_path / 'w.pth'}")
    assert code == 2 and "checkpoint_path" in out and "--weights" in out, out


def test_apply_info_export_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    code, text = run("apply", "kshare:convmixer_64_4", "-g", "all", "--init", "mean", "--out", str(out))
    assert code == 0, text
    assert "Tied 2 groups" in text and out.is_file()
    code, text = run("info", str(out))
    assert code == 0 and "kshare:convmixer_64_4" in text and "policy all" in text and "mean" in text
    code, text = run("info", str(out), "--json")
    summary = json.loads(text)
    assert summary["aliases"] == 2 * 3 * 2  # weight and bias of 3 extra members, 2 groups
    assert summary["stored_tensor_bytes"] < summary["untied_tensor_bytes"]
    st, onnx = tmp_path / "m.safetensors", tmp_path / "m.onnx"
    code, text = run("export", str(out), "--safetensors", str(st), "--onnx", str(onnx))
    assert code == 0, text
    assert st.is_file() and onnx.is_file()


def test_apply_with_a_plan_file(tmp_path: Path) -> None:
    code, text = run("analyze", "resnet18", "-g", "stage", "--json")
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(text)
    out = tmp_path / "m.pt"
    code, text = run("apply", "resnet18", "--plan", str(plan_path), "--out", str(out))
    assert code == 0, text
    code, text = run("apply", "mobilenet_v2", "--plan", str(plan_path), "--out", str(tmp_path / "x.pt"))
    assert code == 2 and text.startswith("error: plan group") and len(text.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["apply", "resnet18", "--init", "median", "--out", "x.pt"], "median"),
        (["apply", "resnet18", "--plan", "/no/plan.json", "--out", "x.pt"], "plan file not found"),
        (["apply", "resnet18", "--out", "/no/such/dir/x.pt"], "does not exist"),
        (["export", "/no/such.pt", "--onnx", "x.onnx"], "not found"),
    ],
)
def test_apply_and_export_errors(args: list[str], message: str) -> None:
    code, out = run(*args)
    assert code == 2 and message in out, out


def test_export_needs_a_target(tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    assert run("apply", "kshare:convmixer_32_2", "--out", str(out))[0] == 0
    code, text = run("export", str(out))
    assert code == 2 and "nothing to export" in text


def test_untied_baseline_then_tie_its_weights(tmp_path: Path) -> None:
    base = tmp_path / "base.pt"
    result = runner.invoke(app, ["apply", "kshare:convmixer_32_4", "-g", "none", "--out", str(base)])
    assert result.exit_code == 0, result.output
    assert kshare.plan_of(kshare.load(base)) is None
    tied = tmp_path / "tied.pt"
    result = runner.invoke(app, ["apply", "kshare:convmixer_32_4", "-g", "all", "--init", "mean", "--weights",
                                 str(base), "--out", str(tied), "--seed", "7"])
    assert result.exit_code == 0, result.output
    baseline, model = kshare.load(base), kshare.load(tied)
    group = kshare.plan_of(model).groups[0]
    modules, ref = dict(model.named_modules()), dict(baseline.named_modules())
    expected = torch.stack([ref[m].weight.detach() for m in group.members]).mean(0)
    torch.testing.assert_close(modules[group.members[0]].weight.detach(), expected)  # from the file, not seed 7
