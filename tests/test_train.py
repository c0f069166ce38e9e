"""The fine-tune loop: real data, distillation, kill and resume, NaN, DDP under torchrun, CLI errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import kshare
from kshare.cli import app
from kshare.data import FASHION_MNIST_ROOT, Adapter, ImageData, load_data
from kshare.errors import TrainingError
from kshare.kernels import shared_kernel
from kshare.models.zoo import load_model
from kshare.surgery.tie import plan_of
from kshare.training.config import TrainConfig
from kshare.training.evaluate import evaluate
from kshare.training.loop import distill_loss, finetune, fingerprint, parameters_without_grad
from kshare.training.resume import config_changes, state_path, sync_metrics
from kshare.training.runtime import Runtime
from kshare.training.runtime import index_batches as _batches

ROOT = Path(__file__).resolve().parent.parent
HAVE_FMNIST = FASHION_MNIST_ROOT.is_dir()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST and not os.environ.get("KSHARE_REQUIRE_DATA"),
                                  reason="apt-get install dataset-fashion-mnist (CI sets KSHARE_REQUIRE_DATA)")
SMALL = ["kshare:convmixer_64_4", "-k", "in_chans=1", "-k", "kernel_size=5", "-k", "patch_size=2"]


def small_mixer() -> nn.Module:
    torch.manual_seed(0)
    return load_model(SMALL[0], kwargs={"in_chans": 1, "kernel_size": 5, "patch_size": 2})[0]


def members_alias(model: nn.Module) -> bool:
    """Every group of the attached plan holds one kernel tensor (same object and storage), relaxed or not."""
    modules = dict(model.named_modules())
    plan = plan_of(model)
    assert plan is not None and plan.groups
    for g in plan.groups:
        weights = [shared_kernel(modules[m]) for m in g.members]
        if any(w is not weights[0] or w.data_ptr() != weights[0].data_ptr() for w in weights):
            return False
    return True


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kshare.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@needs_fmnist
def test_short_real_run_learns_and_stays_tied(tmp_path: Path) -> None:
    model = kshare.tie(small_mixer(), "all")
    before_count = sum(p.numel() for p in model.parameters())
    assert before_count == plan_of(model).totals.params_after
    train = load_data("fashion-mnist", "train").subset(3000)
    test = load_data("fashion-mnist", "test").subset(1000)
    chance = kshare.evaluate(model, test)["acc"]
    config = TrainConfig(epochs=2, lr=3e-3, batch_size=64)
    summary = finetune(model, train, test, config, tmp_path / "ft.pt")
    acc = summary["history"][-1]["test_acc"]
    assert acc > 0.6 and acc > chance + 0.3, (chance, acc)
    assert members_alias(model)
    assert sum(p.numel() for p in model.parameters()) == before_count
    loaded = kshare.load(tmp_path / "ft.pt")
    assert members_alias(loaded) and fingerprint(loaded) == fingerprint(model)
    assert kshare.evaluate(loaded, test)["acc"] == pytest.approx(acc, abs=1e-9)
    rows = [json.loads(line) for line in (tmp_path / "ft.metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["test_acc"] == acc
    # the deliverable carries no optimiser state; the resumable state does
    assert (tmp_path / "ft.pt").stat().st_size < 0.6 * state_path(tmp_path / "ft.pt").stat().st_size


def test_distill_loss_by_value() -> None:
    torch.manual_seed(0)
    student, teacher, target = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    config = TrainConfig(distill=True, temperature=3.0, alpha=0.3)
    total, ce, kd = distill_loss(student, teacher, target, config)
    p_t = torch.softmax(teacher / 3.0, 1)
    expected_kd = (p_t * (p_t.log() - torch.log_softmax(student / 3.0, 1))).sum(1).mean() * 9.0
    assert kd.item() == pytest.approx(expected_kd.item(), rel=1e-5)
    assert ce.item() == pytest.approx(F.cross_entropy(student, target).item(), rel=1e-6)
    assert total.item() == pytest.approx(0.7 * ce.item() + 0.3 * expected_kd.item(), rel=1e-5)
    assert kd.item() > 0.01
    _, _, kd_same = distill_loss(student, student, target, config)
    assert kd_same.item() == pytest.approx(0.0, abs=1e-6)


def test_distill_uses_teacher_and_never_updates_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = load_data("digits", "train")
    student = kshare.tie(small_mixer(), "all")
    teacher = small_mixer()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    calls = []
    teacher.register_forward_hook(lambda m, i, o: calls.append(o.detach().clone()))
    received: list[tuple[torch.Tensor | None, torch.Tensor]] = []

    def recording(student_logits, teacher_logits, target, cfg):  # the loop's loss, seen from outside
        total, ce, kd = distill_loss(student_logits, teacher_logits, target, cfg)
        received.append((teacher_logits, total.detach() - (1 - cfg.alpha) * ce.detach()))
        return total, ce, kd

    monkeypatch.setattr(kshare.training.loop, "distill_loss", recording)
    config = TrainConfig(epochs=1, lr=1e-3, batch_size=128, distill=True, alpha=0.5)
    finetune(student, data, load_data("digits", "test"), config, tmp_path / "s.pt", teacher=teacher)
    steps = -(-len(data.labels) // 128)
    assert len(calls) == steps and len(received) == steps
    for seen, (given, kd_part) in zip(calls, received, strict=True):  # the teacher's own logits reach the loss
        assert given is not None and torch.equal(given, seen)
        assert kd_part.item() > 1e-4  # and its term is in the loss that is minimised
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())


def _run_until(args: list[str], marker: str, timeout: float = 240) -> int:
    """Start `kshare finetune`, SIGKILL it as soon as `marker` appears on stderr; its return code."""
    env = os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "kshare.cli", *args], stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL, env=env, cwd=ROOT)
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if marker in line:
                proc.send_signal(signal.SIGKILL)
                break
        return proc.wait(timeout=timeout)
    finally:
        proc.kill()


def test_kill_and_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    base = tmp_path / "base.pt"
    apply = cli("apply", SMALL[0], "-k", "in_chans=1", "-k", "patch_size=1", "-k", "kernel_size=3", "-g", "all",
                "--out", str(base))
    assert apply.returncode == 0, apply.stderr
    common = ["--data", "digits", "--epochs", "4", "--batch-size", "32", "--lr", "2e-3", "--image-size", "16"]
    killed = tmp_path / "killed.pt"
    rc = _run_until(["finetune", str(base), *common, "--out", str(killed)], "epoch 1/4:")
    assert rc == -signal.SIGKILL, "the run ended before it could be killed"
    state = torch.load(state_path(killed), weights_only=True)["extra"]["train_state"]
    assert 1 <= state["epoch"] < 4
    resumed = cli("finetune", str(base), *common, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {state['epoch']} of 4" in resumed.stderr
    assert "steps run in fp32 NCHW (kept from the run being resumed)" in resumed.stderr
    straight = tmp_path / "straight.pt"
    full = cli("finetune", str(base), *common, "--out", str(straight))
    assert full.returncode == 0, full.stderr
    a, b = kshare.load(killed), kshare.load(straight)
    assert members_alias(a)
    assert torch.load(killed, weights_only=True)["extra"]["finetune"]["epoch"] == 4
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    rows = [json.loads(x) for x in killed.with_suffix(".metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    again = cli("finetune", str(base), *common, "--out", str(killed), "--resume")
    assert again.returncode == 0 and "nothing to do" in again.stdout


class PoisonedNet(nn.Module):
    """Turns its output into NaN after `limit` training-mode forwards."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)
        self.limit, self.calls = limit, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.conv(x).mean((2, 3)))
        if self.training:
            self.calls += 1
            if self.calls > self.limit:
                return out * float("nan")
        return out


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    data = load_data("digits", "train")
    steps = -(-len(data.labels) // 200)
    torch.manual_seed(0)
    model = PoisonedNet(limit=steps + 1)  # NaN at epoch 2, step 2
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 2 step 2.*last good checkpoint"):
        finetune(model, data, data, TrainConfig(epochs=3, batch_size=200), tmp_path / "p.pt")
    saved = torch.load(tmp_path / "p.pt", weights_only=True)
    assert saved["extra"]["finetune"]["epoch"] == 1
    restored = kshare.load(tmp_path / "p.pt", model=PoisonedNet(limit=10**9))
    assert all(torch.isfinite(p).all() for p in restored.parameters())


def test_unused_parameters_probe_changes_nothing(data_dependent_net: nn.Module) -> None:
    net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), data_dependent_net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    rng = torch.get_rng_state()
    unused = parameters_without_grad(net, x)
    assert unused == ["2.unused.weight", "2.unused.bias"]
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters()) and torch.equal(rng, torch.get_rng_state())


def test_sync_metrics_keeps_exactly_the_completed_epochs(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"epoch": 1, "v": 1}\n{"epoch": 2, "v": 2}\n{"epoch": 3, "v": 3}\n{"epo')
    sync_metrics(path, 2, {"epoch": 2, "v": 22})
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"epoch": 1, "v": 1}, {"epoch": 2, "v": 22}]
    saved = TrainConfig(lr=1e-3, epochs=2).__dict__
    assert config_changes(saved, TrainConfig(lr=2e-3, epochs=5)) == ["lr 0.001 → 0.002"]


@pytest.mark.parametrize("relax", ["none", "scale+lora:1"])  # plain aliasing, and parametrized members
def test_torchrun_two_cpu_processes(tmp_path: Path, relax: str) -> None:
    base = tmp_path / "rb.pt"
    apply = cli("apply", f"{ROOT / 'tests' / 'conftest.py'}:make_residual_bn", "-g", "all", "--relax", relax,
                "--out", str(base))
    assert apply.returncode == 0, apply.stderr
    out = tmp_path / "ddp.pt"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kshare.cli",
         "finetune", str(base), "--data", "digits", "--epochs", "2", "--batch-size", "32", "--lr", "3e-3",
         "--out", str(out), "--device", "cpu", "--trust-code"],  # the user's own model file
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "DDP looks for unused parameters" in run.stderr  # the model's unused conv
    line = next(x for x in run.stderr.splitlines() if "identical on all 2 ranks" in x)
    model = kshare.load(out, trust_code=True)
    assert members_alias(model) and plan_of(model).relax == relax
    assert f"fingerprint {fingerprint(model)}" in line  # what rank 0 saved is what every rank holds
    saved = torch.load(out, weights_only=True)
    assert saved["aliases"] and all(k not in saved["state"] for k in saved["aliases"])
    rows = [json.loads(x) for x in out.with_suffix(".metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in rows] == [2, 2]
    assert rows[-1]["test_acc"] > 0.5


def test_torchrun_nan_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    base = tmp_path / "nan.pt"
    apply = cli("apply", f"{ROOT / 'tests' / 'conftest.py'}:make_nan_on_rank_one", "-g", "none", "--out", str(base))
    assert apply.returncode == 0, apply.stderr
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(  # a rank left waiting would hang until the timeout fails the test
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kshare.cli",
         "finetune", str(base), "--data", "digits", "--epochs", "1", "--batch-size", "32",
         "--out", str(tmp_path / "out.pt"), "--device", "cpu", "--trust-code"],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert run.returncode != 0
    bad = re.search(r"error: loss became nan on rank 1 at (epoch 1 step \d+);", run.stderr)
    assert bad, run.stderr[-3000:]  # and rank 0 stops at the same step, told why
    assert f"error: loss became non-finite on another rank at {bad[1]};" in run.stderr, run.stderr[-3000:]
    assert not (tmp_path / "out.pt").exists()


runner = CliRunner()


def _bad(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]  # info lines (how images are fed) may come first
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.output, result.output
    return errors[0]


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ck") / "m.pt"
    kshare.save(kshare.tie(small_mixer(), "all"), path)
    return path


def test_cli_bad_input(digits_ckpt: Path, tmp_path: Path) -> None:
    assert "unknown dataset 'mnist'" in _bad("finetune", str(digits_ckpt), "--data", "mnist")
    assert "not found" in _bad("finetune", str(digits_ckpt), "--data", "fashion-mnist", "--data-root",
                               str(tmp_path / "nope"))
    assert "--data-root" in _bad("eval", str(digits_ckpt), "--data", "cifar10")
    seven = tmp_path / "seven.pt"
    model = load_model(SMALL[0], kwargs={"in_chans": 1, "num_classes": 7})[0]
    kshare.save(model, seven)
    assert "7 classes" in _bad("finetune", str(seven), "--data", "digits")
    assert "7 classes" in _bad("eval", str(seven), "--data", "digits")
    foreign = tmp_path / "foreign.pt"
    torch.save(small_mixer().state_dict(), foreign)
    assert "not a kshare checkpoint" in _bad("finetune", str(foreign), "--data", "digits")
    assert "without --distill" in _bad("finetune", str(digits_ckpt), "--data", "digits", "--teacher", str(seven))
    assert "needs a teacher" in _bad("finetune", str(digits_ckpt), "--data", "digits", "--distill")
    assert "--teacher" in _bad("finetune", str(digits_ckpt), "--data", "digits", "--feature-weight", "1")
    untied = tmp_path / "untied.pt"
    kshare.save(small_mixer(), untied)
    assert "--feature-weight" in _bad("finetune", str(untied), "--data", "digits", "--feature-weight", "1",
                                      "--teacher", str(untied))  # the blocks to match are the tied convs'
    assert "--teacher-weights" in _bad("finetune", str(digits_ckpt), "--data", "digits", "--distill",
                                       "--teacher", "resnet18")  # a random teacher would teach noise
    assert "no resumable state" in _bad("finetune", str(digits_ckpt), "--data", "digits", "--resume",
                                        "--out", str(tmp_path / "x.pt"))
    assert "optimizer" in _bad("finetune", str(digits_ckpt), "--data", "digits", "--optimizer", "lion")


def test_cli_eval_matches_finetune_metrics(digits_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "e.pt"
    result = runner.invoke(app, ["finetune", str(digits_ckpt), "--data", "digits", "--epochs", "1", "--out",
                                 str(out), "--batch-size", "64"])
    assert result.exit_code == 0, result.output
    row = json.loads(out.with_suffix(".metrics.jsonl").read_text())
    ev = runner.invoke(app, ["eval", str(out), "--data", "digits", "--json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["acc"] == pytest.approx(row["test_acc"], abs=1e-12)
    info = runner.invoke(app, ["info", str(state_path(out)), "--json"])
    assert info.exit_code == 0, info.output
    training = json.loads(info.output)["training"]
    assert training["epoch"] == 1 and training["resumable"] and training["data"] == "digits"


def test_eval_feeds_the_model_as_it_was_trained_with_no_size_flag(digits_ckpt: Path, tmp_path: Path) -> None:
    """A model fine-tuned at --image-size 16 is evaluated at 16, normalised as it was trained, with
    no flag: the accuracy the run reported, exactly. Asked for another size, it warns."""
    out = tmp_path / "big.pt"
    result = runner.invoke(app, ["finetune", str(digits_ckpt), "--data", "digits", "--epochs", "1", "--out", str(out),
                                 "--batch-size", "64", "--image-size", "16"])
    assert result.exit_code == 0, result.output
    row = json.loads(out.with_suffix(".metrics.jsonl").read_text())
    ev = runner.invoke(app, ["eval", str(out), "--data", "digits", "--json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.output.splitlines()[-1])["acc"] == pytest.approx(row["test_acc"], abs=1e-12)
    assert "size 8x8→16x16" in ev.output  # it says how it adapts the data
    recipe = json.loads(runner.invoke(app, ["info", str(out), "--json"]).output)["input"]
    assert recipe["input_size"] == [1, 16, 16] and recipe["data"] == "digits" and len(recipe["classes"]) == 10
    other = runner.invoke(app, ["eval", str(out), "--data", "digits", "--image-size", "8"])
    assert other.exit_code == 0 and "warning: the model was trained at 16x16" in other.output, other.output
    loaded = kshare.load(out)  # the Python API feeds it the same way
    assert kshare.evaluate(loaded, load_data("digits", "test"))["acc"] == pytest.approx(row["test_acc"], abs=1e-12)


def test_distill_needs_teacher_api(tmp_path: Path) -> None:
    data = ImageData("d", "train", torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
                     tuple("0123456789"), (0.5,), (0.5,))
    with pytest.raises(TrainingError, match="needs a teacher"):
        finetune(small_mixer(), data, data, TrainConfig(distill=True), tmp_path / "x.pt")


def test_evaluation_counts_every_image() -> None:
    data = load_data("digits", "test").subset(257)  # one image past a whole number of batches
    model = small_mixer().eval()
    result = evaluate(model, data, batch_size=128)
    assert result["n"] == 257
    adapter = Adapter.for_model(data, 1, None, augment=False)
    with torch.no_grad():
        predictions = model(adapter(data.images)).argmax(1)
    assert result["acc"] == pytest.approx(int((predictions == data.labels).sum()) / 257, abs=1e-12)
    shares = [torch.cat(list(_batches(257, 128, Runtime(rank, 2, torch.device("cpu")), None, every=True)))
              for rank in (0, 1)]  # two ranks: every image exactly once
    assert sorted(torch.cat(shares).tolist()) == list(range(257))
