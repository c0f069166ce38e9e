"""Images per second of `kshare.finetune` next to a minimal hand-written PyTorch loop.

    python benchmarks/finetune_speed.py [--device cpu|cuda] [--rounds 3] [--train 4096] [--batch 128]
                                        [MODEL:POLICY ...]

Same model (tied by kshare), same data (Fashion-MNIST in memory; the bundled digits when it
is not installed), same batch size, AdamW with a cosine schedule in both. The hand-written
loop gets the easiest possible data path: the whole split normalised once up front and put on
the device, then a shuffled slice per step, no checks. On a GPU it runs in every precision and
memory format kshare could choose (fp32/bf16, NCHW/channels-last) and the *best* of them is the
reference, so the ratio also measures how well kshare's `--precision auto` chooses. kshare's
loop does what it always does (choose its setup, gather a uint8 batch on the device, adapt and
normalise it, check the loss, checkpoint after the epoch); only training time is counted in
both (kshare's one-off setup timing is printed apart). Runs alternate (kshare, hand, kshare,
...) in one process; the medians give the ratio. Targets: at least 0.9 on a GPU (ConvMixer-256/8
with kernel 9 and patch 1 at batch 256, the paper's model; resnet18), at least 0.95 on the CPU.
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
from kshare.data import FASHION_MNIST_ROOT, adapter_for, load_data
from kshare.models.zoo import load_model
from kshare.training.config import TrainConfig
from kshare.training.loop import finetune
from kshare.training.precision import Setup, candidates

CPU_CASES = ["kshare:convmixer_128_8:all", "resnet18:stage"]
GPU_CASES = ["kshare:convmixer_256_8:all", "resnet18:stage"]
KWARGS = {"kshare:convmixer_128_8": {"kernel_size": 5, "patch_size": 2},
          "kshare:convmixer_256_8": {"kernel_size": 9, "patch_size": 1}}


def hand_written(model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, config: TrainConfig, setup: Setup,
                 device: torch.device) -> float:
    """One epoch of the loop a user would write, in `setup`; returns images per second."""
    model = model.to(device, memory_format=torch.channels_last if setup.channels_last else torch.contiguous_format)
    x_all = setup.layout(x_all)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = math.ceil(len(y_all) / config.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    scaler = setup.scaler(device)
    model.train()
    order = torch.randperm(len(y_all), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for i in range(0, len(order), config.batch_size):
        idx = order[i : i + config.batch_size]
        with setup.autocast(device):
            loss = F.cross_entropy(model(x_all[idx]).float(), y_all[idx])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    sync()
    return len(y_all) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train", type=int, default=4096, help="training images per epoch")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device = kshare.training.resolve_device(args.device)
    cases = args.cases or (GPU_CASES if device.type == "cuda" else CPU_CASES)
    name = "fashion-mnist" if FASHION_MNIST_ROOT.is_dir() else "digits"
    train = load_data(name, "train").subset(args.train)
    test = load_data(name, "test").subset(64)
    config = TrainConfig(epochs=1, lr=1e-3, batch_size=args.batch)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {machine}, {name} {len(train.labels)} images, batch {args.batch}, "
          f"median of {args.rounds} alternating rounds")
    header = (f"{'model':26} {'policy':7} {'kshare img/s':>13} {'kshare setup':>20} {'hand img/s':>11} "
              f"{'hand setup':>20} {'ratio':>6} {'other s':>8}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            ref, _, policy = case.rpartition(":")
            torch.manual_seed(0)
            base = kshare.tie(load_model(ref, {"num_classes": 10, **KWARGS.get(ref, {})})[0], policy)
            adapter = adapter_for(base, train)
            x_all, y_all = adapter(train.images).to(device), train.labels.to(device)  # normalised once, on device
            setups = candidates(device)
            ours, theirs, chosen, choose = [], {s: [] for s in setups}, "", 0.0
            for index in range(args.rounds):
                model = copy.deepcopy(base)  # keeps the aliasing; finetune verifies it
                start = time.perf_counter()
                summary = finetune(model, train, test, config, Path(tmp) / f"{case}.{index}.pt", device=str(device))
                row = summary["history"][0]
                ours.append(row["images_per_s"])
                choose = time.perf_counter() - start - row["seconds"]  # setup, the test pass and the saves
                chosen = f"{row['precision']} {'cl' if row['channels_last'] else 'NCHW'}"
                for setup in setups:
                    theirs[setup].append(hand_written(copy.deepcopy(base), x_all, y_all, config, setup, device))
            a = statistics.median(ours)
            best = max(setups, key=lambda s: statistics.median(theirs[s]))
            b = statistics.median(theirs[best])
            label = f"{best.precision} {'cl' if best.channels_last else 'NCHW'}"
            print(f"{ref:26} {policy:7} {a:13,.0f} {chosen:>20} {b:11,.0f} {label:>20} {a / b:6.3f} {choose:8.1f}")


if __name__ == "__main__":
    main()
