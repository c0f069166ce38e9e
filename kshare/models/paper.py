"""The two CIFAR architectures of Azadbakht et al. (arXiv 2210.14151), as their public code
builds them, each in an unshared and a shared variant.

- ConvMixer: patch-embedding conv, then `depth` blocks of
  `Residual(depthwise conv, GELU, BN)`, pointwise conv, GELU, BN; average pool, linear head.
  On CIFAR the paper uses kernel 9 and patch 1. Shared: every block's depthwise conv uses one
  weight and bias, every pointwise conv another.
- SE-ResNet for CIFAR: a 3x3 stem to 16 channels, three stages of `depth` squeeze-excitation
  basic blocks at 64/128/256 channels (stride 1, 2, 2), average pool, linear head. Shared: in
  each stage, every 3x3 conv from `planes` to `planes` uses one weight (the stage's first
  conv1, which changes the channel count, keeps its own).

These models are kshare's reference points: `kshare:convmixer_256_16` analysed under `all`
must save exactly what `kshare:convmixer_256_16_shared` stores.
"""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    """`fn(x) + x`, the skip connection around ConvMixer's depthwise conv."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def convmixer(
    dim: int,
    depth: int,
    kernel_size: int = 9,
    patch_size: int = 1,
    num_classes: int = 10,
    in_chans: int = 3,
    shared: bool = False,
) -> nn.Sequential:
    """ConvMixer-dim/depth; `shared=True` ties the blocks' kernels as the paper does."""
    padding = (kernel_size - 1) // 2
    dw_shared = nn.Conv2d(dim, dim, kernel_size, groups=dim, padding=padding) if shared else None
    pw_shared = nn.Conv2d(dim, dim, kernel_size=1) if shared else None
    blocks = []
    for _ in range(depth):
        dw = nn.Conv2d(dim, dim, kernel_size, groups=dim, padding=padding)
        pw = nn.Conv2d(dim, dim, kernel_size=1)
        if dw_shared is not None and pw_shared is not None:
            dw.weight, dw.bias = dw_shared.weight, dw_shared.bias
            pw.weight, pw.bias = pw_shared.weight, pw_shared.bias
        blocks.append(
            nn.Sequential(
                Residual(nn.Sequential(dw, nn.GELU(), nn.BatchNorm2d(dim))),
                pw,
                nn.GELU(),
                nn.BatchNorm2d(dim),
            )
        )
    return nn.Sequential(
        nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size),
        nn.GELU(),
        nn.BatchNorm2d(dim),
        *blocks,
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(dim, num_classes),
    )


class SqueezeExcitation(nn.Module):
    """Channel gating: global average, bottleneck MLP without bias, sigmoid, rescale."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.size()
        y = self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)
        return x * y.expand_as(x)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class SEBasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN-SE plus a skip (1x1 conv + BN when the width changes), ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int, shared: nn.Parameter | None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        if shared is not None and inplanes == planes:
            self.conv1.weight = shared
        self.bn1 = nn.BatchNorm2d(planes, momentum=0.1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        if shared is not None:
            self.conv2.weight = shared
        self.bn2 = nn.BatchNorm2d(planes, momentum=0.1)
        self.se = SqueezeExcitation(planes, 16)
        self.downsample: nn.Module = nn.Identity()
        if inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, momentum=0.1),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        out = out + self.downsample(x)
        return self.relu(out)


class SEResNetCifar(nn.Module):
    """The paper's CIFAR SE-ResNet with `depth` blocks per stage."""

    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3, shared: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16, momentum=0.1)
        self.relu = nn.ReLU(inplace=True)
        inplanes = 16
        stages = []
        for planes, stride in ((64, 1), (128, 2), (256, 2)):
            weight = nn.Parameter(_conv3x3(planes, planes).weight.detach().clone()) if shared else None
            blocks = []
            for i in range(depth):
                blocks.append(SEBasicBlock(inplanes, planes, stride if i == 0 else 1, weight))
                inplanes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        return self.fc(x.view(x.size(0), -1))


def se_resnet_cifar(depth: int, num_classes: int = 10, in_chans: int = 3, shared: bool = False) -> SEResNetCifar:
    """SE-ResNet for CIFAR with `depth` blocks per stage (the paper uses 2 to 10)."""
    return SEResNetCifar(depth, num_classes=num_classes, in_chans=in_chans, shared=shared)
