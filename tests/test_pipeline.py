"""The one pipeline, `kshare.retrofit`: any source of images, the same kernels from the same
images, fidelity against the untied model, the CLI's --config files and help panels, and the
progress lines of long work when stderr is no terminal."""

from __future__ import annotations

import copy
import io
import json
import time
from pathlib import Path

import pytest
import torch
from conftest import make_residual_bn
from PIL import Image
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

import kshare
from kshare import FitConfig
from kshare.cli import app
from kshare.cli.progress import heartbeat_lines
from kshare.data import adapter_for
from kshare.errors import DataError
from kshare.progress import Tick


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 unlabelled RGB pictures in the real on-disk format (PNG), of two kinds of texture."""
    folder = tmp_path_factory.mktemp("photos")
    gen = torch.Generator().manual_seed(0)
    for i in range(40):
        base = torch.rand(3, 1, 1, generator=gen) * 200
        noise = torch.rand(3, 16, 16, generator=gen) * (40 if i % 2 else 120)
        pixels = (base + noise).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"p{i:02d}.png")
    return folder


def _model() -> nn.Module:
    torch.manual_seed(0)
    return make_residual_bn(in_chans=3, width=8, depth=3).eval()


def _shared(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_any_source_of_the_same_images_gives_the_same_kernels(photos: Path) -> None:
    """A folder, a DataLoader of (images, labels) and a plain list of tensors of the same images:
    the same fitted kernels, BatchNorm statistics and fidelity, within float rounding."""
    model = _model()
    data = kshare.load_data(f"images:{photos}", "train", image_size=16)
    inputs = adapter_for(model, data, 16)(data.images)  # what the folder's pictures become, made by "the user"
    labels = torch.zeros(len(inputs), dtype=torch.long)  # one class: the same seeded sample as the unlabelled folder
    sources = {
        "path": photos,
        "dataloader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=7),
        "list": list(inputs.unbind(0)),
    }
    results = {}
    for name, source in sources.items():
        net = copy.deepcopy(model)
        report = kshare.retrofit(net, "all", source, fit=FitConfig(images=30, batch_size=8), held_out=10,
                                 image_size=16)
        assert report.fit_images == 30 and report.held_out_images == 10, name
        results[name] = (_shared(net), [b.detach().clone() for b in net.buffers()], report.final.fidelity)
    reference = results["path"]
    for name, (params, buffers, fidelity) in results.items():
        for a, b in zip(params + buffers, reference[0] + reference[1], strict=True):
            assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-5), name
        assert fidelity is not None and reference[2] is not None
        assert abs(fidelity.kl - reference[2].kl) < 1e-5 and fidelity.top1 == reference[2].top1, name
    tied = kshare.plan_of(net)
    assert tied is not None and tied.groups[0].init == "data"


def test_a_transform_turns_a_users_items_into_images(photos: Path) -> None:
    model = _model()
    data = kshare.load_data(f"images:{photos}", "train", image_size=16)
    inputs = adapter_for(model, data, 16)(data.images)
    items = [{"pixels": x, "name": f"p{i}"} for i, x in enumerate(inputs)]
    read = []

    def pixels(item: dict[str, object]) -> torch.Tensor:
        read.append(item["name"])
        return item["pixels"]  # type: ignore[return-value]

    net = copy.deepcopy(model)
    report = kshare.retrofit(net, "all", items, transform=pixels, fit=FitConfig(images=20), held_out=5)
    assert report.fit_images == 20 and len(read) == 25  # only the images the steps need are read


def test_a_source_it_cannot_read_is_a_clear_error() -> None:
    for bad, words in ((["a", "b"], "an item is a str"), ([torch.zeros(3, 8, 8), torch.zeros(3, 9, 9)], "one size"),
                       (42, "cannot read images from a int"), ([], "gave no images"),
                       ([torch.zeros(2, 2, dtype=torch.long)], "shape")):
        with pytest.raises(DataError, match=words):
            kshare.as_image_data(bad)
    with pytest.raises(DataError, match="3-channel inputs"):  # float model input of the wrong channels
        kshare.retrofit(make_residual_bn(in_chans=1), "all", torch.zeros(8, 3, 8, 8), fit=FitConfig(images=4))


def test_fidelity_of_a_model_to_itself_and_to_another() -> None:
    model = _model()
    batches = [torch.randn(16, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    same = kshare.measure_fidelity(model, copy.deepcopy(model), batches, torch.zeros(24, dtype=torch.long))
    assert same.images == 24 and same.top1 == 1.0 and same.top5 == 1.0 and abs(same.kl) < 1e-6
    assert same.output_error < 1e-10 and same.accuracy is not None
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.head.weight.mul_(-1.0)  # the opposite ranking of the classes
    worse = kshare.measure_fidelity(other, model, batches)
    assert worse.kl > 0.0 and worse.output_error > 0.5 and worse.top1 < 1.0 and worse.accuracy is None


def test_the_one_shot_fit_is_the_same_on_every_run() -> None:
    """Which members a BatchNorm follows was decided by tensor ids, and a freed output's id can be
    reused: the same fit then centred different members from one run to the next."""
    train = kshare.load_data("digits", "train")
    kernels = []
    for _ in range(3):
        torch.manual_seed(0)
        net = kshare.load_model("kshare:convmixer_16_3", {"in_chans": 1, "kernel_size": 3, "patch_size": 1})[0]
        kshare.fit_and_tie(net, kshare.plan(net, "all"), train, FitConfig(mode="oneshot", images=128))
        kernels.append(_shared(net))
    for run in kernels[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, kernels[0], strict=True))


def test_retrofit_from_unlabelled_photos_end_to_end(photos: Path, tmp_path: Path) -> None:
    """`kshare retrofit --data images:PATH`: no labels, so no accuracy, but fidelity after each step."""
    weights = tmp_path / "weights.pt"
    torch.save(_model().state_dict(), weights)
    factory = f"{Path(__file__).parent / 'conftest.py'}:make_residual_bn"
    code, out = cli("retrofit", factory, "-k", "in_chans=3", "-k", "width=8", "--weights", weights, "-g", "all",
                    "--data", f"images:{photos}", "--image-size", "16", "--fit-images", "24", "--held-out", "16",
                    "--out", tmp_path / "r.pt")
    assert code == 0, out
    assert "BatchNorm recalibrated: top-1 agreement" in out and "on 16 held-out images" in out and "test acc" not in out
    code, out = cli("info", tmp_path / "r.pt")
    assert code == 0 and "top-1 agreement" in out and "16 held-out images" in out, out
    code, out = cli("retrofit", factory, "-k", "in_chans=3", "-k", "width=8", "--weights", weights, "--data",
                    f"images:{photos}",
                    "--epochs", "1", "--out", tmp_path / "x.pt")
    assert code == 2 and "no labels" in out, out


def test_a_config_file_equals_the_same_options_spelt_out(tmp_path: Path) -> None:
    options = {"groups": "all", "data": "digits", "fit-mode": "oneshot", "fit-images": 128, "held-out": 64,
               "kwarg": ["in_chans=1"]}
    config = tmp_path / "r.toml"
    config.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items()) + "\n")
    spelt = ["-g", "all", "--data", "digits", "--fit-mode", "oneshot", "--fit-images", "128", "--held-out", "64",
             "-k", "in_chans=1"]
    runs = []
    for args in (["--config", config], spelt):
        torch.manual_seed(0)
        code, out = cli("retrofit", "kshare:convmixer_16_3", *args, "--json", "--out", tmp_path / "r.pt")
        assert code == 0, out
        report = json.loads(out.strip().splitlines()[-1])
        runs.append([(s["step"], s["test_acc"], s["fidelity"]) for s in report["steps"]])
    assert runs[0] == runs[1] and runs[0][1][0] == "fitted (oneshot)"
    config.write_text('fit-images = 128\nno-such-option = 1\n')
    code, out = cli("retrofit", "--config", config, "--out", tmp_path / "r.pt")
    assert code == 2 and "unknown key 'no-such-option'" in out, out
    config.write_text('fit-images = [1,\n')
    code, out = cli("retrofit", "--config", config, "--out", tmp_path / "r.pt")
    assert code == 2 and "is not TOML" in out, out


def test_retrofit_help_groups_its_options_in_panels() -> None:
    code, out = cli("retrofit", "--help")
    assert code == 0
    for panel in ("Model", "Plan", "Data", "Fit", "Fine-tune", "Output", "Device"):
        assert f"─ {panel} ─" in out, panel
    assert "--fit-images" in out and "--config" in out and "--calib-images" in out  # the old name still works


def test_long_work_says_it_is_alive_when_stderr_is_no_terminal() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=200)
    with heartbeat_lines(console, every=0.05) as show:
        show(Tick("statistics 2/5", 1, 4))
        time.sleep(0.3)
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "progress: statistics 2/5, started (4 steps)"
    beats = [line for line in lines[1:] if line.startswith("progress: statistics 2/5, step 1/4, ")]
    assert len(beats) >= 2 and all("elapsed" in b and "ETA" in b for b in beats), lines
