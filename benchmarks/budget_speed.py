"""Budget-plan search time with a relaxation next to the same search without, in one run.

    python benchmarks/budget_speed.py [--budget 0.7] [--relax lora:1] [MODEL ...]

A relaxed `budget:F` plan is found by bisecting the kernel budget (about 20 searches), so
that kernels plus per-member parameters fit F; under `lora:auto`, by trying 25 kernel budgets
and buying ranks with the rest. For each model: the time of
`kshare.analyze(model, "budget:F")`, the time with `relax=...`, and their ratio.
Targets on a 2-core CPU machine: a fixed-rank relaxed search under 3x the plain one,
`lora:auto` under 6x.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import kshare
from kshare.models.zoo import build, resolve

DEFAULT_MODELS = ["resnet18", "kshare:convmixer_256_16", "timm:convnext_atto"]


def seconds(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=DEFAULT_MODELS)
    parser.add_argument("--budget", type=float, default=0.7)
    parser.add_argument("--relax", default="lora:1")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    policy = f"budget:{args.budget:g}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {policy}, relax {args.relax}")
    header = f"{'model':28} {'plain s':>8} {'relaxed s':>10} {'relaxed/plain':>14}"
    print(header)
    print("-" * len(header))
    for name in args.models:
        spec = resolve(name)
        model = build(spec)
        kshare.analyze(model, "all", spec=spec)  # one-off imports and tracing caches out of the timings
        plain = seconds(lambda: kshare.analyze(model, policy, spec=spec))  # noqa: B023
        relaxed = seconds(lambda: kshare.analyze(model, policy, spec=spec, relax=args.relax))  # noqa: B023
        print(f"{name:28} {plain:8.2f} {relaxed:10.2f} {relaxed / plain:14.1f}")


if __name__ == "__main__":
    main()
