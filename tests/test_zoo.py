"""Model resolution, model arguments, local weights, and refusing downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import kshare
from kshare.models.weights import load_weights
from kshare.models.zoo import build, default_input_size, load_model, parse_kwargs, resolve

HERE = Path(__file__).parent


@pytest.mark.parametrize(
    ("name", "ref"),
    [
        ("resnet50", "torchvision:resnet50"),
        ("torchvision:resnet18", "torchvision:resnet18"),
        ("timm:resnet18", "timm:resnet18"),
        ("convnext_atto", "timm:convnext_atto"),
        ("kshare:convmixer_256_16", "kshare:convmixer_256_16"),
        ("convmixer_256_8_shared", "kshare:convmixer_256_8_shared"),
        ("se_resnet_cifar_d3", "kshare:se_resnet_cifar_d3"),
        ("conftest:make_data_dependent", "conftest:make_data_dependent"),
    ],
)
def test_resolution(name: str, ref: str) -> None:
    assert resolve(name).ref == ref


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(kshare.ModelNotFoundError, match=r"did you mean.*resnet50"):
        resolve("resnt50")
    with pytest.raises(kshare.ModelNotFoundError):
        resolve("timm:not_a_model_at_all")


def test_kwargs_pass_through() -> None:
    model, spec = load_model("kshare:convmixer_256_8", {"num_classes": 7, "in_chans": 1})
    assert model[-1].out_features == 7 and model[0].in_channels == 1
    assert default_input_size(model, spec) == (1, 32, 32)
    tv, _ = load_model("resnet18", parse_kwargs(["num_classes=5"]))
    assert tv.fc.out_features == 5
    tm, tspec = load_model("timm:resnet18", {"in_chans": 1, "num_classes": 3})
    assert tm.conv1.in_channels == 1 and default_input_size(tm, tspec) == (1, 224, 224)


def test_file_factory(tmp_path: Path) -> None:
    src = tmp_path / "mynet.py"
    src.write_text(
        "from torch import nn\n"
        "def small(width=8):\n"
        "    return nn.Sequential(nn.Conv2d(1, width, 3), nn.Conv2d(width, width, 3), nn.Conv2d(width, width, 3))\n"
    )
    model, spec = load_model(f"{src}:small", {"width": 4})
    assert spec.source == "file" and model[1].out_channels == 4
    assert default_input_size(model, spec) == (1, 224, 224)
    with pytest.raises(kshare.ModelNotFoundError, match="no callable"):
        load_model(f"{src}:missing")
    with pytest.raises(kshare.ModelNotFoundError, match="not found"):
        load_model(f"{tmp_path / 'nope.py'}:small")


def test_downloads_are_refused_in_one_line() -> None:
    for kwargs in ({"pretrained": True}, {"weights": "DEFAULT"}):
        with pytest.raises(kshare.ModelBuildError, match="never downloads") as info:
            build(resolve("resnet18", kwargs))
        assert "\n" not in str(info.value)


def test_factory_errors_are_one_line() -> None:
    with pytest.raises(kshare.ModelBuildError, match="building torchvision:resnet18 failed") as info:
        load_model("resnet18", {"no_such_argument": 1})
    assert "\n" not in str(info.value)


def test_weights_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src, _ = load_model("resnet18")
    path = tmp_path / "w.pt"
    torch.save({"state_dict": src.state_dict()}, path)
    dst, _ = load_model("resnet18", weights=path)
    src.eval(), dst.eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(src(x), dst(x))


def test_weights_errors(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(kshare.WeightsError, match="not found"):
        load_weights(model, tmp_path / "missing.pt")
    wrong = tmp_path / "wrong.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 5, 3)).state_dict(), wrong)
    with pytest.raises(kshare.WeightsError, match=r"shape mismatch.*0\.weight"):
        load_weights(model, wrong)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(kshare.WeightsError, match="cannot read"):
        load_weights(model, garbage)


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned_by_pickle",))


def test_pickled_code_is_refused_and_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _Boom()}, evil)
    with pytest.raises(kshare.WeightsError, match="refused"):
        load_weights(nn.Conv2d(3, 4, 3), evil)
    assert not (tmp_path / "pwned_by_pickle").exists()
