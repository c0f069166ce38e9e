"""The retrofit pipeline: tie a trained network and keep what it knows, in one call.

    plan → fit (or a weight-space init) → recalibrate BatchNorm → reconstruct blocks
         → distil (no labels) → fine-tune (labels)

Each step is optional and configured by a small frozen config (torchao's `quantize_(model,
config)` style): `FitConfig` (how kernels are fitted to data; `None`: a weight-space `init`),
`RecalibrateConfig`, `DistillConfig` (label-free recovery), `TrainConfig` (the fine-tune).
After every step the model is measured: its accuracy where a labelled `test` split is given,
and its fidelity to the untied original on held-out images of `data` (ones no step read).
The CLI's `retrofit` and `apply --fit data`, the Python `tie(..., calib=)`, the sweep and the
studies all call `retrofit`; none assembles the steps.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kshare.analysis.calls import family_of
from kshare.analysis.inspect import inspect_model
from kshare.data import ImageData, ImageSource, adapter_for, as_image_data, decoding_for
from kshare.errors import DataError, PlanError, TrainingError, param
from kshare.fit.batchnorm import (
    BatchNormChoice,
    StatisticsCheck,
    batch_norms,
    choose_batchnorm,
    choose_statistics,
    recalibrate_on,
)
from kshare.fit.blocks import UnitReconstruction
from kshare.fit.config import FitConfig
from kshare.fit.fidelity import Fidelity, GroupCost, group_costs, measure_fidelity, smooth_measure
from kshare.fit.order import FitReport, fit_kernels, output_metric, reconstruct_fitted
from kshare.fit.statistics import fit_batches
from kshare.kernels import FITTED
from kshare.models.recipe import attach_recipe, recipe_of
from kshare.models.zoo import default_input_size, spec_of
from kshare.planning.config import BudgetConfig, SharingConfig, parse_config
from kshare.planning.kernel_error import with_errors
from kshare.planning.plan import SharingPlan, with_relaxation
from kshare.planning.planner import build_plan
from kshare.planning.relaxation import Relaxation
from kshare.progress import ProgressFn
from kshare.surgery.tie import apply_plan, plan_of, with_init
from kshare.training.config import TrainConfig
from kshare.training.distill import DistillConfig, DistillEpoch
from kshare.training.distill import distill as run_distill
from kshare.training.evaluate import check_classes, evaluate
from kshare.training.loop import finetune as run_finetune
from kshare.training.runtime import resolve_device

log = logging.getLogger(__name__)

HELD_OUT = 256  # images of `data` kept from every step, where fidelity is measured


BATCHNORM_CHOICES = ("auto", "measure", "all")
JUDGE_IMAGES = 256  # fit images the BatchNorm choice is judged on


@dataclass(frozen=True)
class RecalibrateConfig:
    """BatchNorm recalibration after tying: on `images` of the data (None: the fit's own images,
    or 512 after a weight-space init), a sample of seed `seed` (None: the fit's, or 0), in
    batches of `batch_size`. `choose`: `measure` re-estimates a block's layers only where that
    brings the model closer to the untied one on the fit images (`choose_batchnorm`: a
    pretrained network keeps the statistics it learned where photos would move them); `all`
    re-estimates every layer; `auto` (before a fit) first checks whether the untied model's
    statistics describe the fit images (`choose_statistics`) and then fits and re-estimates as
    `all` does where they do, as `measure` does (the fit under the model's statistics, unshared
    layers as trained) where they do not. It sets the fit's `track_batchnorm` and `compensate`;
    after a weight-space init the check reads the recalibration's images."""

    images: int | None = None
    batch_size: int = 256
    seed: int | None = None
    choose: str = "auto"

    def __post_init__(self) -> None:
        if self.choose not in BATCHNORM_CHOICES:
            raise TrainingError(f"{param('choose')} must be one of {', '.join(BATCHNORM_CHOICES)}, "
                                f"got {self.choose!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TrainingError(f"{param('seed')} must be a whole number, got {self.seed!r}")
        for name in ("images", "batch_size"):
            value = getattr(self, name)
            if value is None and name == "images":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainingError(f"{param(name)} must be a whole number of at least 1, got {value!r}")


@dataclass(frozen=True)
class Step:
    """One step of a retrofit and the model right after it: accuracy on the test split (where
    one is given) and fidelity to the untied original on the held-out images (where there are any)."""

    name: str
    seconds: float = 0.0
    accuracy: float | None = None
    fidelity: Fidelity | None = None


@dataclass(frozen=True)
class RetrofitReport:
    """What a retrofit did: the plan tied, each step's figures, the fit's per-group errors (None
    after a weight-space init), the BatchNorm layers re-estimated, the units of blocks trained,
    the fine-tune's epochs, how many images the fit read and how many were held out."""

    plan: SharingPlan
    steps: tuple[Step, ...]
    fit: FitReport | None = None
    recalibrated: int = 0
    reconstructed: tuple[UnitReconstruction, ...] = ()
    history: tuple[dict[str, Any], ...] = ()
    fit_images: int = 0
    held_out_images: int = 0
    seconds: float = 0.0
    data: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    batchnorm: BatchNormChoice | None = None  # which layers were re-estimated, where that was measured
    statistics: StatisticsCheck | None = None  # whether the model's statistics describe the images (`auto`)
    costs: tuple[GroupCost, ...] = ()  # what each group costs in fidelity on the held-out images
    distillation: tuple[DistillEpoch, ...] = ()  # label-free recovery, epoch 0 (before) first

    @property
    def final(self) -> Step:
        return self.steps[-1]

    def step(self, name: str) -> Step | None:
        """The first step whose name starts with `name` (`fitted`, `BatchNorm recalibrated`, ...)."""
        return next((s for s in self.steps if s.name.startswith(name)), None)

    def to_dict(self) -> dict[str, Any]:
        found = dataclasses.asdict(self)
        found["plan"] = self.plan.to_dict()
        return found

    def record(self) -> dict[str, Any]:
        """What a checkpoint keeps of it (plain values only): the data, the images, each step's figures."""
        return {"data": self.data, "fit_images": self.fit_images, "held_out_images": self.held_out_images,
                "mode": self.fit.mode if self.fit else None, "recalibrated": self.recalibrated,
                "batchnorm": {k: list(v) if isinstance(v, tuple) else v for k, v in
                              dataclasses.asdict(self.batchnorm).items()} if self.batchnorm else None,
                "costs": [dataclasses.asdict(c) for c in self.costs],
                "distillation": [{"epoch": e.epoch, "loss": None if e.loss != e.loss else e.loss, "best": e.best,
                                  "seconds": e.seconds, "fidelity": dataclasses.asdict(e.fidelity)}
                                 for e in self.distillation],
                "statistics": {"describes": self.statistics.describes, "top1": self.statistics.fidelity.top1,
                               "kl": self.statistics.fidelity.kl, "images": self.statistics.fidelity.images}
                if self.statistics else None,
                "steps": [{"name": s.name, "seconds": s.seconds, "accuracy": s.accuracy,
                           "fidelity": dataclasses.asdict(s.fidelity) if s.fidelity else None} for s in self.steps]}


def retrofit(
    model: nn.Module,
    policy: SharingPlan | SharingConfig | str = "stage",
    data: ImageSource | None = None,
    *,
    fit: FitConfig | None = FitConfig(),
    init: str | None = None,
    relax: str | None = None,
    recalibrate: RecalibrateConfig | bool | None = None,
    finetune: TrainConfig | None = None,
    distill: DistillConfig | None = None,
    test: ImageData | None = None,
    held_out: int = HELD_OUT,
    measure_untied: bool = True,
    costs_of_groups: bool = True,
    transform: Callable[[Any], Any] | None = None,
    image_size: int | None = None,
    input_size: Any = None,
    device: str | torch.device | None = None,
    out: str | Path | None = None,
    progress: ProgressFn | None = None,
    **options: object,
) -> RetrofitReport:
    """Tie the untied `model` in place by `policy` (a plan, a config or a policy string with
    policy `options`) and keep what it knows, measuring it after every step (see the module).

    `data`: the images to fit, recalibrate and (labelled) fine-tune on: an `ImageData`, a dataset
    name, a folder, a tensor, or any iterable or DataLoader of tensors or `(images, labels)`
    (`transform(item)` first, if given; `kshare.data.sources`). Labels are never needed but to
    fine-tune. `fit`: how each shared kernel is fitted to the data; `None`: the weight-space
    `init` of `kshare.tie` (None: the plan's own). `relax`: the relaxation. `recalibrate`:
    BatchNorm re-estimation (None: after a fit, as `fit.recalibrate` says; after an init, off).
    `finetune`: a fine-tune on the labelled `data` (distillation and feature matching from the
    untied original), checkpointed to `out`. `distill`: label-free recovery after the fit and
    any reconstruction, distilling from the untied original on `data`'s images, the best epoch
    on the held-out images kept (`kshare.training.distill`). `test`: a labelled split for
    accuracy. `held_out`:
    images of `data` kept from every step for fidelity (fewer when the data is small; 0: none);
    `measure_untied`: the test accuracy of the untied model first (a sweep knows it already).
    `costs_of_groups`: at the end, what each group costs in fidelity on the held-out images
    (`group_costs`: one pass of both models per group).
    `image_size`: the model's input size, when not the one it was trained at."""
    start = time.perf_counter()
    if plan_of(model) is not None:
        raise PlanError("retrofit starts from the untied model: call kshare.untie(model) first")
    if isinstance(held_out, bool) or not isinstance(held_out, int) or held_out < 0:
        raise DataError(f"{param('held_out')} must be a whole number of at least 0, got {held_out!r}")
    if data is not None and family_of(model) == "optical_flow":
        raise DataError(f"{type(model).__name__} is called with two image batches (optical flow): kshare fits, "
                        "recalibrates and measures models called with one; tie it without data (kshare.tie, or "
                        "`kshare apply` without --fit data)")
    recal = _recalibration(recalibrate, fit)
    if distill is not None and family_of(model) == "detection":
        raise DataError("distillation learns from class scores or feature maps; a detector's output is "
                        "post-processed boxes: retrofit it without distillation")
    if data is None and (fit is not None or recal is not None or finetune is not None or distill is not None):
        raise DataError("a fit, a recalibration, a distillation and a fine-tune read images: pass the data")
    if distill is not None and held_out == 0:  # before the fit: its time would be lost
        raise DataError(f"distillation keeps its best epoch by fidelity on held-out images: give "
                        f"{param('held_out')} of at least 1")
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    images = None
    if data is not None:
        need = None if finetune is not None or distill is not None else images_needed(fit, recal, held_out)
        images = as_image_data(data, transform=transform, limit=need, image_size=decoding_for(model, image_size))
    if finetune is not None and images is not None and not images.labelled:
        raise TrainingError(f"{images.name} has no labels: a fine-tune needs them (a fit, recalibration and "
                            "fidelity do not)")
    if finetune is not None and test is None:
        raise DataError(f"a fine-tune is judged on a labelled test split: pass {param('test')}")
    adapter = adapter_for(model, images, image_size, announce=True) if images is not None else None
    if adapter is not None and adapter.recipe is not None and recipe_of(model) is None and images is not None:
        size = adapter.size or images.shape[1:]  # the recipe followed, at the size fed: the checkpoint keeps it
        attach_recipe(model, dataclasses.replace(adapter.recipe, input_size=(adapter.channels, *size)))
    if test is not None:
        check_classes(model, test, adapter_for(model, test, image_size), dev)
    if images is not None and adapter is not None and images.labelled and isinstance(data, (str, Path, ImageData)):
        check_classes(model, images, adapter, dev)  # labels another number of classes: likely not the model's data
    split = split_images(images, fit, recal if recal is not None else False, held_out)
    fit_n, read = split.fit, split.read
    plan = _plan(model, policy, images, dataclasses.replace(fit, images=fit_n) if fit is not None else None, relax,
                 input_size, options)
    original = copy.deepcopy(model)  # the reference of every measure, the teacher and the reconstruction's targets
    probe: list[torch.Tensor] = []
    labels = None
    seed = split.seed
    if split.held is not None:
        probe = fit_batches(split.held, len(split.held.labels), 256, adapter, dev)  # type: ignore[arg-type]
        labels = split.held.labels if split.held.labelled else None
    steps: list[Step] = []

    def measure(name: str, seconds: float = 0.0, reference: bool = False) -> None:
        accuracy = evaluate(model, test, adapter_for(model, test, image_size))["acc"] if test is not None else None
        fidelity = measure_fidelity(model, original, probe, labels) if probe and not reference else None
        steps.append(Step(name, seconds, accuracy, fidelity))
        log.info(f"{name}: " + "; ".join(
            ([f"test acc {accuracy:.4f}"] if accuracy is not None else [])
            + ([fidelity.line()] if fidelity is not None else []) + ([f"{seconds:.1f} s"] if seconds else []))
            if accuracy is not None or fidelity is not None else f"{name}: {seconds:.1f} s")

    if test is not None and measure_untied:
        measure("untied", reference=True)
    report = None
    batches: list[torch.Tensor] = []
    began = time.perf_counter()
    statistics = None

    def resolve_auto(recal: RecalibrateConfig) -> RecalibrateConfig:
        """`auto` made `all` or `measure` by whether `original`'s statistics describe `batches`."""
        nonlocal statistics
        statistics = choose_statistics(original, batches, _first(batches, JUDGE_IMAGES))
        log.info(statistics.line())
        return dataclasses.replace(recal, choose="all" if statistics.describes else "measure")

    if recal is not None and recal.choose == "auto" and fit is not None and batch_norms(model):
        assert images is not None and adapter is not None  # decided before the fit, which it configures
        batches = fit_batches(images, fit_n, fit.batch_size, adapter, dev, fit.seed)
        recal = resolve_auto(recal)
        describes = recal.choose == "all"
        fit = dataclasses.replace(fit, track_batchnorm=fit.track_batchnorm and describes,
                                  compensate=fit.compensate and describes)
    if fit is not None:
        assert images is not None and adapter is not None
        batches = batches or fit_batches(images, fit_n, fit.batch_size, adapter, dev, fit.seed)
        report = fit_kernels(model, plan, batches, fit, progress)
        measure(f"fitted ({fit.mode})", report.seconds)
    else:
        if init is None and any(g.init == FITTED for g in plan.groups):
            raise PlanError(f"this plan's kernels were fitted to data: give a {param('fit')} config to fit them "
                            f"again, or name a weight-space {param('init')}")
        apply_plan(model, with_errors(model, with_init(plan, init)))
        measure(f"tied ({init or 'plan init'})", time.perf_counter() - began)
    recalibrated = 0
    choice = None
    if recal is not None and batch_norms(model):
        assert images is not None and adapter is not None
        began = time.perf_counter()
        seed = recal.seed if recal.seed is not None else fit.seed if fit is not None else 0
        if fit is None or (recal.images is not None and recal.images != fit_n) or recal.batch_size != fit.batch_size \
                or seed != fit.seed:  # else: the fit's own batches
            count = min(recal.images or fit_n, len(images.labels))
            batches = fit_batches(images, count, recal.batch_size, adapter, dev, seed)
        if recal.choose == "auto":  # after a weight-space init: checked on the recalibration's images
            recal = resolve_auto(recal)
        if recal.choose == "measure":
            choice = choose_batchnorm(model, original, batches, _first(batches, JUDGE_IMAGES))
            recalibrated = len(choice.reestimated)
            log.info(choice.line())
        else:
            recalibrated = recalibrate_on(model, batches)
        measure("BatchNorm recalibrated", time.perf_counter() - began)
    units: tuple[UnitReconstruction, ...] = ()
    if fit is not None and fit.reconstruct:
        assert images is not None and adapter is not None
        units = reconstruct_fitted(model, original, images, batches, fit, adapter, dev, progress)
        measure("blocks reconstructed", sum(u.seconds for u in units))
    distilled: tuple[DistillEpoch, ...] = ()
    if distill is not None:
        assert images is not None and adapter is not None
        if not probe:
            raise DataError(f"distillation keeps its best epoch by fidelity on held-out images: give "
                            f"{param('held_out')} of at least 1 (and data with images left to hold out)")
        train = images.without_beyond(read, split.held_count, seed)  # never the held-out
        distilled = run_distill(model, original, train.images, adapter, probe, distill, device=dev,
                                progress=progress)
        kept = max((e for e in distilled if e.best), key=lambda e: e.epoch)
        measure(f"distilled (epoch {kept.epoch} of {len(distilled) - 1} kept)", sum(e.seconds for e in distilled))
    history: tuple[dict[str, Any], ...] = ()
    if finetune is not None:
        assert images is not None and test is not None
        teacher = copy.deepcopy(original) if finetune.uses_teacher else None
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(out) if out is not None else Path(tmp) / "finetuned.pt"
            train = images.without_beyond(read, split.held_count, seed) if probe else images  # never the held-out
            summary = run_finetune(model, train, test, finetune, target, teacher=teacher, device=str(dev),
                                   progress=progress)
        history = tuple(summary["history"])
        model.to(dev)
        measure(f"fine-tuned ({finetune.epochs} epoch(s))", sum(r["seconds"] for r in history))
    if report is not None:
        report = dataclasses.replace(report, recalibrated=recalibrated, reconstructed=units,
                                     seconds=report.seconds + sum(u.seconds for u in units))
    tied = plan_of(model)
    assert tied is not None
    costs: tuple[GroupCost, ...] = ()
    if probe and costs_of_groups:
        costs = group_costs(model, original, tied.groups, probe)
        measure_name = smooth_measure(costs[0].kind) if costs else "KL"
        worst = sorted(costs, key=lambda c: -c.kl)
        log.info("what tying each group alone costs on the held-out images: "
                 + ", ".join(f"{c.group} {measure_name} {c.kl:.4f}" for c in worst[:5])
                 + (", ..." if len(costs) > 5 else ""))
    return RetrofitReport(tied, tuple(steps), report, recalibrated, units, history, fit_n if fit else 0,
                          sum(len(b) for b in probe), time.perf_counter() - start, images.name if images else "",
                          batchnorm=choice, costs=costs, statistics=statistics, distillation=distilled)


def fit_and_tie(model: nn.Module, plan: SharingPlan, data: ImageSource, config: FitConfig = FitConfig(), *,
                image_size: int | None = None, device: str | torch.device | None = None,
                progress: ProgressFn | None = None) -> FitReport:
    """The fit steps alone (fit, then recalibration and block reconstruction as `config` says),
    without held-out measures: `retrofit(model, plan, data, fit=config, held_out=0).fit`."""
    report = retrofit(model, plan, data, fit=config, held_out=0, image_size=image_size, device=device,
                      progress=progress)
    assert report.fit is not None
    return report.fit


def batchnorm_mode(mode: str, fit: FitConfig | None) -> tuple[FitConfig | None, RecalibrateConfig | bool]:
    """`fit` and the recalibration for a BatchNorm `mode`:
    - `auto`: `all` or `measure`, by whether the untied model's statistics describe the fit images
      (`RecalibrateConfig(choose="auto")`, decided in the retrofit);
    - `all`: the fit expects every statistic re-estimated after it (`FitConfig.track_batchnorm`), and they are;
    - `measure`: the fit reproduces the raw outputs under the model's statistics (unshared layers keep
      their weights: `FitConfig.compensate` off), then a block's are
      re-estimated only where the KL to the untied model falls (`choose_batchnorm`);
    - `keep`: the same fit, and the statistics the model has are kept."""
    if mode not in (*BATCHNORM_CHOICES, "keep"):
        raise TrainingError(f"{param('batchnorm')} must be one of {', '.join(BATCHNORM_CHOICES)} or keep, "
                            f"got {mode!r}")
    if mode in ("auto", "all"):
        return fit, RecalibrateConfig(batch_size=fit.batch_size if fit is not None else 256, choose=mode)
    # refitting unshared layers under kept statistics moved a pretrained Lite0 away from the original (held-out
    # KL 5.82 against 2.18 without, benchmarks/pretrained_fidelity.py): the fit leaves them as trained
    untracked = dataclasses.replace(fit, track_batchnorm=False, compensate=False) if fit is not None else None
    if mode == "keep":
        return (dataclasses.replace(untracked, recalibrate=False) if untracked is not None else None), False
    return untracked, RecalibrateConfig(batch_size=fit.batch_size if fit is not None else 256, choose="measure")


def images_needed(fit: FitConfig | None, recalibrate: RecalibrateConfig | bool | None, held_out: int) -> int | None:
    """How many images of the data a retrofit without a fine-tune reads, held-out ones included
    (None: no steps that read any): what an iterable source is read up to."""
    recal = _recalibration(recalibrate, fit)
    asked = [fit.images, fit.reconstruct_images or 0] if fit is not None else []
    asked += [recal.images or (fit.images if fit is not None else 512)] if recal is not None else []
    return (held_out + max(asked, default=0)) or None


def _first(batches: Sequence[torch.Tensor], n: int) -> list[torch.Tensor]:
    """The first `n` images of `batches` (fit images judge BatchNorm: the held-out ones stay unread)."""
    taken, count = [], 0
    for x in batches:
        taken.append(x[: n - count])
        count += len(taken[-1])
        if count >= n:
            break
    return taken


def _recalibration(recalibrate: RecalibrateConfig | bool | None, fit: FitConfig | None) -> RecalibrateConfig | None:
    if recalibrate is None:
        return RecalibrateConfig(batch_size=fit.batch_size) if fit is not None and fit.recalibrate else None
    if recalibrate is True:
        return RecalibrateConfig(batch_size=fit.batch_size if fit is not None else 256)
    if recalibrate is False:
        return None
    if not isinstance(recalibrate, RecalibrateConfig):
        raise TrainingError(f"{param('recalibrate')} takes a RecalibrateConfig, True or False, got {recalibrate!r}")
    return recalibrate


@dataclass(frozen=True)
class ImageSplit:
    """How a retrofit shares out its images: the fit's sample (`fit` images of the seeded order),
    how many of that order the steps read (`read`: the block reconstruction may read more), and
    the held-out images after them, which no step reads (None: none held out)."""

    fit: int
    read: int
    seed: int
    held: ImageData | None = None

    @property
    def held_count(self) -> int:
        return len(self.held.labels) if self.held is not None else 0


def split_images(images: ImageData | None, fit: FitConfig | None, recalibrate: RecalibrateConfig | bool | None,
                 held_out: int) -> ImageSplit:
    """The split `retrofit(images, fit=fit, recalibrate=recalibrate, held_out=held_out)` makes:
    the same images, for any caller that measures beside it (a fidelity search measures every
    trial on the same held-out images)."""
    recal = _recalibration(recalibrate, fit)
    seed = fit.seed if fit is not None else 0
    fit_n, held = _sample_sizes(images, fit, recal, held_out)
    read = max(fit_n, fit.reconstruct_images or 0) if fit is not None else fit_n
    rest = images.beyond(read, held, seed) if images is not None and held else None
    return ImageSplit(fit_n, read, seed, rest)


def _sample_sizes(images: ImageData | None, fit: FitConfig | None, recal: RecalibrateConfig | None,
                  held_out: int) -> tuple[int, int]:
    """How many images the fit reads and how many are held out. The fit gets what it asks for while
    what is left can still hold out a quarter of the data (up to `held_out`); smaller data is
    shared out, and said: a quarter held out, the rest fitted."""
    if images is None:
        return 0, 0
    n = len(images.labels)
    if held_out and n < 4:
        raise DataError(f"{images.name} holds {n} image(s): too few to fit on some and hold a quarter out to "
                        f"measure fidelity; give more images (or {param('held_out', 0)} to measure nothing)")
    if fit is not None and fit.reconstruct_images is not None and fit.reconstruct_images > n:
        raise DataError(f"{images.name} holds {n:,} images; {param('reconstruct_images', fit.reconstruct_images)} "
                        "asks the block reconstruction for more")
    asked = fit.images if fit is not None else (recal.images or 512) if recal is not None else 0
    reads = max(asked, fit.reconstruct_images or 0) if fit is not None else asked
    quarter = min(held_out, n // 4) if n > 1 else 0
    if n - reads >= quarter:
        held = min(held_out, n - reads)
        if held < held_out:
            log.info(f"{held:,} images of {images.name} held out to measure fidelity (of {held_out:,} asked for)")
        return min(asked, n), held
    fitted = min(asked, n - quarter)
    log.warning(f"{images.name} holds {n:,} images: the fit reads {fitted:,} of the {asked:,} asked for"
                + (f", {quarter:,} held out to measure fidelity" if quarter else ""))
    return fitted, quarter


def _plan(model: nn.Module, policy: SharingPlan | SharingConfig | str, images: ImageData | None,
          fit: FitConfig | None, relax: str | None, input_size: Any, options: dict[str, object]) -> SharingPlan:
    """The plan to tie: a ready one (with `relax` if given), or one built from the policy; a budget
    plan fitted to data groups kernels by output error on the same images."""
    if isinstance(policy, SharingPlan):
        if options:
            raise PlanError(f"policy options {sorted(options)} apply to a policy, not to a ready plan")
        plan = with_relaxation(policy, Relaxation.parse(relax)) if relax is not None else policy
    else:
        config = parse_config(policy, **({"relax": relax} if relax is not None else {}), **options)
        metric = None
        size = input_size if input_size is not None else default_input_size(model, spec_of(model))
        if fit is not None and images is not None and isinstance(config, BudgetConfig):
            names = [s.name for s in inspect_model(model, size).sites]
            metric = output_metric(model, names, images, fit)
        spec = spec_of(model)
        plan = build_plan(model, config, input_size=size, source=spec.ref if spec else None, metric=metric)
    plan.validate(model)
    if not plan.groups:
        raise PlanError("the plan ties no group: there is nothing to retrofit")
    return plan
