"""The fine-tune loop: cross-entropy plus optional distillation, cosine schedule, a precision
and memory format chosen by measurement, a checkpoint per epoch, resume, and DDP under
`torchrun` (gloo on CPU, nccl on GPU).

Data lives in memory as uint8, on the GPU when it fits (`kshare.data`); each step
gathers a batch by index and adapts it on the device, and the figures of a step stay there:
the host syncs only to check for a non-finite loss (every step on the CPU, where it costs
nothing, every 25 steps on a GPU: `CHECK_EVERY`) and at the end of the epoch. Rank 0 writes
checkpoints and metrics; at the end every rank's parameters are compared by checksum.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kshare.data import ImageData, adapter_for, check_splits, recipe_for
from kshare.errors import TrainingError, param
from kshare.fit.features import FeatureTaps, feature_loss, feature_points, matched_features
from kshare.fit.fidelity import logits_of
from kshare.io.checkpoint import save
from kshare.models.recipe import attach_recipe
from kshare.models.zoo import spec_of
from kshare.progress import ProgressFn, report
from kshare.surgery.tie import verify_tied
from kshare.training.config import TrainConfig
from kshare.training.evaluate import check_classes, evaluate
from kshare.training.precision import Setup, candidates, choose_setup, time_steps
from kshare.training.resume import (
    config_changes,
    metrics_path,
    restore_training,
    rng_state,
    state_path,
    sync_metrics,
)
from kshare.training.runtime import Runtime, all_sum, index_batches, runtime

log = logging.getLogger(__name__)

GPU_DATA_SHARE = 0.25  # a dataset taking at most this share of the free GPU memory lives there
CHECK_EVERY = {"cuda": 25, "cpu": 1}  # steps between non-finite-loss checks: each waits for the device


def distill_loss(student: torch.Tensor, teacher: torch.Tensor | None, target: torch.Tensor,
                 config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, cross-entropy, KD): total = (1 - alpha) CE + alpha T² KL(teacher ‖ student)."""
    ce = F.cross_entropy(student, target, label_smoothing=config.label_smoothing)
    if teacher is None:
        return ce, ce, torch.zeros((), device=student.device)
    t = config.temperature
    kd = F.kl_div(F.log_softmax(student.float() / t, 1), F.log_softmax(teacher.float() / t, 1),
                  reduction="batchmean", log_target=True) * t * t
    return (1 - config.alpha) * ce + config.alpha * kd, ce, kd


def parameters_without_grad(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of trainable parameters that one training-mode step leaves without a gradient.

    DDP needs `find_unused_parameters` exactly when this is not empty (auxiliary heads,
    branches a forward skips). The probe restores buffers, gradients and the RNG, so it
    changes nothing.
    """
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        logits_of(model(x)).float().sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    model.train(was_training)
    return unused


def _schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               nesterov=True)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def fingerprint(model: nn.Module) -> str:
    """A hash of every parameter's and buffer's exact bytes: equal only for identical models."""
    digest = hashlib.sha256()
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(name.encode())
        digest.update(p.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def nonfinite(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers holding a NaN or an infinity."""
    return [name for name, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def on_device(data: ImageData, rt: Runtime) -> ImageData:
    """`data` on the run's GPU when it fits in a small share of the free memory (uint8: Fashion-MNIST
    is 47 MB, CIFAR 180 MB), so steps gather batches there with no copy from the host."""
    if rt.device.type != "cuda":
        return data
    need = data.images.numel() * data.images.element_size() + data.labels.numel() * 8
    free, _ = torch.cuda.mem_get_info(rt.device)
    if need > GPU_DATA_SHARE * free:
        log.info(f"keeping {data.name} ({need / 2**20:,.0f} MiB) on the host: more than "
                 f"{GPU_DATA_SHARE:.0%} of the GPU's free memory; batches are copied per step")
        return data
    return dataclasses.replace(data, images=data.images.to(rt.device), labels=data.labels.to(rt.device))


def _choose(model: nn.Module, teacher: nn.Module | None, config: TrainConfig, rt: Runtime,
            x: torch.Tensor, y: torch.Tensor) -> Setup:
    """The setup of this run (`kshare.training.precision`): timed on copies of the model and a
    throwaway optimiser, under a forked RNG, so choosing changes nothing the run computes.
    Under DDP rank 0 chooses and the others follow."""
    options = candidates(rt.device, config.precision, config.channels_last, config.amp)

    def seconds(setup: Setup) -> float:
        trial = copy.deepcopy(model).to(memory_format=torch.channels_last if setup.channels_last
                                        else torch.contiguous_format)
        guide = copy.deepcopy(teacher) if teacher is not None else None
        optimizer, scaler, xs = _optimizer(trial, config), setup.scaler(rt.device), setup.layout(x)

        def step() -> None:
            with setup.autocast(rt.device):
                with torch.no_grad():
                    t_logits = logits_of(guide(xs)) if guide is not None else None
                loss, _, _ = distill_loss(logits_of(trial(xs)).float(), t_logits, y, config)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
            return time_steps(step, rt.device)

    chosen = [choose_setup(options, seconds) if rt.main or len(options) == 1 else None]
    if rt.world > 1 and len(options) > 1:
        dist.broadcast_object_list(chosen, 0)
    assert chosen[0] is not None
    return chosen[0]


def finetune(
    model: nn.Module,
    train_data: ImageData,
    test_data: ImageData,
    config: TrainConfig,
    out: str | Path,
    *,
    teacher: nn.Module | None = None,
    resume: dict[str, Any] | None = None,
    metrics: str | Path | None = None,
    device: str | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Train `model` (tied or not) and save it to `out` after every epoch; returns a summary.

    `resume` is the training state from `resume_state`: the optimiser, schedule, RNG, setup and
    epoch continue from there. Sharing survives: the optimiser sees each shared tensor once,
    and the aliasing is checked before and after. A non-finite loss, test loss or weight stops
    the run before anything is written, so the last checkpoint is always a good one. The model
    keeps (and its checkpoints record) how it was fed: input size, normalisation, classes.
    `progress` hears of every step (`Tick`s named `epoch E/N`); what the run decides and each
    epoch's figures go to the `kshare` logger.
    """
    if config.distill and teacher is None:
        raise TrainingError(f"distillation needs a teacher: pass {param('teacher')}")
    if config.feature_weight > 0 and teacher is None:
        raise TrainingError(f"{param('feature_weight')} matches a teacher's block outputs: pass {param('teacher')}")
    points = feature_points(model) if config.feature_weight > 0 else []  # refuses an untied model before any work
    check_splits(train_data, test_data)
    rt = runtime(device)
    out = Path(out)
    metrics_file = Path(metrics) if metrics else metrics_path(out)
    torch.manual_seed(config.seed + rt.rank)
    random.seed(config.seed)
    train_adapter = adapter_for(model, train_data, config.image_size, augment=True, announce=rt.main)
    test_adapter = adapter_for(model, test_data, config.image_size)
    recipe = recipe_for(train_adapter, train_data)

    model.to(rt.device)
    verify_tied(model)
    check_classes(model, test_data, test_adapter, rt.device)
    if teacher is not None:
        teacher.to(rt.device).eval().requires_grad_(False)
    train, test = on_device(train_data, rt), on_device(test_data, rt)
    optimizer = _optimizer(model, config)
    steps = len(list(index_batches(len(train.labels), config.batch_size, rt, None)))
    scheduler = _schedule(optimizer, config.epochs * steps, int(config.warmup_epochs * steps))
    start, setup = 0, None
    if resume:
        start = restore_training(resume, config, optimizer, scheduler, str(state_path(out)))
        saved = resume.get("setup")
        if saved and config.precision == "auto" and config.channels_last is None:
            kept = Setup(str(saved.get("precision", "fp32")), bool(saved.get("channels_last")))
            setup = dataclasses.replace(kept, reason=f"{kept.label} (kept from the run being resumed)")
        if rt.main:
            log.info(f"resuming after epoch {start} of {config.epochs} from {state_path(out)}")
            changed = config_changes(resume.get("config", {}), config)
            if changed:
                log.warning("resuming with changed settings: " + ", ".join(changed))
            if "metrics" in resume:
                sync_metrics(metrics_file, start, resume["metrics"])
    elif rt.main:
        _start_fresh(out, metrics_file)
    if setup is None:
        probe = train.images[: min(config.batch_size, len(train.labels))]
        setup = _choose(model, teacher if config.distill else None, config, rt,
                        train_adapter(probe.to(rt.device)), train.labels[: len(probe)].to(rt.device))
    if rt.main:
        log.info(f"steps run in {setup.reason}")
    if setup.channels_last:
        model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if rt.world > 1:
        probe = train_adapter(train.images[:2].to(rt.device))
        unused = parameters_without_grad(model, probe)
        if unused and rt.main:
            log.info(f"{len(unused)} parameters get no gradient ({', '.join(unused[:3])}"
                     f"{', ...' if len(unused) > 3 else ''}): DDP looks for unused parameters every step")
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            find_unused_parameters=bool(unused))
    if config.compile:
        net = torch.compile(net)
    scaler = setup.scaler(rt.device)
    check_every = CHECK_EVERY.get(rt.device.type, 1)

    history: list[dict[str, Any]] = []
    matching = matched_features(model, teacher, points) if points and teacher is not None else nullcontext()
    with matching as taps:
        for epoch in range(start, config.epochs):
            net.train()
            task = f"epoch {epoch + 1}/{config.epochs}"
            gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
            loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
            correct = torch.zeros((), dtype=torch.long, device=rt.device)
            first_bad = torch.full((), -1, dtype=torch.long, device=rt.device)
            seen, stats = 0, ""
            last = f"the last good checkpoint {out} (epoch {epoch}) is kept" if epoch > 0 else \
                "no checkpoint was written"
            t0 = time.perf_counter()
            for step, idx in enumerate(index_batches(len(train.labels), config.batch_size, rt, gen,
                                                     device=train.images.device)):
                x = setup.layout(train_adapter(train.images[idx].to(rt.device, non_blocking=True), train=True))
                y = train.labels[idx].to(rt.device, non_blocking=True)
                _tapping(taps, True)
                with setup.autocast(rt.device):
                    logits = logits_of(net(x))
                    with torch.no_grad():
                        t_logits = logits_of(teacher(x)) if teacher is not None and config.uses_teacher else None
                    loss, _, _ = distill_loss(logits.float(), t_logits if config.distill else None, y, config)
                    if taps is not None:
                        loss = loss + config.feature_weight * feature_loss(taps[0].take(), taps[1].take())
                _tapping(taps, False)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()),
                                        torch.full_like(first_bad, step), first_bad)
                if (step + 1) % check_every == 0 or step + 1 == steps:
                    _stop_if_bad(first_bad, loss, rt, epoch, last)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.clip_grad > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                loss_sum += loss.detach().double() * len(idx)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(idx)
                if rt.main and progress is not None:
                    if (step + 1) % check_every == 0 or step + 1 == steps:  # the figures cost a sync
                        stats = f"loss {loss_sum.item() / seen:.3f} acc {correct.item() / seen:.3f}"
                    rate = seen * rt.world / (time.perf_counter() - t0)
                    report(progress, task, step + 1, steps, f"{rate:,.0f} img/s {stats}")
            if rt.device.type == "cuda":
                torch.cuda.synchronize(rt.device)
            seconds = time.perf_counter() - t0
            loss_total, right, seen_all = all_sum([loss_sum.item(), float(correct.item()), float(seen)], rt)
            if rt.world > 1:
                # DDP sends rank 0's buffers before each forward, so each rank's last forward
                # leaves its own batch-norm statistics: make every rank evaluate (and rank 0 save) one model.
                for buffer in model.buffers():
                    dist.broadcast(buffer, 0)
            # under DDP every rank evaluates its own share of the images, so not through DDP's collective forward
            test_figures = evaluate(model if rt.world > 1 else net, test, test_adapter, max(256, config.batch_size), rt,
                                    setup)
            broken = nonfinite(model)
            if broken or not math.isfinite(test_figures["loss"]):
                what = f"{len(broken)} weight tensor(s) hold non-finite values (e.g. {broken[0]})" if broken else \
                    f"the test loss is {test_figures['loss']}"
                raise TrainingError(f"after epoch {epoch + 1} {what}; {last}; lower {param('lr')} or set "
                                    f"{param('clip_grad')}")
            row = {"epoch": epoch + 1, "train_loss": loss_total / seen_all, "train_acc": right / seen_all,
                   "test_loss": test_figures["loss"], "test_acc": test_figures["acc"], "lr": scheduler.get_last_lr()[0],
                   "images_per_s": seen_all / seconds, "seconds": seconds, "world_size": rt.world, **setup.to_dict()}
            history.append(row)
            if rt.main:
                # The resumable state first (model + optimiser), then the slim model: a kill
                # between the two loses nothing, and `out` never carries optimiser moments.
                attach_recipe(model, recipe)
                provenance = {"epoch": epoch + 1, "data": train_data.name, "train_images": len(train_data.labels),
                              "config": asdict(config), "metrics": row}
                train_state = provenance | {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                            "rng": rng_state(), "setup": setup.to_dict()}
                save(model, state_path(out), spec=spec_of(model), extra={"train_state": train_state})
                save(model, out, spec=spec_of(model), extra={"finetune": provenance})
                with open(metrics_file, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                log.info(f"epoch {epoch + 1}/{config.epochs}: train loss {row['train_loss']:.4f} "
                         f"acc {row['train_acc']:.4f}, test loss {row['test_loss']:.4f} "
                         f"acc {row['test_acc']:.4f}, {row['images_per_s']:,.0f} img/s")
            if rt.world > 1:
                dist.barrier()

    if setup.channels_last:
        model.to(memory_format=torch.contiguous_format)
    attach_recipe(model, recipe)
    verify_tied(model)
    summary: dict[str, Any] = {"out": str(out), "epochs": config.epochs, "history": history,
                               "world_size": rt.world, "fingerprint": fingerprint(model), "setup": setup.to_dict()}
    if rt.world > 1:
        prints: list[Any] = [None] * rt.world
        dist.all_gather_object(prints, summary["fingerprint"])
        if len(set(prints)) != 1:
            raise TrainingError(f"parameters differ across ranks after training: fingerprints {prints}")
        summary["rank_fingerprints"] = prints
        if rt.main:
            log.info(f"parameters and buffers identical on all {rt.world} ranks (fingerprint {prints[0]})")
    return summary


def _tapping(taps: tuple[FeatureTaps, FeatureTaps] | None, on: bool) -> None:
    """Feature taps keep outputs only around a training step's forwards, never in evaluation."""
    if taps is not None:
        for tap in taps:
            tap.on = on


def _stop_if_bad(first_bad: torch.Tensor, loss: torch.Tensor, rt: Runtime, epoch: int, last: str) -> None:
    """Raise if any rank saw a non-finite loss since the last check. Every rank checks at the same
    steps and learns of the first bad step on any rank, so all stop together (a rank that stopped
    alone would leave the others waiting in the next gradient all-reduce)."""
    bad_step = int(first_bad)
    step = bad_step
    if rt.world > 1:
        earliest = torch.tensor([bad_step if bad_step >= 0 else 2**62], device=rt.device)
        dist.all_reduce(earliest, op=dist.ReduceOp.MIN)
        step = int(earliest.item()) if int(earliest.item()) < 2**62 else -1
    if step < 0:
        return
    if bad_step >= 0:
        where = f" on rank {rt.rank}" if rt.world > 1 else ""
        value = loss.item() if bad_step == step and not bool(torch.isfinite(loss)) else "non-finite"
    else:
        where, value = "", "non-finite on another rank"
    raise TrainingError(f"loss became {value}{where} at epoch {epoch + 1} step {step + 1}; {last}; "
                        f"lower {param('lr')} or set {param('clip_grad')}")


def _start_fresh(out: Path, metrics_file: Path) -> None:
    """A new run writing where another wrote: its metrics start empty (they would interleave
    with the old run's epochs), and the user hears that the old run is replaced."""
    old = state_path(out)
    if old.is_file() or (metrics_file.is_file() and metrics_file.stat().st_size):
        log.warning(f"starting a new run in {out}: the metrics and resumable state of the run written there "
                    f"before are replaced (pass {param('resume', True)} to continue that run instead)")
    if metrics_file.is_file():
        metrics_file.write_text("")

