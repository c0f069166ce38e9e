"""Wall time of a data-aware fit (`kshare.fit_and_tie`), next to one forward pass over the same
calibration images (the least any data fit must do).

    python benchmarks/fit_speed.py [--device cpu|cuda] [--images 1024] [MODEL:POLICY:SIZE ...]

Per case and mode (one-shot, sequential): the fit's wall time (statistics, solves, tying,
BatchNorm re-estimation), the forward pass, and their ratio. Random-init models: the time of a
fit does not depend on what the weights learned. Targets: resnet18 `stage` from 1,024
Fashion-MNIST-sized images (32x32) in under 60 s on the 2-core CPU machine; resnet50 `stage`
from 1,024 images at 224x224 in under 3 minutes on that CPU (one-shot) and under 30 s on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

import kshare
from kshare import FitConfig, fit_and_tie
from kshare.data import ImageData
from kshare.models.zoo import load_model

CASES = ["resnet18:stage:32", "resnet50:stage:224"]
CPU_MODES = {"resnet50": ("oneshot",)}  # the sequential fit's passes over a 224x224 resnet50 take a GPU


def images(n: int, size: int) -> ImageData:
    gen = torch.Generator().manual_seed(0)
    return ImageData("random", "train", torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8),
                     torch.zeros(n, dtype=torch.long), ("x",), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), labelled=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=CASES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=1024)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device = kshare.training.resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {machine}, {args.images} calibration images")
    header = f"{'model':10} {'policy':7} {'size':>5} {'mode':11} {'fit s':>8} {'forward s':>10} {'fit/forward':>12}"
    print(header)
    print("-" * len(header))
    for case in args.cases:
        name, policy, size = case.split(":")
        torch.manual_seed(0)
        base = load_model(name)[0].eval().to(device)
        data = images(args.images, int(size))
        plan = kshare.plan(base, policy, input_size=(3, int(size), int(size)))
        x = data.images.float().div(255).to(device)
        with torch.no_grad():
            base(x[:256])  # warm-up: kernel selection and allocation stay out of the timed pass
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(x), 256):
                base(x[i : i + 256])
        sync()
        forward = time.perf_counter() - start
        modes = CPU_MODES.get(name) if device.type == "cpu" else None
        for mode in modes or ("oneshot", "sequential"):
            model = copy.deepcopy(base)
            sync()
            report = fit_and_tie(model, plan, data, FitConfig(mode=mode, images=args.images), device=device)
            sync()
            print(f"{name:10} {policy:7} {size:>5} {mode:11} {report.seconds:8.1f} {forward:10.1f} "
                  f"{report.seconds / forward:12.1f}")


if __name__ == "__main__":
    main()
