"""The GPU path where there is no GPU: the data fit, evaluation, recalibration and `kshare retrofit`
with `--device cuda`, on a stand-in GPU (tests/fakecuda.py) that fails wherever a CPU tensor meets
a GPU tensor, as a real one does. The first run on a real GPU (an H200) crashed in the data fit on
exactly that (a scale of ones made on the CPU); these tests failed on it the same way."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import make_residual_bn_used
from fakecuda import FakeCudaLimit, FakeCudaTensor, fake_cuda
from torch import nn
from typer.testing import CliRunner

import kshare
from kshare import FitConfig, fit_and_tie
from kshare.cli import app
from kshare.models.zoo import load_model

FACTORY = f"{Path(__file__).parent / 'conftest.py'}:make_residual_bn_used"


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_the_stand_in_fails_where_a_gpu_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_cuda(monkeypatch) as gpu:
        x = torch.randn(4, 3).to("cuda")
        assert isinstance(x, FakeCudaTensor) and x.device == torch.device("cuda", 0)
        with pytest.raises(RuntimeError, match="same device"):
            x * torch.ones(3)
        assert (x * torch.tensor(2.0)).device.type == "cuda"  # a CPU scalar may join, as on CUDA
        assert x[torch.tensor([0, 2])].shape == (2, 3) and torch.zeros(2, device="cuda").device.type == "cuda"
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        host = x.cpu()
        assert type(host) is torch.Tensor and torch.equal(host, x.inner) and host.data_ptr() != x.inner.data_ptr()
        a, b = nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3)
        b.weight = a.weight
        net = nn.Sequential(a, b).to("cuda")
        assert a.weight is b.weight and a.weight.device.type == "cuda" and a.weight.requires_grad  # still shared
        with pytest.raises(FakeCudaLimit):  # autograd would abort the process: refused instead
            net(torch.randn(1, 2, 8, 8, device="cuda"))
        with torch.no_grad():
            assert net(torch.randn(1, 2, 8, 8, device="cuda")).device.type == "cuda"
        before = gpu.calls
        torch.ones(3) * torch.ones(3)  # CPU work is not counted
        assert gpu.calls == before > 0


@pytest.mark.parametrize("relax", [None, "scale", "lora:2"])
def test_data_fit_on_the_gpu_matches_the_cpu(trained: nn.Module, digits, relax: str | None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    train, _ = digits
    for mode in ("oneshot", "sequential"):
        cpu, gpu_model = copy.deepcopy(trained), copy.deepcopy(trained)
        plan = kshare.plan(cpu, "all", relax=relax)
        config = FitConfig(mode=mode, images=128, batch_size=64)
        expected = fit_and_tie(cpu, plan, train, config, device="cpu")
        with fake_cuda(monkeypatch) as gpu:
            report = fit_and_tie(gpu_model, plan, train, config, device="cuda")
            assert next(gpu_model.parameters()).device.type == "cuda" and gpu.calls > 100
            gpu_model.cpu()
        assert [g.output_error for g in report.groups] == pytest.approx(
            [g.output_error for g in expected.groups], rel=1e-5), mode
        ours, theirs = gpu_model.state_dict(), cpu.state_dict()
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            assert type(ours[key]) is torch.Tensor
            torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=f"{mode} {key}")


def test_fit_of_biased_and_depthwise_convs_on_the_gpu(digits, monkeypatch: pytest.MonkeyPatch) -> None:
    """ConvMixer: biased convs with no BatchNorm after them (kernel and bias fitted together) and
    depthwise groups."""
    torch.manual_seed(0)
    model = load_model("kshare:convmixer_16_3", {"in_chans": 1, "kernel_size": 3, "patch_size": 1,
                                                  "num_classes": 10})[0].eval()
    plan = kshare.plan(model, "all")
    with fake_cuda(monkeypatch):
        report = fit_and_tie(model, plan, digits[0], FitConfig(images=64, batch_size=32), device="cuda")
    assert len(report.groups) >= 2 and all(g.output_error <= g.mean_output_error + 1e-6 for g in report.groups)


def test_cli_runs_on_the_gpu(trained: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "base.pt"
    kshare.save(trained, base)
    common = [FACTORY, "-k", "in_chans=1", "-k", "width=16", "--weights", base, "-g", "all", "--data", "digits",
              "--calib-images", "128"]
    on_cpu = {}
    for device in ("cpu", "cuda"):
        with fake_cuda(monkeypatch) as gpu:
            code, out = cli("apply", *common, "--fit", "data", "--device", device, "--out", tmp_path / f"{device}.pt")
            assert code == 0 and "fitted 1 of 1 groups" in out, out
            code, out = cli("eval", tmp_path / f"{device}.pt", "--trust-code", "--data", "digits", "--json",
                            "--device", device)
            assert code == 0, out
            acc = json.loads(out.strip().splitlines()[-1])["acc"]  # after the line on how images are fed
            code, out = cli("calibrate", tmp_path / f"{device}.pt", "--trust-code", "--data", "digits",
                            "--device", device, "--out", tmp_path / f"{device}.cal.pt")
            assert code == 0 and "recalibrated" in out, out
            code, out = cli("retrofit", *common, "--device", device, "--json", "--out", tmp_path / f"{device}.r.pt")
            assert code == 0, out
            steps = {s["step"]: s["test_acc"] for s in json.loads(out.strip().splitlines()[-1])["steps"]}
            assert (gpu.calls > 1000) == (device == "cuda")  # the GPU path was taken, and only when asked
        if device == "cpu":
            on_cpu = {"acc": acc, **steps}
        else:
            assert {"acc": acc, **steps} == pytest.approx(on_cpu, abs=2 / 360)  # one image either way
    for name in ("cuda.pt", "cuda.cal.pt", "cuda.r.pt"):  # what a GPU run writes loads on a CPU machine
        assert kshare.load(tmp_path / name, make_residual_bn_used(in_chans=1, width=16)) is not None
