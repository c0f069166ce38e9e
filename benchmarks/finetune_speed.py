"""Images per second of `kshare.finetune` next to a minimal hand-written PyTorch loop.

    python benchmarks/finetune_speed.py [--rounds 3] [--train 4096] [--batch 128] [MODEL:POLICY ...]

Same model (tied by kshare), same data (Fashion-MNIST in memory; the bundled digits when it
is not installed), same batch size, AdamW with a cosine schedule in both. The hand-written
loop gets the easiest possible data path: the whole split normalised once up front, then a
shuffled slice per step. kshare's loop does what it always does (gather a uint8 batch, adapt
and normalise it, checkpoint after the epoch); only training time is counted in both. Runs
alternate (kshare, hand, kshare, ...) in one process; the medians give the ratio.
Target: kshare at least 0.9 of the hand-written loop.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import kshare
from kshare.models.zoo import load_model
from kshare.training.data import FASHION_MNIST_ROOT, Adapter, ImageData, load_data
from kshare.training.loop import TrainConfig, finetune

DEFAULT_CASES = ["kshare:convmixer_128_8:all", "resnet18:stage"]
KWARGS = {"kshare:convmixer_128_8": {"kernel_size": 5, "patch_size": 2}}


def hand_written(model: nn.Module, data: ImageData, adapter: Adapter, config: TrainConfig) -> float:
    """One epoch of the loop a user would write; returns images per second."""
    x_all = adapter(data.images)  # normalised once, outside the timed part
    y_all = data.labels
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = math.ceil(len(y_all) / config.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    order = torch.randperm(len(y_all))
    start = time.perf_counter()
    for i in range(0, len(order), config.batch_size):
        idx = order[i : i + config.batch_size]
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return len(y_all) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=DEFAULT_CASES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train", type=int, default=4096, help="training images per epoch")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    name = "fashion-mnist" if FASHION_MNIST_ROOT.is_dir() else "digits"
    train = load_data(name, "train").subset(args.train)
    test = load_data(name, "test").subset(64)
    config = TrainConfig(epochs=1, lr=1e-3, batch_size=args.batch)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {name} {len(train.labels)} images, "
          f"batch {args.batch}, median of {args.rounds} alternating rounds")
    header = f"{'model':26} {'policy':7} {'kshare img/s':>13} {'hand img/s':>11} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            ref, _, policy = case.rpartition(":")
            torch.manual_seed(0)
            base = kshare.tie(load_model(ref, {"num_classes": 10, **KWARGS.get(ref, {})})[0], policy)
            channels = next(m for m in base.modules() if isinstance(m, nn.Conv2d)).in_channels
            adapter = Adapter.for_model(train, channels, None, augment=False)
            ours, theirs = [], []
            for _ in range(args.rounds):
                model = copy.deepcopy(base)  # keeps the aliasing; finetune verifies it
                summary = finetune(model, train, test, config, Path(tmp) / "m.pt")
                ours.append(summary["history"][0]["images_per_s"])
                model = copy.deepcopy(base)
                theirs.append(hand_written(model, train, adapter, config))
            a, b = statistics.median(ours), statistics.median(theirs)
            print(f"{ref:26} {policy:7} {a:13,.0f} {b:11,.0f} {a / b:6.3f}")


if __name__ == "__main__":
    main()
