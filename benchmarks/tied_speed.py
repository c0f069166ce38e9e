"""Training-step and inference time of a tied model over its untied original.

    python benchmarks/tied_speed.py [--rounds 10] [--batch 16] [MODEL:POLICY:SIZE ...]

Both models live in one process and are timed in alternating runs (untied, tied, untied,
...), so drift in machine load hits both alike. Sharing adds no FLOPs: the target ratio
(tied / untied, medians) is at most 1.02.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

import kshare
from kshare.models.zoo import load_model

DEFAULT_CASES = ["resnet18:all:3,128,128", "kshare:convmixer_256_8:all:3,32,32", "timm:convnext_atto:stage:3,128,128"]


def step_timer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool) -> float:
    """Seconds for one training step (forward, backward, SGD step) or one inference pass."""
    if train:
        model.train()
        opt = model._bench_opt  # type: ignore[attr-defined]
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    else:
        model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            model(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=DEFAULT_CASES)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"median of {args.rounds} alternating rounds")
    header = f"{'model':28} {'policy':7} {'params':>14} {'train ms':>17} {'ratio':>6} {'infer ms':>17} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for case in args.cases:
        name, _, rest = case.rpartition(":")
        name, _, policy = name.rpartition(":")
        size = tuple(int(d) for d in rest.split(","))
        torch.manual_seed(0)
        untied, _ = load_model(name)
        tied = kshare.tie(copy.deepcopy(untied), policy, input_size=size)
        for m in (untied, tied):
            m._bench_opt = torch.optim.SGD(m.parameters(), lr=1e-3)  # type: ignore[attr-defined]
        x = torch.randn(args.batch, *size)
        y = torch.randint(0, 10, (args.batch,))
        results = {}
        for train in (True, False):
            times: dict[str, list[float]] = {"untied": [], "tied": []}
            for model in (untied, tied):  # warm-up
                step_timer(model, x, y, train)
            for _ in range(args.rounds):
                times["untied"].append(step_timer(untied, x, y, train))
                times["tied"].append(step_timer(tied, x, y, train))
            results[train] = (statistics.median(times["untied"]) * 1e3, statistics.median(times["tied"]) * 1e3)
        counts = f"{sum(p.numel() for p in untied.parameters()) / 1e6:.2f}M→" \
                 f"{sum(p.numel() for p in tied.parameters()) / 1e6:.2f}M"
        (tu, tt), (iu, it) = results[True], results[False]
        print(f"{name:28} {policy:7} {counts:>14} {tu:8.1f}→{tt:8.1f} {tt / tu:6.3f} "
              f"{iu:8.1f}→{it:8.1f} {it / iu:6.3f}")


if __name__ == "__main__":
    main()
