"""The data-aware retrofit on trained baselines, as data: tie, fit, recalibrate, fine-tune briefly.

    python examples/retrofit_study.py --only ResNet-18 --out docs/results/retrofit_resnet18.json
    python examples/retrofit_study.py --only "DenseNet small" --out docs/results/retrofit_densenet.json
    python examples/retrofit_study.py --only ConvMixer-64/8 --out docs/results/retrofit_convmixer.json
    python examples/retrofit_study.py --preset converged --out docs/results/retrofit_resnet18_converged.json
    python examples/retrofit_study.py --preset features --out docs/results/retrofit_resnet18_features.json
    python examples/retrofit_study.py --preset reconstruct --out docs/results/retrofit_resnet18_reconstruct.json
    python examples/retrofit_study.py --preset reconstruct_small --out docs/results/retrofit_small_reconstruct.json
    python examples/retrofit_study.py --preset tradeoff --out docs/results/retrofit_resnet18_tradeoff.json
    python examples/retrofit_study.py --preset tradeoff_small --out docs/results/retrofit_small_tradeoff.json
    python examples/retrofit_study.py --preset smoke --out /tmp/r.json  # seconds, for the tests

Each baseline is trained untied by `kshare.finetune` (or reused from --work when its
checkpoint is there), then tied with each policy (`stage`, `all`, and a budget plan matched to
`stage`'s stored size, or `budget≈N%`, to N% of the untied network's, plain and with
`lora:auto`, grouped by weight error or, `@data`, by output error on the calibration images)
and each init: the weight-space `mean` and
`norm_mean`, and the data-aware one-shot and sequential fits (`kshare.fit.order`), each
from a calibration sample per seed; `reconstructed` is the sequential fit followed by block
reconstruction on the same images (`kshare.fit.blocks`, BatchNorm re-estimated
first). Every point is measured right after tying, after BatchNorm recalibration on the same
calibration images, and (for the `finetune_inits`) after short distillation fine-tunes of a
share of the baseline's own optimiser steps. Every record goes to the JSON as it is made; a
rerun with the same settings skips what is there.
`retrofit_pages.py` renders the JSON as section 4 of docs/results.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from paper_study import Arch, machine
from torch import nn

import kshare
from kshare.data import adapter_for
from kshare.errors import KShareError, StudyError
from kshare.fit import FitConfig, output_metric
from kshare.sweep import matched_budget

STUDY_FORMAT = "kshare.retrofit-study/1"
INITS = ("mean", "norm_mean", "oneshot", "sequential")


@dataclass(frozen=True)
class Baseline(Arch):
    """One trained network: the paper study's architecture and budget, on a sample of the data."""

    train_limit: int | None = None


@dataclass(frozen=True)
class Study:
    baselines: tuple[Baseline, ...]
    data: str = "fashion-mnist"
    # `@data`: the budget plan groups kernels (and allots delta ranks) by output error on the
    # calibration images of seed 0; fitted by the sequential fit only
    policies: tuple[str, ...] = ("stage", "all", "budget≈stage", "budget≈stage+lora:auto", "budget≈stage@data",
                                 "budget≈stage+lora:auto@data")
    inits: tuple[str, ...] = INITS
    seeds: tuple[int, ...] = (0, 1, 2)
    calib_images: int = 512
    test_limit: int | None = None
    finetunes: tuple[tuple[str, tuple[float, ...]], ...] = (("stage", (0.01, 0.05, 0.10)), ("all", (0.05,)))
    finetune_inits: tuple[str, ...] = ("mean", "sequential")  # (shares: of the baseline's optimiser steps)
    finetune_lr: float = 3e-4
    finetune_warmup: float = 0.0  # share of a fine-tune's steps with a linear lr warmup
    finetune_feature_weight: float = 0.0  # weight of matching the untied network's block outputs
    reconstruct: int = 0  # block reconstruction steps per unit of the `reconstructed` init


@dataclass
class Record:
    key: str
    baseline: str
    policy: str
    init: str
    seed: int
    stage: str  # "tied" (right after tying or fitting), "recalibrated", or "finetuned"
    acc: float
    params: int
    steps: int = 0  # fine-tune optimiser steps
    seconds: float = 0.0  # the fit's (or recalibration's, or fine-tune's) wall time
    output_error: float | None = None  # mean relative output error of the groups (data fits)


SMALL_BASELINES = (
    Baseline("DenseNet small", "torchvision.models.densenet:DenseNet",
             {"growth_rate": 12, "block_config": (4, 4, 4), "num_init_features": 24, "num_classes": 10},
             epochs=5, lr=3e-3, train_limit=6000),
    # the paper's own family, where data-free retrofit did worst in the published sweeps
    Baseline("ConvMixer-64/8", "kshare:convmixer_64_8", {"in_chans": 1, "kernel_size": 5, "patch_size": 2},
             epochs=4, lr=3e-3, train_limit=6000),
)
# budget plans at three sizes, grouped by weight error and (`@data`) by output error
TRADEOFF_SMALL = tuple(f"budget≈{n}%{by}" for by in ("", "@data") for n in (40, 60, 80))
PRESETS = {
    "cpu": Study(baselines=(
        Baseline("ResNet-18", "resnet18", {"num_classes": 10}, epochs=2, lr=1e-3, image_size=32),
        *SMALL_BASELINES)),
    # the "trained to convergence": a cosine schedule three times as long, so that 5% of its
    # steps is a real fine-tune (the 2-epoch baseline above is the one `kshare apply --fit data` shows)
    "converged": Study(
        baselines=(Baseline("ResNet-18 6-epoch", "resnet18", {"num_classes": 10}, epochs=6, lr=1e-3,
                            image_size=32),),
        # a quarter of the steps warming up: AdamW's first steps move every weight by about lr, which a
        # fitted model pays for (47 steps on the 2-epoch baseline, 1 seed: 88.33% without, 88.66% with)
        finetunes=(("stage", (0.01, 0.05, 0.10)),), finetune_inits=("sequential", "mean"), finetune_warmup=0.25),
    # the converged baseline's sequential `stage` fit, fine-tuned with feature matching as well as
    # logit distillation (1 seed, 141 steps: 90.67% without, 90.77% at weight 1, 90.88% at weight 10)
    "features": Study(
        baselines=(Baseline("ResNet-18 6-epoch", "resnet18", {"num_classes": 10}, epochs=6, lr=1e-3,
                            image_size=32),),
        policies=("stage",), inits=("sequential",), finetunes=(("stage", (0.01, 0.05)),),
        finetune_inits=("sequential",), finetune_warmup=0.25, finetune_feature_weight=10.0),
    # the same fit, then block reconstruction (400 Adam steps per stage on the calibration images, no
    # labels) before the feature-matching fine-tune (1 seed, 1,024 images: 89.15% → 90.70% on 2,000
    # test images; 141 fine-tune steps after it: 91.15%, from the fit alone 90.88%)
    "reconstruct": Study(
        baselines=(Baseline("ResNet-18 6-epoch", "resnet18", {"num_classes": 10}, epochs=6, lr=1e-3,
                            image_size=32),),
        policies=("stage",), inits=("sequential", "reconstructed"), finetunes=(("stage", (0.01, 0.05)),),
        finetune_inits=("reconstructed",), finetune_warmup=0.25, finetune_feature_weight=10.0, reconstruct=400),
    # the same reconstruction on the small DenseNet and ConvMixer of the "cpu" preset, where the fits
    # alone keep least: sequential fit against fit + reconstruction, each fine-tuned as there
    "reconstruct_small": Study(
        baselines=SMALL_BASELINES, policies=("stage", "all"), inits=("sequential", "reconstructed"),
        finetunes=(("stage", (0.05,)), ("all", (0.05,))), finetune_inits=("sequential", "reconstructed"),
        reconstruct=400),
    # how much sharing a 5% fine-tune can take back: budget plans that store more than `stage` (2.29x
    # fewer parameters; its row under the same fit and fine-tune is the "features" preset's), from
    # layers 3 and 4 shared down to layer 4 alone, and layer 4 shared with fitted low-rank deltas
    "tradeoff": Study(
        baselines=(Baseline("ResNet-18 6-epoch", "resnet18", {"num_classes": 10}, epochs=6, lr=1e-3,
                            image_size=32),),
        policies=("budget≈50%", "budget≈60%", "budget≈70%+lora:auto"), inits=("sequential",),
        finetunes=(("budget≈50%", (0.05,)), ("budget≈60%", (0.05,)), ("budget≈70%+lora:auto", (0.05,))),
        finetune_inits=("sequential",), finetune_warmup=0.25, finetune_feature_weight=10.0),
    # the same question on the small DenseNet and ConvMixer (`stage` stores 56% and 18% of them), fine-tuned as
    # in the "cpu" preset
    "tradeoff_small": Study(
        baselines=SMALL_BASELINES, policies=TRADEOFF_SMALL, inits=("sequential",),
        finetunes=tuple((p, (0.05,)) for p in TRADEOFF_SMALL), finetune_inits=("sequential",)),
    "smoke": Study(
        baselines=(Baseline("ConvMixer-16/3", "kshare:convmixer_16_3",
                            {"in_chans": 1, "kernel_size": 3, "patch_size": 1}, epochs=4, lr=3e-3, batch_size=64),),
        data="digits", policies=("all", "budget≈all", "budget≈all@data"), inits=("mean", "sequential", "reconstructed"),
        seeds=(0, 1), calib_images=128, finetunes=(("all", (0.5,)),), test_limit=200, reconstruct=10),
}


class StudyFile:
    """Settings, machine and records, rewritten after each record; a rerun skips what is there."""

    def __init__(self, path: Path, study: Study) -> None:
        self.path, self.study, self.records, self.notes = path, study, {}, {}
        self.machine = machine()
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("format") != STUDY_FORMAT or with_defaults(data.get("study")) != jsonable(study):
                raise StudyError(f"{path} holds another study or other settings: pass another --out, or delete it")
            self.records = {r["key"]: Record(**r) for r in data["records"]}
            self.notes, self.machine = data.get("notes", {}), data.get("machine") or self.machine

    def add(self, record: Record) -> None:
        self.records[record.key] = record
        self.machine = merge_machines(self.machine, machine())  # a resumed study may run elsewhere
        self.write()

    def write(self) -> None:
        payload = {"format": STUDY_FORMAT, "study": jsonable(self.study), "machine": self.machine,
                   "notes": self.notes, "records": [asdict(r) for r in self.records.values()]}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(self.path)


def merge_machines(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The machine of a study resumed with other settings (e.g. another thread count): each value
    that differs becomes the sorted list of the values seen."""
    merged = dict(stored)
    for key, value in current.items():
        seen = stored.get(key)
        values = set(seen if isinstance(seen, list) else [seen] if key in stored else [])
        values.add(value)
        merged[key] = value if len(values) == 1 else sorted(values, key=str)
    return merged


def jsonable(study: Study) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(study)))


def with_defaults(stored: Any) -> Any:
    """Study settings as stored, with the fields added since then at their defaults (which is what
    the file was made with)."""
    if not isinstance(stored, dict):
        return stored
    defaults = {f.name: f.default for f in dataclasses.fields(Study) if f.default is not dataclasses.MISSING}
    return {**json.loads(json.dumps(defaults)), **stored}


def command_for(path: str | Path, stored: dict[str, Any]) -> str:
    """The command that makes (or resumes) the study file at `path`: the preset and baseline whose
    settings it holds."""
    settings = with_defaults(stored)
    for name, study in PRESETS.items():
        preset = "" if name == "cpu" else f" --preset {name}"
        for base in study.baselines:
            if jsonable(dataclasses.replace(study, baselines=(base,))) == settings:
                return f"python examples/retrofit_study.py{preset} --only \"{base.label}\" --out {path}"
        if jsonable(study) == settings:  # every baseline of the preset in one file
            return f"python examples/retrofit_study.py{preset} --out {path}"
    raise StudyError(f"{path} was made with settings no preset has")


def read_study(path: str | Path) -> tuple[dict[str, Any], list[Record]]:
    data = json.loads(Path(path).read_text())
    if data.get("format") != STUDY_FORMAT:
        raise StudyError(f"{path} is not a retrofit study file")
    return data, [Record(**r) for r in data["records"]]


def train_baseline(base: Baseline, study: Study, work: Path, train: kshare.ImageData, test: kshare.ImageData
                   ) -> tuple[nn.Module, dict[str, Any]]:
    """The untied baseline, trained by `kshare.finetune` (reused when its checkpoint is there)."""
    path = work / f"{base.slug}.ft.pt"
    if path.is_file():
        model = kshare.load(path)
    else:
        torch.manual_seed(0)
        model = kshare.load_model(base.ref, base.kwargs)[0]
        sample = train.subset(base.train_limit)
        config = kshare.TrainConfig(epochs=base.epochs, lr=base.lr, batch_size=base.batch_size,
                                    image_size=base.image_size)
        kshare.finetune(model, sample, test, config, path, device="cpu")
        model = kshare.load(path)
    record = torch.load(path, weights_only=True)["extra"]["finetune"]
    images = record.get("train_images", len(train.labels))
    steps = record["epoch"] * math.ceil(images / record["config"]["batch_size"])
    return model.eval(), {"steps": steps, "train_images": images, "epochs": record["epoch"],
                          "test_acc": record["metrics"]["test_acc"], "config": record["config"]}


def inits_for(study: Study, policy: str) -> tuple[str, ...]:
    """An `@data` plan is already chosen by output error: only the sequential fit is run on it."""
    return ("sequential",) if policy.endswith("@data") else study.inits


def budget_target(policy: str) -> tuple[str, str] | None:
    """A budget policy's target and relaxation (`budget≈60%+lora:auto@data`: "60%", "lora:auto");
    None for a positional policy. A target ending in % is a share of the untied parameters."""
    if not policy.startswith("budget≈"):
        return None
    target, _, relax = policy.removeprefix("budget≈").removesuffix("@data").partition("+")
    return target, relax


def plans(model: nn.Module, study: Study, size: tuple[int, ...], train: kshare.ImageData,
          image_size: int | None) -> dict[str, kshare.SharingPlan]:
    """Every policy of the study; a budget plan matched to `stage`'s (or `all`'s) stored parameters, or
    (`budget≈N%`) to N% of the untied network's, grouped by weight error, or (`@data`) by output error
    on the calibration images of seed 0."""
    found: dict[str, kshare.SharingPlan] = {}
    metric = None
    for name in study.policies:
        budget = budget_target(name)
        if budget is None:
            found[name] = kshare.plan(model, name, input_size=size)
            continue
        target, relax = budget
        analysis = kshare.analyze(model, "all" if target.endswith("%") else target, input_size=size)
        # `budget≈60%`: at most 60% of the untied network's parameters; `budget≈stage`: what `stage` stores
        totals = analysis.plan.totals
        limit = round(float(target[:-1]) / 100 * totals.params_before) if target.endswith("%") else totals.params_after
        if name.endswith("@data") and metric is None:
            names = [s.name for s in analysis.inspection.sites]
            metric = output_metric(model, names, train, FitConfig(images=study.calib_images), image_size=image_size)
        plan = matched_budget(model, analysis.inspection, limit,
                              kshare.Relaxation.parse(relax or None), kshare.PositionalConfig(),
                              metric=metric if name.endswith("@data") else None)
        if plan is not None:
            found[name] = plan
    return found


def same_plans(found: dict[str, kshare.SharingPlan]) -> dict[str, str]:
    """Each policy whose plan ties exactly what an earlier one ties (groups, and deltas where it has any),
    mapped to that one: on resnet18 `all` is `stage` (no layers of equal shape across stages), and
    fitting it again would spend a quarter of the study printing the same rows twice. A `lora:auto`
    plan that gave no member a rank is its plain plan."""
    seen: dict[tuple[Any, ...], str] = {}
    same = {}
    for name, plan in found.items():
        relaxed = plan.relax_params > 0
        key = (plan.relax if relaxed else "none", tuple((g.members, g.ranks if relaxed else ()) for g in plan.groups))
        if (first := seen.setdefault(key, name)) != name:
            same[name] = first
    return same


def run_study(study: Study, path: Path, work: Path, log: Any = print) -> list[Record]:
    work.mkdir(parents=True, exist_ok=True)
    file = StudyFile(path, study)
    train = kshare.load_data(study.data, "train")
    test = kshare.load_data(study.data, "test").subset(study.test_limit)
    for base in study.baselines:
        model, record = train_baseline(base, study, work, train, test)
        file.notes[base.label] = record
        size = base.image_size
        adapter = adapter_for(model, test, size)
        channels = kshare.data.input_channels(model)
        shape = (channels, *(adapter.size or test.shape[1:]))

        def accuracy(net: nn.Module, adapter: Any = adapter) -> float:
            return kshare.evaluate(net, test, adapter)["acc"]

        untied_key = f"{base.label}|untied"
        if untied_key not in file.records:
            file.add(Record(untied_key, base.label, "untied", "-", 0, "tied", accuracy(model),
                            sum(p.numel() for p in model.parameters())))
        finetunes = dict(study.finetunes)
        chosen = plans(model, study, shape, train, size)
        repeats = same_plans(chosen)
        file.notes[base.label]["same_plan"] = repeats
        if stale := [k for k, r in file.records.items() if r.baseline == base.label and r.policy in repeats]:
            for key in stale:
                del file.records[key]  # made before the study knew the plans were the same
            file.write()
        # first every fit (cheap), then the fine-tunes in the order of `finetune_inits`, so that an
        # interrupted run has the numbers that matter most; a fitted model waits in memory for its fine-tunes
        waiting: dict[str, tuple[nn.Module, float | None]] = {}
        pending: list[tuple[str, str, int, list[float]]] = []
        for policy, plan in chosen.items():
            if policy in repeats:
                log(f"{base.label}|{policy}: the same plan as {repeats[policy]}, not fitted again")
                continue
            for init in inits_for(study, policy):
                for seed in study.seeds:
                    prefix = f"{base.label}|{policy}|{init}|{seed}"
                    shares = finetunes.get(policy, ()) if init in study.finetune_inits else ()
                    missing = [s for s in shares if f"{prefix}|finetuned|{s:g}" not in file.records]
                    if missing:
                        pending.append((policy, init, seed, missing))
                    if f"{prefix}|recalibrated" in file.records:
                        continue
                    tied, report = _retrofit(model, plan, init, train, test, study, seed, size)
                    acc_tied, acc_recal, seconds, error = _figures(report)
                    params = sum(p.numel() for p in tied.parameters())
                    first = file.records.get(f"{base.label}|{policy}|{init}|{study.seeds[0]}|tied")
                    same = first is not None and init in ("mean", "norm_mean")  # no data: the same model as seed 0
                    file.add(Record(f"{prefix}|tied", base.label, policy, init, seed, "tied",
                                    first.acc if same and first else acc_tied, params, seconds=seconds,
                                    output_error=error))
                    recal = report.step("BatchNorm recalibrated")
                    file.add(Record(f"{prefix}|recalibrated", base.label, policy, init, seed, "recalibrated",
                                    acc_recal, params, seconds=recal.seconds if recal else 0.0, output_error=error))
                    log(f"{prefix}: tied {file.records[prefix + '|tied'].acc:.4f}, recalibrated "
                        f"{file.records[prefix + '|recalibrated'].acc:.4f} ({seconds:.1f} s)")
                    if missing:
                        waiting[prefix] = (tied, error)
        pending.sort(key=lambda p: (study.finetune_inits.index(p[1]), p[2]))  # one seed of every point first
        for policy, init, seed, missing in pending:
            prefix = f"{base.label}|{policy}|{init}|{seed}"
            if prefix in waiting:
                tied, error = waiting.pop(prefix)
            else:  # fitted by an interrupted run: fitted again (same seed, same images) to start from the same model
                tied, report = _retrofit(model, chosen[policy], init, train, test, study, seed, size)
                error = _figures(report)[3]
            params = sum(p.numel() for p in tied.parameters())
            for share in missing:
                key = f"{prefix}|finetuned|{share:g}"
                steps = max(1, round(share * record["steps"]))
                tuned = copy.deepcopy(tied)
                config = kshare.TrainConfig(epochs=1, lr=study.finetune_lr, batch_size=128, distill=True,
                                            seed=seed, image_size=size, warmup_epochs=study.finetune_warmup,
                                            feature_weight=study.finetune_feature_weight)
                start = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    summary = kshare.finetune(tuned, train.subset(steps * 128, seed=seed), test, config,
                                              Path(tmp) / "tuned.pt", teacher=copy.deepcopy(model), device="cpu")
                file.add(Record(key, base.label, policy, init, seed, "finetuned", summary["history"][-1]["test_acc"],
                                params, steps=steps, seconds=time.perf_counter() - start, output_error=error))
                log(f"{key}: {steps} steps → {file.records[key].acc:.4f}")
    return list(file.records.values())


def _retrofit(model: nn.Module, plan: kshare.SharingPlan, init: str, train: kshare.ImageData,
              test: kshare.ImageData, study: Study, seed: int, size: int | None
              ) -> tuple[nn.Module, kshare.RetrofitReport]:
    """A copy of `model` through the one pipeline: tied by a weight-space init or a data fit, BatchNorm
    re-estimated on the seed's fit images, then (`reconstructed`: the sequential fit) each unit of
    blocks trained; test accuracy after every step."""
    tied = copy.deepcopy(model)
    fit = None
    if init not in ("mean", "norm_mean"):
        reconstructed = init == "reconstructed"
        fit = FitConfig(mode="sequential" if reconstructed else init, images=study.calib_images, seed=seed,
                        reconstruct=study.reconstruct if reconstructed else 0)
    report = kshare.retrofit(tied, plan, train, fit=fit, init=init if fit is None else None,
                             recalibrate=kshare.RecalibrateConfig(study.calib_images, 256, seed), test=test,
                             held_out=0, image_size=size, measure_untied=False, device="cpu")
    return tied, report


def _figures(report: kshare.RetrofitReport) -> tuple[float, float, float, float | None]:
    """Accuracy right after tying (or fitting, or reconstruction), after recalibration, the seconds of
    the tie and the groups' mean output error (data fits)."""
    first = report.step("blocks reconstructed") or report.steps[0]
    recalibrated = report.step("blocks reconstructed") or report.step("BatchNorm recalibrated") or first
    assert first.accuracy is not None and recalibrated.accuracy is not None
    error = None
    if report.fit is not None:
        fitted = [g.output_error for g in report.fit.groups if g.fitted]
        error = sum(fitted) / max(len(fitted), 1)
    seconds = report.fit.seconds if report.fit is not None else report.steps[0].seconds
    return first.accuracy, recalibrated.accuracy, seconds, error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", type=Path, default=Path("docs/results/retrofit_study.json"))
    parser.add_argument("--work", type=Path, default=Path("results/retrofit"), help="baseline checkpoints")
    parser.add_argument("--only", help="run only the baseline with this label (one JSON per baseline lets two "
                                       "processes share a machine)")
    args = parser.parse_args(argv)
    study = PRESETS[args.preset]
    if args.only:
        chosen = tuple(b for b in study.baselines if b.label == args.only)
        if not chosen:
            print(f"error: no baseline {args.only!r} in preset {args.preset}: "
                  f"{', '.join(b.label for b in study.baselines)}", file=sys.stderr)
            return 2
        study = dataclasses.replace(study, baselines=chosen)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        run_study(study, args.out, args.work)
    except KShareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
