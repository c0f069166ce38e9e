"""How long a data-aware fit takes, as ratios measured side by side in one run: the sequential
fit (activations cached at cuts, the default), the progressive fit (member by member, one move
of the cached streams through the network), the sequential fit running every pass from the
input, the one-shot fit, and one plain forward of the untied model over the same batches.

    python benchmarks/fit_speed.py [--device cpu|cuda] [--cache-memory GIB] [--no-uncached]
                                   [MODEL:POLICY:SIZE:IMAGES ...]

Per case: seconds of each, then sequential / one-shot, sequential / forward, progressive /
forward, one-shot / forward and uncached / cached, and the peak resident memory above the start of each fit next
to the cache budget and where the caches were kept. The fit is `fit_kernels` alone (statistics,
solves, tying): BatchNorm re-estimation and fidelity are the pipeline's and are not timed here.
The forward runs the fit's own batches (channels-last on the CPU, batches of 256). Random-init
models and random images: a fit's time does not depend on what the weights learned. Goals:
sequential <= 2.0x one forward, one-shot <= 1.3x.
"""

from __future__ import annotations

import argparse
import copy
import os
import threading
import time
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

import kshare
from kshare import FitConfig
from kshare.data import ImageData, adapter_for
from kshare.fit.order import fit_kernels
from kshare.fit.statistics import fit_batches
from kshare.models.zoo import load_model

CASES = ["resnet18:stage:32:512", "kshare:convmixer_256_8:all:32:512", "timm:tf_efficientnet_lite0:stage:256:128",
         "resnet50:stage:224:128"]
T = TypeVar("T")
UNCACHED_SKIPPED = {"resnet50"}  # one pass per group from the input: too slow to time on 2 CPU cores


def images(n: int, size: int) -> ImageData:
    gen = torch.Generator().manual_seed(0)
    return ImageData("random", "train", torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8),
                     torch.zeros(n, dtype=torch.long), ("x",), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), labelled=False)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measured(run: Callable[[], T], sync: Callable[[], None]) -> tuple[float, float, T]:
    """Seconds of `run()`, the peak resident memory above the start in GiB (sampled every 20 ms),
    and what `run()` returned."""
    start_rss, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss() - start_rss)
            time.sleep(0.02)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    sync()
    start = time.perf_counter()
    result = run()
    sync()
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    return seconds, max(peak[0], _rss() - start_rss) / 2**30, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=CASES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-memory", type=float, default=4.0, help="GiB (FitConfig.cache_memory)")
    parser.add_argument("--no-uncached", action="store_true", help="skip the fit that runs every pass from the input")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device = kshare.training.resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {machine}, cache budget {args.cache_memory:g} GiB")
    rows = []
    for case in args.cases:
        *name_parts, policy, size, count = case.split(":")
        name, size_, n = ":".join(name_parts), int(size), int(count)
        torch.manual_seed(0)
        base = load_model(name)[0].eval().to(device)
        data = images(n, size_)
        plan = kshare.plan(base, policy, input_size=(3, size_, size_))
        batches = fit_batches(data, n, 256, adapter_for(base, data), device)
        with torch.no_grad():
            base(batches[0])  # warm-up: kernel selection and allocation stay out of the timed pass

        seconds, _, _ = measured(lambda base=base, batches=batches: _forward(base, batches), sync)
        times = {"forward": seconds}
        peaks: dict[str, float] = {}
        kept = "-"
        modes = [("oneshot", True), ("sequential", True), ("progressive", True)]
        if not args.no_uncached and name not in UNCACHED_SKIPPED:
            modes.append(("sequential", False))
        for mode, cache in modes:
            model = copy.deepcopy(base)
            config = FitConfig(mode=mode, images=n, cache=cache, cache_memory=int(args.cache_memory * 2**30))
            key = mode if cache else "uncached"
            times[key], peaks[key], report = measured(lambda model=model, config=config, plan=plan, batches=batches:
                                                      fit_kernels(model, plan, batches, config), sync)
            if key == "sequential":
                kept = report.cache
        rows.append((case, times, peaks, kept))
        _print(rows[-1])
    print()
    print("| case | forward s | one-shot s | sequential s | progressive s | uncached s | seq / one-shot | "
          "seq / forward | progressive / forward | one-shot / forward | uncached / seq | peak GiB (seq, prog) | "
          "caches |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for case, times, peaks, kept in rows:
        unc = times.get("uncached")
        speedup = f"{unc / times['sequential']:.2f}" if unc else "-"
        print(f"| {case} | {times['forward']:.1f} | {times['oneshot']:.1f} | {times['sequential']:.1f} | "
              f"{times['progressive']:.1f} | {f'{unc:.1f}' if unc else '-'} | "
              f"{times['sequential'] / times['oneshot']:.2f} | {times['sequential'] / times['forward']:.2f} | "
              f"{times['progressive'] / times['forward']:.2f} | {times['oneshot'] / times['forward']:.2f} | "
              f"{speedup} | {peaks['sequential']:.2f}, {peaks['progressive']:.2f} | {kept} |")


@torch.no_grad()
def _forward(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    for x in batches:
        model(x)


def _print(row: tuple[str, dict[str, float], dict[str, float], str]) -> None:
    case, times, peaks, kept = row
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
    print(f"{case}: {parts}; sequential peak +{peaks['sequential']:.2f} GiB, caches {kept}", flush=True)


if __name__ == "__main__":
    main()
