"""torchvision's detection and segmentation families through kshare, by name, in one run.

    python benchmarks/detection_families.py [--photos DIR] [--fit-images 24] [--held-out 8]
                                            [--models a,b,...] [--fit-only a,b,...] [--policy stage]

For every detection and segmentation builder torchvision lists (random init: no weights can be
downloaded here; `weights_backbone=None`), it prints whether kshare analyses it by name, how (FX
or the hook fallback), the sharing groups of `--policy`, the parameters before and after, and,
with `--photos` (a folder of pictures, e.g. Debian's /usr/share/backgrounds), the fidelity of
the tied model to the untied one after a data fit (`kshare.retrofit`, sequential fit, BatchNorm
`auto`) on held-out pictures the fit never read: the backbone's feature error, and per pixel
(segmentation) or per matched box (detection) agreement. Detection models are built with
`min_size=max_size=320` so that a CPU gets through the family; even so a ResNet-101 segmenter's
fit takes 20 minutes on 2 cores, so `--fit-only` names the models to fit (the rest are analysed
and planned only). Prints a Markdown table
(docs/benchmarks.md keeps the last one).

No detection or segmentation weights can be downloaded here, and a randomly initialised network
is a poor stand-in for a trained one: its activations fade through the depth (BatchNorm
statistics of 0 and 1), so a segmenter predicts one class everywhere and a detector gives every
box the same score. Before anything is measured, each untied model's BatchNorm statistics are
therefore estimated on all the photos (what pretraining would have given it), and detectors
keep every box (score threshold 0): the fidelity figures then compare models with varied
outputs. They are still not a trained detector's figures (its boxes and scores mean nothing).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torchvision

import kshare
from kshare.data.feed import adapter_for
from kshare.data.sources import as_image_data
from kshare.errors import KShareError
from kshare.fit.batchnorm import recalibrate_on
from kshare.models.zoo import load_model

FAMILIES = ("torchvision.models.detection", "torchvision.models.segmentation")
SMALL = {"min_size": 320, "max_size": 320}  # GeneralizedRCNN-style detectors resize to this
EVERY_BOX = {"box_score_thresh": 0.0}  # R-CNNs; RetinaNet, FCOS and SSD name it score_thresh


def family_models() -> list[str]:
    return [n for n in torchvision.models.list_models()
            if torchvision.models.get_model_builder(n).__module__.startswith(FAMILIES)]


def row(name: str, policy: str, photos: str | None, fit_images: int, held_out: int) -> list[str]:
    """One table row; `photos` None: analysed and planned, not fitted."""
    started = time.perf_counter()
    torch.manual_seed(0)  # the same random weights on every run
    try:
        model, _ = load_model(name, detector_kwargs(name))
        if photos:
            trained_like(model, photos)
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


def detector_kwargs(name: str) -> dict[str, object]:
    """Small inputs and every box kept, for a detector; nothing for a segmenter."""
    if not torchvision.models.get_model_builder(name).__module__.startswith(FAMILIES[0]):
        return {}
    every = EVERY_BOX if "rcnn" in name else {"score_thresh": 0.0}
    return every if name.startswith("ssd") else {**SMALL, **every}


@torch.no_grad()
def trained_like(model: torch.nn.Module, photos: str, batch: int = 10) -> None:
    """Estimate the untied model's BatchNorm statistics on all the photos, fed as kshare feeds them."""
    data = as_image_data(f"images:{photos}")
    adapt = adapter_for(model, data)
    recalibrate_on(model, (adapt(data.images[s:s + batch]) for s in range(0, len(data.images), batch)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", default=None)
    parser.add_argument("--fit-images", type=int, default=24)
    parser.add_argument("--held-out", type=int, default=8)
    parser.add_argument("--policy", default="stage")
    parser.add_argument("--models", default=None, help="comma-separated names (default: every family model)")
    parser.add_argument("--fit-only", default=None, help="comma-separated names to fit (default: all with --photos)")
    args = parser.parse_args()
    fitted = set(args.fit_only.split(",")) if args.fit_only else None
    warnings.filterwarnings("ignore")
    names = args.models.split(",") if args.models else family_models()
    print(f"| model | analysed by | groups ({args.policy}) | params before | after | fidelity after a data fit "
          "(held-out photos) | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        photos = args.photos if fitted is None or name in fitted else None
        cells = row(name, args.policy, photos, args.fit_images, args.held_out)
        if args.photos and photos is None:
            cells[5] = "not fitted (--fit-only)"
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
