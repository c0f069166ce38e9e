"""Reproduce the paper's claims, and the retrofit experiment, on real data; publish the results.

    python examples/reproduce_paper.py                      # the CPU study on Fashion-MNIST
    python examples/reproduce_paper.py --data cifar10 --data-root ~/data --preset paper   # GPU
    python examples/reproduce_paper.py --preset smoke --out /tmp/s.json --docs /tmp/docs

Writes the study JSON (every run: seed, parameters, file bytes, train and test accuracy,
time, per-epoch history), then `results.md` and PNG plots under --docs. An interrupted study
continues where it stopped when run again with the same --out.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from paper_study import Arch, Study, read_study, run_study
from results_page import plot, results_page

from kshare.errors import KShareError

PRESETS = {
    # Fits the project's 2-core CPU machine in under an hour (docs/results.md says how long).
    "cpu": Study(
        archs=(
            Arch("ConvMixer-64/8", "kshare:convmixer_64_8", {"kernel_size": 5, "patch_size": 2}, epochs=4,
                 lr=3e-3),
            Arch("SE-ResNet d2", "kshare:se_resnet_cifar_d2", {}, epochs=4, lr=3e-3, image_size=16),
        ),
        train_limit=6_000,
        test_limit=5_000,
        train_eval_limit=3_000,
    ),
    # The paper's CIFAR models (kernel 9, patch 1 for ConvMixer) and budget, for a GPU.
    "paper": Study(
        archs=(
            Arch("ConvMixer-256/16", "kshare:convmixer_256_16", {"kernel_size": 9, "patch_size": 1}, epochs=200,
                 lr=1e-2),
            Arch("SE-ResNet d2", "kshare:se_resnet_cifar_d2", {}, epochs=200, lr=1e-2),
        ),
    ),
    # The paper's code's ConvMixer-256/8 (kernel 9, patch 1) on all of Fashion-MNIST: one GPU, under
    # an hour (not run yet: no GPU was lent to the work that added it).
    "gpu": Study(
        archs=(
            Arch("ConvMixer-256/8", "kshare:convmixer_256_8", {"kernel_size": 9, "patch_size": 1}, epochs=20,
                 lr=1e-2, batch_size=256),
        ),
        policies=("all", "stage"),
    ),
    # Seconds: for the test suite.
    "smoke": Study(
        archs=(
            Arch("ConvMixer-32/2", "kshare:convmixer_32_2", {"kernel_size": 3, "patch_size": 2}, epochs=1,
                 lr=3e-3, batch_size=64),
            Arch("SE-ResNet d2", "kshare:se_resnet_cifar_d2", {}, epochs=1, lr=3e-3, batch_size=64, image_size=12),
        ),
        seeds=(0,),
        inits=("first", "mean"),
        train_limit=256,
        test_limit=128,
        train_eval_limit=128,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--data", help="fashion-mnist (default), cifar10, cifar100, imagefolder:PATH, digits")
    parser.add_argument("--data-root", help="folder holding the dataset")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the preset's)")
    parser.add_argument("--out", type=Path, default=Path("results/paper_study.json"), help="study JSON")
    parser.add_argument("--work", type=Path, help="where checkpoints go (default: next to --out)")
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="folder for results.md and img/")
    parser.add_argument("--no-docs", action="store_true", help="write only the JSON")
    parser.add_argument("--sweep", type=Path, nargs="+", default=[],
                        help="`kshare sweep` JSON file(s) to publish as section 3")
    parser.add_argument("--sweep-script", type=Path, help="the script that made the sweep's baseline and JSON")
    parser.add_argument("--retrofit", type=Path, nargs="+", default=[],
                        help="the retrofit study's JSON file(s) (examples/retrofit_study.py), published as section 4")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    study = PRESETS[args.preset]
    if args.data:
        study = replace(study, data=args.data, data_root=args.data_root)
    elif args.data_root:
        study = replace(study, data_root=args.data_root)
    if args.seeds:
        try:
            seeds = tuple(int(s) for s in args.seeds.split(","))
        except ValueError:
            print(f"error: --seeds takes integers separated by commas, not {args.seeds!r}", file=sys.stderr)
            return 2
        study = replace(study, seeds=seeds, retrofit_seeds=seeds[:1])
    work = args.work or args.out.with_suffix("")
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        run_study(study, args.out, work)
        if not args.no_docs:
            header, records = read_study(args.out)
            images = plot(records, args.docs / "img", prefix=args.preset)
            command = "python examples/reproduce_paper.py " + shlex.join(argv if argv is not None else sys.argv[1:])
            page = results_page(header, records, study, command.strip(), images, args.docs, args.sweep,
                                args.sweep_script, args.retrofit)
            name = "results.md" if args.preset == "cpu" else f"results_{args.preset}.md"
            (args.docs / name).write_text(page)
            print(f"wrote {args.out}, {args.docs / name} and {len(images)} plots")
    except KShareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
