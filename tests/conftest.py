"""Shared fixtures: small models written here, so tests need no downloads."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import kshare


class DataDependentNet(nn.Module):
    """A user model FX cannot trace: the branch taken depends on the input's values."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.c = nn.Conv2d(32, 32, 3, padding=1)
        self.d = nn.Conv2d(32, 32, 3, padding=1)
        self.unused = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        if x.mean() > -1e9:  # always true, but only a real tensor can say so
            x = torch.relu(self.a(x))
        x = torch.relu(self.b(x))
        x = torch.relu(self.down(x))
        x = torch.relu(self.d(torch.relu(self.c(x))))
        return self.head(x.mean((2, 3)))


class PlainNet(nn.Module):
    """The same layers without the data-dependent branch: FX can trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = DataDependentNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.body
        x = torch.relu(m.a(torch.relu(m.stem(x))))
        x = torch.relu(m.down(torch.relu(m.b(x))))
        x = torch.relu(m.d(torch.relu(m.c(x))))
        return m.head(x.mean((2, 3)))


def make_data_dependent(**kwargs: object) -> nn.Module:
    return DataDependentNet()


class ResidualBNNet(nn.Module):
    """Residual blocks of isomorphic 3x3 convs with batch norm, and a conv the forward never uses
    (DDP must then search for unused parameters while the blocks share one kernel)."""

    def __init__(self, in_chans: int = 1, width: int = 32, depth: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            for _ in range(depth)
        )
        self.unused = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean((2, 3)))


def make_residual_bn(**kwargs: int) -> nn.Module:
    return ResidualBNNet(**kwargs)


def make_residual_bn_used(**kwargs: int) -> nn.Module:
    """The same blocks without the conv the forward never uses: every conv can be fitted to data."""
    model = ResidualBNNet(**kwargs)
    del model.unused
    return model


class NanOnRankOne(nn.Module):
    """Under torchrun, rank 1's output turns NaN from its third training forward; rank 0's never."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.conv(x).mean((2, 3)))
        if self.training and os.environ.get("RANK") == "1":
            self.calls += 1
            if self.calls > 2:
                return out * float("nan")
        return out


def make_nan_on_rank_one() -> nn.Module:
    return NanOnRankOne()


class StagedNet(nn.Module):
    """Three stages of two residual 3x3 conv blocks at widths 8, 16, 24: three sharing groups."""

    def __init__(self) -> None:
        super().__init__()
        widths = (8, 16, 24)
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, padding=1), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.stages = nn.ModuleList()
        self.downs = nn.ModuleList()
        for i, w in enumerate(widths):
            self.downs.append(nn.Identity() if i == 0 else nn.Conv2d(widths[i - 1], w, 3, stride=2, padding=1))
            self.stages.append(nn.ModuleList(
                nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()) for _ in range(2)))
        self.head = nn.Linear(widths[-1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for down, blocks in zip(self.downs, self.stages, strict=True):
            x = down(x)
            for block in blocks:
                x = x + block(x)
        return self.head(x.mean((2, 3)))


def make_staged() -> nn.Module:
    return StagedNet()


@pytest.fixture
def data_dependent_net() -> nn.Module:
    torch.manual_seed(0)
    return DataDependentNet()


@pytest.fixture
def plain_net() -> nn.Module:
    torch.manual_seed(0)
    return PlainNet()


@pytest.fixture(scope="module")
def digits() -> tuple[kshare.ImageData, kshare.ImageData]:
    return kshare.load_data("digits", "train"), kshare.load_data("digits", "test")


@pytest.fixture(scope="module")
def trained(digits: tuple[kshare.ImageData, kshare.ImageData], tmp_path_factory: pytest.TempPathFactory
            ) -> nn.Module:
    """Residual blocks of isomorphic 3x3 convs with BatchNorm, trained for a few epochs on digits."""
    torch.manual_seed(0)
    model = make_residual_bn_used(in_chans=1, width=16, depth=3)
    kshare.finetune(model, *digits, kshare.TrainConfig(epochs=3, lr=3e-3, batch_size=64),
                    tmp_path_factory.mktemp("trained") / "m.pt", device="cpu")
    return model.eval()


@pytest.fixture(autouse=True)
def _everything_on_a_fake_gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`KSHARE_FAKE_CUDA=1 pytest`: every test runs with the stand-in GPU of tests/fakecuda.py
    present, so the commands that default to the GPU use it (a survey of the GPU path; tests
    that train fail with `FakeCudaLimit`, which the stand-in cannot run)."""
    if os.environ.get("KSHARE_FAKE_CUDA") != "1":
        yield
        return
    from fakecuda import fake_cuda

    with fake_cuda(monkeypatch):
        yield
