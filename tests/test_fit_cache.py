"""The cached sequential fit: cuts of a traced graph, activation caches within a memory budget,
and the same kernels as the fit that runs every pass from the input."""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from conftest import DataDependentNet, ResidualBNNet
from torch import nn
from typer.testing import CliRunner

import kshare
from kshare import FitConfig, fit_and_tie
from kshare.cli import app
from kshare.data import ImageData
from kshare.errors import TrainingError
from kshare.fit.cache import ActivationCache, Storage, choose_storage
from kshare.fit.segments import Segments

EXACT = 0.0  # float32 caches: the same operations on the same values, so the same bits
HALF = 3e-2  # float16 caches: largest relative change of any weight (measured: 1.4e-2, resnet18's fc)


def _images(n: int, size: int, channels: int = 3) -> ImageData:
    gen = torch.Generator().manual_seed(0)
    return ImageData("random", "train", torch.randint(0, 256, (n, channels, size, size), generator=gen,
                                                      dtype=torch.uint8),
                     torch.zeros(n, dtype=torch.long), ("x",), (0.5,) * channels, (0.25,) * channels, labelled=False)


def _fit(model: nn.Module, policy: str, data: ImageData, size: int, **config: object
         ) -> tuple[dict[str, torch.Tensor], str]:
    """The fitted weights, and where the fit said it kept its activations."""
    model = copy.deepcopy(model)
    plan = kshare.plan(model, policy, input_size=(data.images.shape[1], size, size))
    report = fit_and_tie(model, plan, data, FitConfig(images=len(data.labels), batch_size=32,
                                                      **config))  # type: ignore[arg-type]
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}, report.cache


def _largest_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest relative change of any weight (not BatchNorm's running statistics, which the
    pipeline re-estimates after the fit: a mean near zero changes by a large fraction of itself)."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in a if "running_" not in k)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    """timm's tf_efficientnet_lite0: dynamically padded convs, BatchNorm with its activation, depthwise."""
    torch.manual_seed(0)
    return timm.create_model("tf_efficientnet_lite0", num_classes=10).eval()


@pytest.mark.parametrize(("name", "policy", "size", "mode"), [
    ("resnet18", "stage", 32, "sequential"), ("lite0", "stage", 64, "sequential"),
    ("resnet18", "stage", 32, "progressive"), ("lite0", "stage", 64, "progressive")])
def test_cached_fit_gives_the_uncached_kernels(name: str, policy: str, size: int, mode: str,
                                               request: pytest.FixtureRequest,
                                               caplog: pytest.LogCaptureFixture) -> None:
    model = request.getfixturevalue(name)
    data = _images(64, size)
    with caplog.at_level(logging.INFO, logger="kshare"):
        cached, kept = _fit(model, policy, data, size, mode=mode)
    assert "kept in memory as float32" in caplog.text and kept == "in memory as float32"
    # the progressive fit steps the copy's stream through the network; the sequential keeps it at cuts
    assert ("the copy's stream moves through the network once" in caplog.text) == (mode == "progressive")
    uncached, kept = _fit(model, policy, data, size, cache=False, mode=mode)
    assert kept == "not cached: every pass from the input"
    assert _largest_change(cached, uncached) <= EXACT
    # and the fit changed something: the comparison is not of two untouched models
    original = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    assert _largest_change(cached, original) > 0.05


def test_a_tiny_budget_spills_to_disk_and_gives_the_same_kernels(resnet18: nn.Module, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    data = _images(64, 32)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    uncached, _ = _fit(resnet18, "stage", data, 32, cache=False)
    with caplog.at_level(logging.INFO, logger="kshare"):
        on_disk, kept_on_disk = _fit(resnet18, "stage", data, 32, cache_memory=0)
        # the largest cache here is 64 images x 64 x 8 x 8 floats (1 MiB): float16 of four fits in 3 MiB
        in_memory, kept_in_memory = _fit(resnet18, "stage", data, 32, cache_memory=3 << 20)
    assert "on disk as float16 (memory-mapped)" in caplog.text and "in memory as float16" in caplog.text
    assert (kept_on_disk, kept_in_memory) == ("on disk as float16 (memory-mapped)", "in memory as float16")
    assert _largest_change(on_disk, in_memory) <= EXACT  # the same float16 values, wherever they are kept
    assert 0 < _largest_change(on_disk, uncached) <= HALF
    assert not list(tmp_path.iterdir())  # the memory-mapped files are gone with the fit


def test_a_network_that_does_not_trace_is_fitted_the_old_way(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = DataDependentNet().eval()
    data = _images(32, 16)
    with caplog.at_level(logging.INFO, logger="kshare"):
        cached, kept = _fit(model, "all", data, 16)
    assert "does not trace" in caplog.text and kept.endswith("(the model does not trace)")
    assert _largest_change(cached, _fit(model, "all", data, 16, cache=False)[0]) <= EXACT


def test_segments_run_from_any_cut() -> None:
    """From the activations at any cut the rest of the graph gives the network's own output;
    the residual net's cuts are where its blocks meet."""
    torch.manual_seed(0)
    for model in (ResidualBNNet(in_chans=3).eval(), torchvision.models.densenet121(num_classes=5).eval()):
        x = torch.randn(2, 3, 32, 32)
        segments = Segments.trace(model, x)
        assert segments is not None and len(segments.cuts) > 4
        with torch.no_grad():
            expected = model(x)
            for cut in segments.cuts[1::3]:
                middle = segments.run(model, segments.input_cut, x, cut)
                torch.testing.assert_close(segments.run(model, cut, middle, None), expected)
    residual = Segments.trace(ResidualBNNet(in_chans=3, depth=2).eval(), x)
    assert residual is not None
    assert [str(residual.carried[c]) for c in residual.cuts][:6] == ["x", "stem_0", "stem_1", "stem_2", "add", "add_1"]


def test_segments_step_between_any_two_nodes() -> None:
    """From the values live at any node, inside a block too (the shortcut beside the branch), the
    graph steps to any later node and on to the network's own output."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    segments = Segments.trace(model, x)
    assert segments is not None
    inside = [i for i in range(segments.input_cut, len(segments.nodes) - 1) if i not in segments.cuts]
    assert max(len(segments.live_at(i)) for i in inside) >= 2  # a block's branch and its shortcut
    with torch.no_grad():
        expected = model(x)
        for i in inside[::7]:
            values = segments.step(model, {segments.carried[segments.input_cut]: x}, segments.input_cut, i)
            assert set(values) == set(segments.live_at(i))
            cut = min(c for c in segments.cuts if c > i + 5)
            later = segments.step(model, segments.step(model, values, i, i + 5), i + 5, cut)
            assert list(later) == [segments.carried[cut]]
            torch.testing.assert_close(segments.run(model, cut, later[segments.carried[cut]], None), expected)


def test_storage_ladder_and_the_float16_overflow() -> None:
    assert choose_storage(100, 400) == Storage("memory", torch.float32)
    assert choose_storage(100, 399) == Storage("memory", torch.float16)
    assert choose_storage(100, 199) == Storage("disk", torch.float16)
    cache = ActivationCache(Storage("memory", torch.float16))
    big = torch.tensor([[1e6, 1.0]])  # beyond float16: that batch stays float32
    cache.put(0, big)
    cache.put(1, big / 1e6)
    assert torch.equal(cache.get(0), big)
    assert cache.batches[0][0].dtype == torch.float32 and cache.batches[1][0].dtype == torch.float16
    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    fp32 = ActivationCache(Storage("memory", torch.float32))
    fp32.put(0, x)
    x.zero_()  # the network changing its own tensor afterwards does not reach the cache
    got = fp32.get(0)
    assert got.abs().sum() > 0 and got.is_contiguous(memory_format=torch.channels_last)


def test_bad_cache_settings_are_clear_errors() -> None:
    with pytest.raises(TrainingError, match="cache_memory"):
        FitConfig(cache_memory=-1)
    with pytest.raises(TrainingError, match="cache_memory"):
        FitConfig(cache_memory=1.5)  # type: ignore[arg-type]
    result = CliRunner().invoke(app, ["apply", "resnet18", "--fit", "data", "--data", "digits", "--cache-memory", "-1",
                                      "--out", "x.pt"])
    assert result.exit_code == 2 and "cache-memory" in result.output


@pytest.mark.parametrize("mode", ["sequential", "progressive"])
def test_untied_outputs_read_once_give_the_kernels_of_the_paired_streams(resnet18: nn.Module, mode: str,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The untied network's outputs at the fitted layers, read in one pass, stand in for its
    stream beside the copy's; where they do not fit the budget, the stream runs as before."""
    from kshare.fit import order

    data = _images(64, 32)
    with caplog.at_level(logging.INFO, logger="kshare"):
        once, _ = _fit(resnet18, "stage", data, 32, mode=mode)
    assert "read once" in caplog.text
    monkeypatch.setattr(order, "source_outputs", lambda *a, **k: None)
    paired, _ = _fit(resnet18, "stage", data, 32, mode=mode)
    assert _largest_change(once, paired) <= 1e-4  # the same W x, summed the same way where outputs < inputs


@pytest.mark.parametrize(("budget", "kept", "tolerance"), [(4 << 30, "in memory as float32", EXACT),
                                                           (0, "on disk as float16 (memory-mapped)", HALF)])
def test_the_stepped_stream_holds_what_each_member_reads(resnet18: nn.Module, budget: int, kept: str,
                                                         tolerance: float, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Stood before a member inside a block (its shortcut kept beside it), the stream hands the
    member the input a plain forward gives it, batch by batch; spilled to disk, in float16, and
    the files go with the stream."""
    from kshare.fit.streams import stepped_stream

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    members = ["layer1.0.conv2", "layer2.0.conv1", "layer2.1.conv2"]
    seen: dict[str, list[torch.Tensor]] = {m: [] for m in members}
    modules = dict(resnet18.named_modules())
    handles = [modules[m].register_forward_pre_hook(lambda _, a, m=m: seen[m].append(a[0].clone())) for m in members]
    with torch.no_grad():
        for b in batches:
            resnet18(b)
    for h in handles:
        h.remove()
    with stepped_stream(resnet18, batches, members, budget) as stream:
        assert stream is not None and stream.folder.storage.describe() == kept
        for m in members:
            stream.reach(m, False, "test")
            for i in range(len(batches)):
                got = stream.input_of(m, i)
                assert float((got - seen[m][i]).norm() / seen[m][i].norm()) <= tolerance
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("mode", ["sequential", "progressive"])
def test_a_model_left_in_training_mode_is_fitted_on_its_cached_streams(resnet18: nn.Module, mode: str) -> None:
    """The caches are sized on one image; a model handed over in training mode (as a training
    script leaves it) has BatchNorms on 1x1 maps here, which refuse one image in training mode."""
    model = copy.deepcopy(resnet18).train()
    data = _images(16, 32)
    plan = kshare.plan(model, "stage", input_size=(3, 32, 32))
    report = fit_and_tie(model, plan, data, FitConfig(images=16, batch_size=16, mode=mode))
    assert report.cache == "in memory as float32"
    assert all(m.training for m in model.modules())  # and it is handed back as it came
