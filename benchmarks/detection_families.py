"""torchvision's detection and segmentation families through kshare, by name, in one run.

    python benchmarks/detection_families.py [--photos DIR] [--fit-images 24] [--held-out 8]
                                            [--models a,b,...] [--policy stage]

For every detection and segmentation builder torchvision lists (random init: no weights can be
downloaded here; `weights_backbone=None`), it prints whether kshare analyses it by name, how (FX
or the hook fallback), the sharing groups of `--policy`, the parameters before and after, and,
with `--photos` (a folder of pictures, e.g. Debian's /usr/share/backgrounds), the fidelity of
the tied model to the untied one after a data fit (`kshare.retrofit`, sequential fit, BatchNorm
`auto`) on held-out pictures the fit never read: the backbone's feature error, and per pixel
(segmentation) or per matched box (detection) agreement. Detection models are built with
`min_size=max_size=320` so that a CPU gets through the family. Prints a Markdown table
(docs/benchmarks.md keeps the last one).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torchvision

import kshare
from kshare.errors import KShareError
from kshare.models.zoo import load_model

FAMILIES = ("torchvision.models.detection", "torchvision.models.segmentation")
SMALL = {"min_size": 320, "max_size": 320}  # GeneralizedRCNN-style detectors resize to this


def family_models() -> list[str]:
    return [n for n in torchvision.models.list_models()
            if torchvision.models.get_model_builder(n).__module__.startswith(FAMILIES)]


def row(name: str, policy: str, photos: str | None, fit_images: int, held_out: int) -> list[str]:
    builder = torchvision.models.get_model_builder(name)
    kwargs = SMALL if builder.__module__.startswith(FAMILIES[0]) and not name.startswith("ssd") else {}
    started = time.perf_counter()
    try:
        model, _ = load_model(name, kwargs)
        analysis = kshare.analyze(model, policy)
    except KShareError as exc:
        return [name, f"no: {exc}", "", "", "", "", ""]
    plan = analysis.plan
    fidelity = ""
    if photos:
        report = kshare.retrofit(model, policy, f"images:{photos}", fit=kshare.FitConfig(images=fit_images),
                                 held_out=held_out, costs_of_groups=False)
        last = next((step.fidelity for step in reversed(report.steps) if step.fidelity is not None), None)
        fidelity = last.line().replace(f" on {last.images} held-out images", "") if last else "not measured"
    return [name, analysis.inspection.method, str(len(plan.groups)), f"{plan.totals.params_before / 1e6:.2f}M",
            f"{plan.totals.params_after / 1e6:.2f}M", fidelity, f"{time.perf_counter() - started:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", default=None)
    parser.add_argument("--fit-images", type=int, default=24)
    parser.add_argument("--held-out", type=int, default=8)
    parser.add_argument("--policy", default="stage")
    parser.add_argument("--models", default=None, help="comma-separated names (default: every family model)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    names = args.models.split(",") if args.models else family_models()
    print(f"| model | analysed by | groups ({args.policy}) | params before | after | fidelity after a data fit "
          "(held-out photos) | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        print("| " + " | ".join(row(name, args.policy, args.photos, args.fit_images, args.held_out)) + " |",
              flush=True)


if __name__ == "__main__":
    main()
