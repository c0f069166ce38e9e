"""Commands that train and measure on data: `retrofit`, `finetune`, `eval`, `recalibrate`, `sweep`."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from torch import nn

from kshare.cli.app import (
    DATA,
    DEVICE,
    FINETUNE,
    FIT,
    OUTPUT,
    PLAN,
    SEARCH,
    BatchNormOpt,
    CacheMemoryOpt,
    ChannelsLastOpt,
    CompileOpt,
    ConfigOpt,
    DataOpt,
    DataRootOpt,
    DeviceOpt,
    FeatureWeightOpt,
    FeedRequest,
    FitCacheOpt,
    FitImagesOpt,
    FitModeOpt,
    HeldOutOpt,
    ImageSizeOpt,
    KwargOpt,
    LimitOpt,
    PrecisionOpt,
    ReconstructImagesOpt,
    ReconstructOpt,
    TrustOpt,
    WarmupOpt,
    WeightsOpt,
    app,
    choice,
    csv,
    one_line_errors,
    with_feed_options,
)
from kshare.cli.plan_commands import PlanRequest, with_plan_options
from kshare.cli.plots import plot_search, plot_sweep
from kshare.cli.progress import progress_bars
from kshare.cli.report import costs_table, render_retrofit, search_table
from kshare.data import Decoding, ImageData, adapter_for, decoding_for, load_data
from kshare.errors import DataError, PlanError, PolicyError, SearchError, StudyError, TrainingError, WeightsError
from kshare.fit.batchnorm import batch_norms, recalibrate_bn
from kshare.fit.config import FitConfig
from kshare.io.checkpoint import load, read, restore, save
from kshare.kernels import INITS
from kshare.models.zoo import load_model, parse_kwargs
from kshare.retrofit import HELD_OUT, batchnorm_mode
from kshare.retrofit import retrofit as run_retrofit
from kshare.search import Target, search_plan
from kshare.surgery.tie import plan_of
from kshare.sweep import SweepConfig, aggregate, pareto, run_sweep
from kshare.training.config import TrainConfig
from kshare.training.distill import DistillConfig
from kshare.training.evaluate import check_classes, choose_eval_setup, evaluate
from kshare.training.loop import finetune as run_finetune
from kshare.training.resume import resume_state
from kshare.training.runtime import runtime, shutdown


def _splits(data: str, data_root: Path | None, image_size: Decoding, limit_train: int | None,
            limit_test: int | None, train: bool = True) -> tuple[ImageData | None, ImageData]:
    """The (train, test) splits a command asked for, limits applied (train None when not needed);
    `image_size`: the size image folders are decoded at (`decoding_for`)."""
    for name, value in (("--limit-train", limit_train), ("--limit-test", limit_test)):
        if value is not None and value < 1:
            raise DataError(f"{name} must be at least 1, got {value}")
    test = load_data(data, "test", data_root, image_size).subset(limit_test)
    return (load_data(data, "train", data_root, image_size).subset(limit_train) if train else None), test


@app.command()
@one_line_errors
def sweep(
    source: Annotated[str, typer.Argument(help="An untied kshare checkpoint, or a model name (with --weights).")],
    data: Annotated[str, typer.Option("--data", help="Dataset to evaluate (and fine-tune) on.",
                                      rich_help_panel=DATA)] = "fashion-mnist",
    data_root: DataRootOpt = None,
    weights: WeightsOpt = None,
    kwarg: KwargOpt = None,
    policies: Annotated[str, typer.Option(help="Positional policies, comma-separated.",
                                          rich_help_panel=PLAN)] = "all,stage",
    budgets: Annotated[str, typer.Option(help="Budget fractions, comma-separated (e.g. 0.3,0.5).",
                                         rich_help_panel=PLAN)] = "",
    relax: Annotated[str, typer.Option(help="Relaxations, comma-separated (none,scale,lora:2,lora:auto,...).",
                                       rich_help_panel=PLAN)
                     ] = "none",
    match: Annotated[str, typer.Option(help="Also fit a budget plan per relaxation to these policies' sizes.",
                                       rich_help_panel=PLAN)
                     ] = "",
    init: Annotated[str, typer.Option(help="Shared-kernel init for every point.", rich_help_panel=FIT)] = "mean",
    epochs: Annotated[int, typer.Option(help="Fine-tune epochs per point (0: evaluate right after tying).",
                                        rich_help_panel=FINETUNE)] = 0,
    loss: Annotated[str, typer.Option(help="ce, kd (distil from the untied model) or ce,kd.",
                                      rich_help_panel=FINETUNE)] = "ce",
    lr: Annotated[float, typer.Option(help="Fine-tune learning rate.", rich_help_panel=FINETUNE)] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Images per step.", rich_help_panel=FINETUNE)] = 128,
    seeds: Annotated[str, typer.Option(help="Fine-tune seeds, comma-separated (each point runs once per seed).",
                                       rich_help_panel=FINETUNE)
                     ] = "0",
    size_tolerance: Annotated[float, typer.Option(help="--match admits plans up to this fraction larger "
                                                       "(0.005: within 0.5%).", rich_help_panel=PLAN)] = 0.0,
    calibrate: Annotated[int, typer.Option("--recalibrate", "--calibrate",
                                           help="Re-estimate BatchNorm statistics on this many training images "
                                                "after tying (0: off; --calibrate is its old name).",
                                           rich_help_panel=FIT)] = 0,
    trust_code: TrustOpt = False,
    image_size: ImageSizeOpt = None,
    limit_train: LimitOpt = None,
    limit_test: LimitOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Sweep JSON.", rich_help_panel=OUTPUT)] = Path("sweep.json"),
    plot: Annotated[Path | None, typer.Option(help="Pareto plot PNG (default: OUT with .png).",
                                              rich_help_panel=OUTPUT)] = None,
    config_file: ConfigOpt = None,
) -> None:
    """Evaluate a grid of policies, budgets and relaxations on one trained model; JSON + Pareto plot."""
    choice(init, INITS, "--init")
    config = SweepConfig(policies=csv(policies), budgets=tuple(_fraction(b) for b in csv(budgets)),
                         relaxations=csv(relax) or ("none",), match=csv(match), init=init, epochs=epochs,
                         losses=csv(loss), lr=lr, batch_size=batch_size, image_size=image_size,
                         seeds=tuple(_integer(x, "--seeds") for x in csv(seeds)), size_tolerance=size_tolerance,
                         calibrate=calibrate)
    baseline = None
    if Path(source).is_file():
        if weights is not None:
            raise WeightsError("--weights is for a model name; a checkpoint already holds its weights")
        payload = read(source)  # read once: the model and how it was trained
        net = restore(payload, what=source, trust_code=trust_code)
        if plan_of(net) is not None:
            raise PlanError(f"{source} is already tied: sweep starts from the untied model (kshare apply -g none)")
        baseline = payload.get("extra", {}).get("finetune")
    else:
        net, _ = load_model(source, parse_kwargs(kwarg), weights)
    train_data, test_data = _splits(data, data_root, decoding_for(net, image_size), limit_train, limit_test)
    assert train_data is not None
    check_classes(net, test_data, adapter_for(net, test_data, image_size, announce=True), next(net.parameters()).device)
    with progress_bars() as progress:
        rows = run_sweep(net, train_data, test_data, config, out, baseline=baseline, progress=progress)
    picture = plot_sweep(rows, plot or out.with_suffix(".png"), f"{source} on {test_data.name}")
    front = ", ".join(r.label + (f" ({r.loss})" if r.loss else "") for r in pareto(aggregate(rows)))
    typer.echo(f"wrote {out} ({len(rows)} points) and {picture}; Pareto front: {front}")


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise PolicyError(f"bad budget {text!r}: expected a fraction such as 0.3") from None


def _integer(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise StudyError(f"bad {option} value {text!r}: expected whole numbers such as 0,1,2") from None


def _load_teacher(ref: str, weights: Path | None, trust_code: bool) -> nn.Module:
    """A teacher from a kshare checkpoint, or a model name plus --teacher-weights (a teacher
    with random weights would teach noise: refused)."""
    if Path(ref).is_file():
        if weights is not None:
            raise TrainingError("--teacher-weights is for a model name; a checkpoint already holds its weights")
        return load(ref, trust_code=trust_code)
    if weights is None:
        raise TrainingError(f"teacher {ref!r} is a model name without weights: pass --teacher-weights FILE "
                            "or a trained kshare checkpoint as --teacher")
    return load_model(ref, weights=weights)[0]


@app.command()
@one_line_errors
def finetune(
    checkpoint: Annotated[Path, typer.Argument(help="A kshare checkpoint, tied or not.")],
    data: DataOpt = "fashion-mnist",
    data_root: DataRootOpt = None,
    epochs: Annotated[int, typer.Option(help="Total epochs (a resumed run continues up to this).",
                                        rich_help_panel=FINETUNE)] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate.", rich_help_panel=FINETUNE)] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Images per step (per process under torchrun).",
                                            rich_help_panel=FINETUNE)] = 128,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd (Nesterov momentum).",
                                           rich_help_panel=FINETUNE)] = "adamw",
    weight_decay: Annotated[float, typer.Option(help="Weight decay.", rich_help_panel=FINETUNE)] = 0.05,
    warmup: WarmupOpt = 0.0,
    clip_grad: Annotated[float, typer.Option(help="Clip the gradient norm to this (0: off).",
                                             rich_help_panel=FINETUNE)] = 0.0,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the cross-entropy.",
                                                   rich_help_panel=FINETUNE)] = 0.0,
    distill: Annotated[bool, typer.Option(help="Add knowledge distillation from --teacher.",
                                          rich_help_panel=FINETUNE)] = False,
    teacher: Annotated[str | None, typer.Option(help="Teacher: a kshare checkpoint or a model name.",
                                                rich_help_panel=FINETUNE)] = None,
    teacher_weights: Annotated[Path | None, typer.Option(help="Weights for a teacher given by name.",
                                                         rich_help_panel=FINETUNE)] = None,
    temperature: Annotated[float, typer.Option(help="Distillation temperature.", rich_help_panel=FINETUNE)] = 4.0,
    alpha: Annotated[float, typer.Option(help="Weight of the distillation term (CE gets 1 - alpha).",
                                         rich_help_panel=FINETUNE)] = 0.5,
    feature_weight: FeatureWeightOpt = 0.0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Checkpoint to write each epoch.",
                                             rich_help_panel=OUTPUT)] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last completed epoch of the run writing --out.",
                                         rich_help_panel=OUTPUT)
                      ] = False,
    metrics: Annotated[Path | None, typer.Option(help="Metrics JSONL (default: OUT.metrics.jsonl).",
                                                 rich_help_panel=OUTPUT)] = None,
    image_size: ImageSizeOpt = None,
    limit_train: LimitOpt = None,
    limit_test: LimitOpt = None,
    seed: Annotated[int, typer.Option(help="Seed for init order, shuffling and augmentation.",
                                      rich_help_panel=FINETUNE)] = 0,
    device: DeviceOpt = None,
    precision: PrecisionOpt = "auto",
    channels_last: ChannelsLastOpt = None,
    compile: CompileOpt = False,
    amp: Annotated[bool, typer.Option(help="Let --precision auto pick mixed precision on CUDA (--no-amp: fp32).",
                                      rich_help_panel=DEVICE)
                   ] = True,
    trust_code: TrustOpt = False,
    config_file: ConfigOpt = None,
) -> None:
    """Fine-tune a checkpoint on real data, keeping its sharing; optionally distil from a teacher."""
    if not amp and precision not in ("auto", "fp32"):
        raise TrainingError(f"--no-amp asks for fp32, --precision asks for {precision}: give one of them")
    config = TrainConfig(
        epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay,
        warmup_epochs=warmup, clip_grad=clip_grad, label_smoothing=label_smoothing, distill=distill,
        temperature=temperature, alpha=alpha, seed=seed, amp=amp, image_size=image_size, precision=precision,
        channels_last=channels_last, compile=compile, feature_weight=feature_weight,
    )
    if teacher is not None and not config.uses_teacher:
        raise TrainingError("--teacher given without --distill or --feature-weight")
    out = out or checkpoint.with_name(checkpoint.stem + ".ft.pt")
    net, state = resume_state(out, trust_code=trust_code) if resume else (load(checkpoint, trust_code=trust_code), None)
    teacher_net = _load_teacher(teacher, teacher_weights, trust_code) if config.uses_teacher and teacher else None
    train_data, test_data = _splits(data, data_root, decoding_for(net, image_size), limit_train, limit_test)
    assert train_data is not None
    try:
        with progress_bars() as progress:
            summary = run_finetune(net, train_data, test_data, config, out, teacher=teacher_net, resume=state,
                                   metrics=metrics, device=device, progress=progress)
    finally:
        shutdown()
    last = summary["history"][-1] if summary["history"] else None
    if last is None:
        typer.echo(f"nothing to do: {out} already has {epochs} epochs")
    elif int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"done: test acc {last['test_acc']:.4f} after epoch {last['epoch']}; wrote {out}")


@app.command("eval")
@one_line_errors
@with_feed_options
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A kshare checkpoint.")],
    feed: FeedRequest,
    data: DataOpt = "fashion-mnist",
    data_root: DataRootOpt = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.", rich_help_panel=FINETUNE)] = 256,
    image_size: ImageSizeOpt = None,
    limit_test: LimitOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = "auto",
    channels_last: ChannelsLastOpt = None,
    compile: CompileOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.", rich_help_panel=OUTPUT)] = False,
    trust_code: TrustOpt = False,
    config_file: ConfigOpt = None,
) -> None:
    """Test accuracy and loss of a checkpoint on a dataset's test split (fed as it was trained)."""
    if batch_size < 1:
        raise TrainingError(f"--batch-size must be at least 1, got {batch_size}")
    net = load(checkpoint, trust_code=trust_code)
    feed.apply(net)
    _, test_data = _splits(data, data_root, decoding_for(net, image_size), None, limit_test, train=False)
    rt = runtime(device)
    net.to(rt.device)
    adapter = adapter_for(net, test_data, image_size, announce=True)
    check_classes(net, test_data, adapter, rt.device)
    setup = choose_eval_setup(net, adapter(test_data.images[:batch_size].to(rt.device)), rt.device, precision,
                              channels_last)
    if setup.channels_last:
        net.to(memory_format=torch.channels_last)
    result = evaluate(torch.compile(net) if compile else net, test_data, adapter, batch_size, rt, setup) | {
        "data": test_data.name}
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"{checkpoint}: test acc {result['acc']:.4f}, loss {result['loss']:.4f} "
                   f"on {int(result['n'])} {test_data.name} images")


@app.command("recalibrate")
@one_line_errors
@with_feed_options
def recalibrate(
    checkpoint: Annotated[Path, typer.Argument(help="A kshare checkpoint, usually just tied by `apply`.")],
    feed: FeedRequest,
    data: DataOpt = "fashion-mnist",
    data_root: DataRootOpt = None,
    images: Annotated[int, typer.Option(help="Training images to estimate the statistics on.",
                                        rich_help_panel=DATA)] = 2048,
    batch_size: Annotated[int, typer.Option(help="Images per batch.", rich_help_panel=FINETUNE)] = 128,
    image_size: ImageSizeOpt = None,
    limit_test: LimitOpt = None,
    device: DeviceOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to save (default: overwrite CHECKPOINT).",
                                             rich_help_panel=OUTPUT)
                   ] = None,
    trust_code: TrustOpt = False,
    config_file: ConfigOpt = None,
) -> None:
    """Re-estimate BatchNorm statistics after tying (no labels, no training); report test accuracy.
    (`kshare calibrate` is its old name.)"""
    del config_file  # read by its callback, into the other options' defaults
    if images < 1:
        raise TrainingError(f"--images must be at least 1, got {images}")
    if batch_size < 1:
        raise TrainingError(f"--batch-size must be at least 1, got {batch_size}")
    net = load(checkpoint, trust_code=trust_code)
    if not batch_norms(net):
        raise TrainingError(f"{checkpoint} has no BatchNorm layer with running statistics: nothing to calibrate")
    feed.apply(net)
    size = decoding_for(net, image_size)
    train_data = load_data(data, "train", data_root, size)
    test_data = None if not train_data.labelled else _splits(data, data_root, size, None, limit_test, train=False)[1]
    rt = runtime(device)
    net.to(rt.device)
    train_adapter = adapter_for(net, train_data, image_size, announce=True)
    test_adapter = adapter_for(net, test_data, image_size) if test_data is not None else None
    if test_data is not None and test_adapter is not None:
        check_classes(net, test_data, test_adapter, rt.device)
        before = evaluate(net, test_data, test_adapter, rt=rt)["acc"]
    layers = recalibrate_bn(net, train_data, images=images, batch_size=batch_size, adapter=train_adapter)
    target = save(net.cpu(), out or checkpoint)
    used = f"{min(images, len(train_data.labels)):,} {train_data.name} images"
    if test_data is None or test_adapter is None:
        typer.echo(f"recalibrated {layers} BatchNorm layers on {used} (unlabelled: no test accuracy); wrote {target}")
        return
    after = evaluate(net.to(rt.device), test_data, test_adapter, rt=rt)["acc"]
    typer.echo(f"recalibrated {layers} BatchNorm layers on {used}: test acc {before:.4f} → {after:.4f}; "
               f"wrote {target}")


def _distill_config(epochs: int, lr: float, batch: int, patience: int, seed: int) -> DistillConfig:
    """`--distill-*`'s config; its errors name those flags, not the fine-tune's `--lr`/`--batch-size`."""
    try:
        return DistillConfig(epochs=epochs, lr=lr, batch_size=batch, patience=patience, seed=seed)
    except TrainingError as exc:
        message = str(exc)
        for field, flag in (("lr", "distill_lr"), ("batch_size", "distill_batch"), ("epochs", "distill_epochs")):
            message = message.replace(f"`{field}`", f"`{flag}`")
        raise TrainingError(message) from None


@app.command()
@one_line_errors
@with_plan_options
@with_feed_options
def retrofit(
    request: PlanRequest,
    feed: FeedRequest,
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write (the fitted model, or fine-tuned).",
                                      rich_help_panel=OUTPUT)],
    data: DataOpt = "fashion-mnist",
    data_root: DataRootOpt = None,
    image_size: ImageSizeOpt = None,
    held_out: HeldOutOpt = HELD_OUT,
    fit_images: FitImagesOpt = 512,
    fit_mode: FitModeOpt = "sequential",
    reconstruct: ReconstructOpt = 0,
    reconstruct_images: ReconstructImagesOpt = None,
    fit_cache: FitCacheOpt = True,
    cache_memory: CacheMemoryOpt = 4.0,
    batchnorm: BatchNormOpt = "auto",
    epochs: Annotated[int, typer.Option(help="Fine-tune epochs after the fit (0: none; needs labelled data).",
                                        rich_help_panel=FINETUNE)] = 0,
    distill: Annotated[bool, typer.Option(help="Distil the fine-tune from the untied model.",
                                          rich_help_panel=FINETUNE)] = True,
    lr: Annotated[float, typer.Option(help="Fine-tune learning rate.", rich_help_panel=FINETUNE)] = 1e-3,
    warmup: WarmupOpt = 0.0,
    feature_weight: FeatureWeightOpt = 0.0,
    batch_size: Annotated[int, typer.Option(help="Fine-tune images per step.", rich_help_panel=FINETUNE)] = 128,
    distill_epochs: Annotated[int, typer.Option(
        help="Label-free recovery after the fit: epochs of distillation from the untied model on --data's images "
             "(random resized crops and flips; no labels needed), fidelity on the held-out images after each, the "
             "best epoch kept (0: none).", rich_help_panel=FINETUNE)] = 0,
    distill_lr: Annotated[float, typer.Option(help="Learning rate of --distill-epochs.",
                                              rich_help_panel=FINETUNE)] = 1e-4,
    distill_batch: Annotated[int, typer.Option(help="Images per step of --distill-epochs.",
                                               rich_help_panel=FINETUNE)] = 32,
    patience: Annotated[int, typer.Option(help="--distill-epochs stops after this many epochs without a better "
                                               "held-out fidelity.", rich_help_panel=FINETUNE)] = 3,
    limit_train: LimitOpt = None,
    limit_test: LimitOpt = None,
    device: DeviceOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the fit sample and the fine-tune.", rich_help_panel=FIT)] = 0,
    target: Annotated[str | None, typer.Option(
        help="A fidelity to reach instead of a fixed plan: agree=FRACTION (top-1 agreement with the untied model "
             "on the held-out images, at least) or kl=NATS (at most). Searches, within --groups's plan, for the one "
             "that stores the fewest parameters and meets it; exit code 3 when none does (the closest is written).",
        rich_help_panel=SEARCH)] = None,
    max_trials: Annotated[int, typer.Option(help="Retrofits a --target search runs at most.",
                                            rich_help_panel=SEARCH)] = 8,
    time_limit: Annotated[float | None, typer.Option(
        help="Minutes a --target search may take; no trial is started that would likely end later.",
        rich_help_panel=SEARCH)] = None,
    plot: Annotated[Path | None, typer.Option(help="Plot of a --target search's trials (default: OUT with "
                                                   ".search.png).", rich_help_panel=OUTPUT)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print each step's figures as JSON.",
                                          rich_help_panel=OUTPUT)] = False,
) -> None:
    """Tie a trained model and keep what it knows: plan, fit the shared kernels to the data's
    outputs, re-estimate BatchNorm, optionally reconstruct blocks and fine-tune. After every
    step: fidelity to the untied model on held-out images (no labels needed), and test accuracy
    where the data has a labelled test split. With --target, the plan is searched for: the
    smallest that keeps the fidelity asked."""
    if epochs < 0:
        raise TrainingError(f"--epochs must be 0 or more, got {epochs}")
    goal = None
    if target is not None:
        goal = Target.parse(target)  # checked before anything is built or fitted
        if epochs:
            raise SearchError("--target searches fitted plans without a fine-tune: drop --epochs (fine-tune the "
                              "result with kshare finetune)")
        if max_trials < 1:
            raise SearchError(f"--max-trials must be at least 1, got {max_trials}")
        if time_limit is not None and not time_limit > 0:
            raise SearchError(f"--time-limit must be a number of minutes above 0, got {time_limit:g}")
    elif plot is not None:
        raise SearchError("--plot draws a --target search: give --target too")
    if feature_weight and not epochs:
        raise TrainingError("--feature-weight shapes the fine-tune: give --epochs too")
    if distill_epochs < 0:
        raise TrainingError(f"--distill-epochs must be 0 or more, got {distill_epochs}")
    if distill_epochs and goal is not None:
        raise SearchError("--target searches fitted plans without training: drop --distill-epochs")
    distill_config = _distill_config(distill_epochs, distill_lr, distill_batch, patience, seed) if distill_epochs \
        else None
    # checked before the fit, so that a bad fine-tune option costs nothing
    train_config = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, distill=distill, seed=seed,
                               image_size=image_size, warmup_epochs=warmup, feature_weight=feature_weight
                               ) if epochs else None
    config, recal = batchnorm_mode(batchnorm, FitConfig(
        mode=fit_mode, images=fit_images, seed=seed, reconstruct=reconstruct, reconstruct_images=reconstruct_images,
        cache=fit_cache, cache_memory=int(cache_memory * 2**30)))
    net, spec = request.build()
    feed.apply(net)
    size = decoding_for(net, image_size)
    train_data = load_data(data, "train", data_root, size)
    if train_config is not None and not train_data.labelled:
        raise TrainingError(f"{data} has no labels: --epochs fine-tunes on labels; the fit, BatchNorm, "
                            "fidelity and --distill-epochs (label-free distillation) need none")
    if limit_train is not None:
        train_data = train_data.subset(_limit(limit_train, "--limit-train"))
    test_data = None
    if train_data.labelled:
        test_data = load_data(data, "test", data_root, size).subset(_limit(limit_test, "--limit-test"))
    search = None
    with progress_bars() as progress:
        if goal is not None:
            search = search_plan(net, goal, train_data, request.config(), fit=config, recalibrate=recal,
                                 max_trials=max_trials, time_limit=time_limit * 60 if time_limit else None,
                                 held_out=held_out, test=test_data, image_size=image_size,
                                 input_size=request.input_size, device=device, progress=progress)
            net, report = search.model, search.retrofit
        else:
            report = run_retrofit(net, request.config(), train_data, fit=config, recalibrate=recal,
                                  finetune=train_config, distill=distill_config, test=test_data, held_out=held_out,
                                  image_size=image_size,
                                  input_size=request.input_size, device=device, out=out, progress=progress)
    if train_config is None:
        extra = {"retrofit": report.record()} | ({"search": search.record()} if search is not None else {})
        save(net.cpu(), out, spec=spec, extra=extra)
    picture = None
    if search is not None:
        try:
            picture = plot_search(search.record(), plot or out.with_suffix(".search.png"),
                                  f"{request.model}: fidelity search for {goal} on {train_data.name}")
        except StudyError as e:
            typer.echo(f"plot not drawn: {e}", err=True)
    plan = plan_of(net)
    if as_json:
        steps = [{"step": s.name, "test_acc": s.accuracy, "seconds": s.seconds,
                  "fidelity": dataclasses.asdict(s.fidelity) if s.fidelity else None} for s in report.steps]
        typer.echo(json.dumps({"steps": steps, "plan": plan.to_dict() if plan else None,
                               "fit": dataclasses.asdict(report.fit) if report.fit else None, "out": str(out)}
                              | ({"search": search.record(), "plot": str(picture) if picture else None}
                                 if search is not None else {})))
    else:
        render_retrofit(report, Console())
        if search is not None:
            console = Console()
            console.print(search_table(search.record()))
            if search.costs and not report.costs:  # measured in trial 0; the plan kept is another
                console.print(costs_table([dataclasses.asdict(c) for c in search.costs]))
        typer.echo(f"wrote {out}" + (f" and {picture}" if picture else ""))
    if search is not None and not search.reached:
        raise typer.Exit(3)  # the closest plan is written; the target was not reached


def _limit(value: int | None, flag: str) -> int | None:
    if value is not None and value < 1:
        raise DataError(f"{flag} must be at least 1, got {value}")
    return value


app.command("calibrate", hidden=True, help="The old name of `kshare recalibrate`.")(recalibrate)
