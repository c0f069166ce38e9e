"""Devices, precision and memory format, compile: the GPU path's logic, tested on the CPU with
`torch.cuda` faked where a test needs a GPU to exist. No test here needs one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kshare
import kshare.training.loop
from kshare.errors import TrainingError
from kshare.training.precision import Setup, candidates, choose_setup
from kshare.training.runtime import resolve_device, runtime


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Two GPUs that exist as far as `torch.cuda` says; `set_device` calls are recorded."""
    calls: list[object] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return calls


def test_cuda_device_names_all_work(fake_gpus: list[object], monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cuda") == torch.device("cuda", 0)  # an index: set_device refuses a bare "cuda"
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(None) == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")
    rt = runtime("cuda")
    assert rt.device == torch.device("cuda", 0) and fake_gpus == [torch.device("cuda", 0)]
    assert all(isinstance(d, torch.device) and d.index is not None for d in fake_gpus)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)  # this process's GPU
    for bad, words in (("cuda:2", "does not exist"), ("tpu", "unknown device"), ("cuda:x", "unknown device"),
                       ("cpu:0", "unknown device"), ("", "unknown device")):
        with pytest.raises(TrainingError, match=words):
            resolve_device(bad)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainingError, match="torchrun"):
        resolve_device("cuda:0")


def test_cuda_where_there_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(TrainingError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_candidates(fake_gpus: list[object], monkeypatch: pytest.MonkeyPatch) -> None:
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert candidates(cpu) == [Setup("fp32", False)]  # the CPU: nothing to time
    assert {s.label for s in candidates(gpu)} == {"fp32 NCHW", "fp32 channels-last", "bf16 NCHW",
                                                  "bf16 channels-last"}
    assert {s.label for s in candidates(gpu, amp=False)} == {"fp32 NCHW", "fp32 channels-last"}
    assert candidates(gpu, "bf16", True) == [Setup("bf16", True)]
    assert candidates(cpu, "bf16") == [Setup("bf16", False)]
    with pytest.raises(TrainingError, match="fp16"):
        candidates(cpu, "fp16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert {s.precision for s in candidates(gpu)} == {"fp32", "fp16"}  # bf16 only where supported
    with pytest.raises(TrainingError, match="bf16"):
        candidates(gpu, "bf16")


def test_choose_setup_keeps_the_fastest_and_says_why() -> None:
    times = {"fp32 NCHW": 0.312, "fp32 channels-last": 0.760, "bf16 NCHW": 0.311, "bf16 channels-last": 0.443}
    options = [Setup(p, c) for p in ("fp32", "bf16") for c in (False, True)]
    chosen = choose_setup(options, lambda s: times[s.label])
    assert (chosen.precision, chosen.channels_last) == ("bf16", False)
    assert "bf16 NCHW" in chosen.reason and "311.0 ms/step" in chosen.reason and "fp32 NCHW 312.0" in chosen.reason
    asked: list[Setup] = []
    single = choose_setup([Setup("fp32", True)], lambda s: asked.append(s) or 0.0)
    assert not asked and "as asked" in single.reason  # one option is taken untimed


def test_fp16_keeps_loss_scaling() -> None:
    assert Setup("fp16").scaler(torch.device("cpu")).is_enabled()
    assert not Setup("bf16").scaler(torch.device("cpu")).is_enabled()
    assert not Setup("fp32").scaler(torch.device("cpu")).is_enabled()


def _tiny() -> tuple[torch.nn.Module, kshare.ImageData, kshare.ImageData]:
    torch.manual_seed(0)
    model = kshare.load_model("kshare:convmixer_16_2", {"in_chans": 1, "kernel_size": 3, "patch_size": 1})[0]
    return kshare.tie(model, "all"), kshare.load_data("digits", "train").subset(128), \
        kshare.load_data("digits", "test").subset(64)


def test_precision_is_recorded_and_kept_on_resume(tmp_path: Path) -> None:
    model, train, test = _tiny()
    out = tmp_path / "m.pt"
    config = kshare.TrainConfig(epochs=1, batch_size=32, precision="bf16", channels_last=True)
    summary = kshare.finetune(model, train, test, config, out, device="cpu")
    assert summary["setup"] == {"precision": "bf16", "channels_last": True}
    row = json.loads(out.with_suffix(".metrics.jsonl").read_text())
    assert row["precision"] == "bf16" and row["channels_last"] is True and 0.0 <= row["test_acc"] <= 1.0
    model2, state = kshare.training.resume_state(out)
    assert state["setup"] == {"precision": "bf16", "channels_last": True}
    again = kshare.finetune(model2, train, test, kshare.TrainConfig(epochs=2, batch_size=32), out, resume=state,
                            device="cpu")
    assert again["setup"] == {"precision": "bf16", "channels_last": True}  # kept, though auto was asked
    for p in kshare.load(out).parameters():
        assert p.is_contiguous()  # the saved model is in the default memory format


def test_a_deferred_loss_check_still_stops_at_the_first_bad_step(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the loss is checked every few steps (each check waits for the GPU); the run must
    still stop, name the first bad step, and write nothing. Checked here with the CPU's interval
    set to a GPU-like 4."""
    monkeypatch.setitem(kshare.training.loop.CHECK_EVERY, "cpu", 4)
    model, train, test = _tiny()

    class NanAfter(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += self.training
            out = self.inner(x)
            return out * float("nan") if self.training and self.calls == 2 else out

    with pytest.raises(TrainingError, match="epoch 1 step 2;"):
        kshare.finetune(NanAfter(model), train, test, kshare.TrainConfig(epochs=1, batch_size=16),
                        tmp_path / "n.pt", device="cpu")
    assert not (tmp_path / "n.pt").exists()


def test_compile_gives_the_eager_results(tmp_path: Path) -> None:
    """`compile=True` trains what eager trains: the same losses and accuracies and close weights."""
    pytest.importorskip("torch._inductor")
    results = []
    for compiled in (False, True):
        model, train, test = _tiny()
        config = kshare.TrainConfig(epochs=1, batch_size=32, compile=compiled)
        summary = kshare.finetune(model, train, test, config, tmp_path / f"c{compiled}.pt", device="cpu")
        results.append((summary["history"][0], model))
    (eager, a), (compiled_row, b) = results
    for key in ("train_loss", "test_loss", "test_acc"):
        assert compiled_row[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-5), key
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=name)
    assert kshare.plan_of(kshare.load(tmp_path / "cTrue.pt")) is not None  # saved tied, not as a compiled wrapper
