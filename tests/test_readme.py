"""Every command in the README runs as written: its `kshare` lines through the CLI, its TOML files
written where they say, its Python blocks executed, in a folder holding the files it names (a
resnet18 state dict and a folder of photos, made here: nothing is downloaded). The `pip` lines
are what CI runs."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from typer.testing import CliRunner

from kshare.cli import app

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(README.read_text())]


def commands(text: str) -> list[str]:
    """The shell lines of a block, continuations joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            found.append(line)
    return found


def test_the_readme_is_short() -> None:
    assert len(README.read_text().splitlines()) <= 160


def test_the_readme_set_up_commands_are_the_ones_ci_runs() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    shell = [c for lang, text in blocks() if lang == "bash" for c in commands(text)]
    assert 'pip install -e ".[dev]" && ruff check . && python -m pytest' in shell
    assert 'pip install -q -e ".[dev]" && ruff check . && python -m pytest' in ci


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18-f37072fd.pth")
    photos = tmp_path / "photos"
    photos.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(64):  # photos of several sizes, as a user's are (64: a fidelity search holds 16 out)
        h, w = 72 + 8 * (i % 3), 96 - 8 * (i % 2)
        pixels = (torch.rand(3, 1, 1, generator=gen) * 180 + torch.rand(3, h, w, generator=gen) * 75)
        Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()).save(photos / f"{i}.jpg")
    return tmp_path


def test_every_readme_command_runs(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    ran = 0
    for lang, text in blocks():
        if lang == "toml":
            name = text.splitlines()[0].removeprefix("#").strip()
            (workdir / name).write_text(text)
        elif lang == "bash":
            for line in commands(text):
                for part in line.split("&&"):
                    words = shlex.split(part)
                    if words[0] != "kshare":
                        assert words[:2] in (["pip", "install"], ["ruff", "check"], ["python", "-m"]), part
                        continue  # what CI runs
                    result = CliRunner().invoke(app, words[1:], env={"COLUMNS": "200"})
                    assert result.exit_code == 0, (part, result.output)
                    ran += 1
        elif lang == "python":
            exec(compile(text, str(README), "exec"), {"__name__": "readme"})
            ran += 1
    assert ran >= 10 and (workdir / "resnet18.shared.pt").is_file() and (workdir / "model.onnx").is_file()
    assert os.path.getsize(workdir / "model.onnx") > 0
