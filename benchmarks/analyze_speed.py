"""Analysis time next to bare model-construction time, measured side by side in one run.

    python benchmarks/analyze_speed.py [--repeat 5] [MODEL ...]

For each model: the median time to build it (random init), the median time of
`kshare.analyze(model, "stage")` on the built model (trace, shape propagation, grouping),
the first analysis in the process (it pays one-off imports), and analysis / build as a ratio.
Target: resnet50 analysis under 0.5 s on a 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import kshare
from kshare.models.zoo import build, resolve

DEFAULT_MODELS = [
    "resnet50",
    "timm:resnet50",
    "timm:convnext_atto",
    "timm:efficientnet_b0",
    "timm:mobilevit_s",
    "timm:efficientvit_m0",
    "kshare:convmixer_256_16",
]


def timed(fn, repeat: int) -> tuple[float, list[float]]:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=DEFAULT_MODELS)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_grad_enabled(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeat}")
    header = f"{'model':28} {'build s':>8} {'analyze s':>10} {'first s':>8} {'analyze/build':>14} {'path':>6}"
    print(header)
    print("-" * len(header))
    for name in args.models:
        spec = resolve(name)
        build_s, _ = timed(lambda spec=spec: build(spec), args.repeat)
        model = build(spec)
        start = time.perf_counter()
        first = kshare.analyze(model, "stage", spec=spec)
        first_s = time.perf_counter() - start
        analyze_s, _ = timed(lambda model=model, spec=spec: kshare.analyze(model, "stage", spec=spec), args.repeat)
        print(
            f"{spec.ref:28} {build_s:8.3f} {analyze_s:10.3f} {first_s:8.3f} {analyze_s / build_s:14.2f}"
            f" {first.inspection.method:>6}"
        )


if __name__ == "__main__":
    main()
