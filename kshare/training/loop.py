"""The fine-tune loop: cross-entropy plus optional distillation, cosine schedule, AMP on
CUDA, a checkpoint per epoch, resume, and DDP under `torchrun` (gloo on CPU, nccl on GPU).

Data lives in memory as uint8 (`kshare.data`); each step gathers a batch by index and adapts
it on the device, so the loop is as fast as a hand-written one. Rank 0 writes checkpoints
and metrics; at the end every rank's parameters are compared by checksum.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kshare.errors import TrainingError, param
from kshare.io.checkpoint import read, restore, save
from kshare.models.zoo import spec_of
from kshare.progress import ProgressFn, report
from kshare.surgery.tie import verify_tied
from kshare.training.data import Adapter, ImageData, input_channels
from kshare.training.runtime import Runtime, all_sum, index_batches, runtime

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a fine-tune run computes (stored in its checkpoints)."""

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 128
    optimizer: str = "adamw"
    weight_decay: float = 0.05
    momentum: float = 0.9
    warmup_epochs: float = 0.0
    clip_grad: float = 0.0
    label_smoothing: float = 0.0
    distill: bool = False
    temperature: float = 4.0
    alpha: float = 0.5
    seed: int = 0
    amp: bool = True
    image_size: int | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise TrainingError(f"unknown optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise TrainingError("epochs and batch size must be at least 1 and the learning rate positive")
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise TrainingError("distillation needs 0 <= alpha <= 1 and a positive temperature")


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


def _autocast(rt: Runtime, config: TrainConfig) -> Any:
    if rt.device.type != "cuda" or not config.amp:
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def logits_of(output: Any) -> torch.Tensor:
    """The class logits of a model's output: the tensor itself, or the main head of a tuple
    (Inception's and GoogLeNet's auxiliary outputs in training mode) or of a `.logits` field."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TrainingError(f"the model returns {type(output).__name__}, not class logits kshare can train on")


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


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, adapter: Adapter | None = None, batch_size: int = 256,
             rt: Runtime | None = None, config: TrainConfig | None = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy on `data` (sharded over ranks under DDP).

    Without an `adapter`, images are normalised with the data's statistics and their channels
    matched to the model's first convolution (sizes as they are).
    """
    rt = rt or Runtime(0, 1, next(model.parameters()).device)
    adapter = adapter or Adapter.for_model(data, input_channels(model), None, augment=False)
    was_training = model.training
    model.eval()
    loss = correct = count = 0.0
    for idx in index_batches(len(data.labels), batch_size, rt, None, every=True):
        x = adapter(data.images[idx].to(rt.device, non_blocking=True))
        y = data.labels[idx].to(rt.device, non_blocking=True)
        with _autocast(rt, config or TrainConfig()):
            logits = logits_of(model(x))
        loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
    model.train(was_training)
    loss, correct, count = all_sum([loss, correct, count], rt)
    return {"loss": loss / max(count, 1), "acc": correct / max(count, 1), "n": count}


def check_classes(model: nn.Module, data: ImageData, adapter: Adapter, device: torch.device) -> None:
    """Refuse a model whose output width differs from the dataset's number of classes."""
    model_was = model.training
    model.eval()
    with torch.no_grad():
        out = logits_of(model(adapter(data.images[:2].to(device))))
    model.train(model_was)
    if out.ndim != 2 or out.shape[1] != len(data.classes):
        width = out.shape[1] if out.ndim == 2 else tuple(out.shape[1:])
        raise TrainingError(f"the model outputs {width} classes but {data.name} has {len(data.classes)}: "
                            f"build it with {param('num_classes', len(data.classes))}")


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


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_path(out: str | Path) -> Path:
    """Where a run writing `out` keeps its resumable state: `model.pt` → `model.resume.pt`."""
    out = Path(out)
    return out.with_name(out.stem + ".resume" + (out.suffix or ".pt"))


def resume_state(out: str | Path, model: nn.Module | None = None, trust_code: bool = False
                 ) -> tuple[nn.Module, dict[str, Any]]:
    """The model and training state saved by the last completed epoch of the run writing `out`."""
    path = state_path(out)
    if not path.is_file():
        raise TrainingError(f"no resumable state {path} next to {out}: pass the --out of a run that finished "
                            "at least one epoch")
    payload = read(path)
    state = payload.get("extra", {}).get("train_state")
    if not state:
        raise TrainingError(f"{path} holds no training state to resume from")
    return restore(payload, model, what=str(path), trust_code=trust_code), state


def config_changes(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """Settings a resumed run changes relative to the run it continues (epochs aside)."""
    now = asdict(config)
    return [f"{k} {saved[k]!r} → {now[k]!r}" for k in now if k != "epochs" and k in saved and saved[k] != now[k]]


def _sync_metrics(path: Path, epoch: int, row: dict[str, Any]) -> None:
    """Make the metrics file hold exactly the rows of epochs 1..`epoch` before a resumed run appends."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill
            if isinstance(item, dict) and isinstance(item.get("epoch"), int) and item["epoch"] < epoch:
                rows.append(item)
    rows = [r for i, r in enumerate(rows) if all(r["epoch"] != q["epoch"] for q in rows[i + 1 :])]
    rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def fingerprint(model: nn.Module) -> str:
    """A hash of every parameter's and buffer's exact bytes: equal only for identical models."""
    digest = hashlib.sha256()
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(name.encode())
        digest.update(p.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


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

    `resume` is the training state from `resume_state`: the optimiser, schedule, RNG and
    epoch continue from there. Sharing survives: the optimiser sees each shared tensor once,
    and the aliasing is checked before and after. `progress` hears of every step (`Tick`s
    named `epoch E/N`); what the run decides and each epoch's figures go to the `kshare` logger.
    """
    if config.distill and teacher is None:
        raise TrainingError(f"distillation needs a teacher: pass {param('teacher')}")
    rt = runtime(device)
    out, metrics_path = Path(out), Path(metrics) if metrics else Path(out).with_suffix(".metrics.jsonl")
    torch.manual_seed(config.seed + rt.rank)
    random.seed(config.seed)
    channels = input_channels(model)
    train_adapter = Adapter.for_model(train_data, channels, config.image_size, augment=True)
    test_adapter = Adapter.for_model(test_data, channels, config.image_size, augment=False)
    note = train_adapter.describe(train_data)
    if note and rt.main:
        log.info(note)

    model.to(rt.device)
    if rt.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    verify_tied(model)
    check_classes(model, test_data, test_adapter, rt.device)
    if teacher is not None:
        teacher.to(rt.device).eval().requires_grad_(False)
    optimizer = _optimizer(model, config)
    steps = len(list(index_batches(len(train_data.labels), config.batch_size, rt, None)))
    scheduler = _schedule(optimizer, config.epochs * steps, int(config.warmup_epochs * steps))
    use_fp16 = rt.device.type == "cuda" and config.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_fp16)
    start = 0
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        _set_rng_state(resume["rng"])
        start = int(resume["epoch"])
        if rt.main:
            log.info(f"resuming after epoch {start} of {config.epochs} from {state_path(out)}")
            changed = config_changes(resume.get("config", {}), config)
            if changed:
                log.warning("resuming with changed settings: " + ", ".join(changed))
            if "metrics" in resume:
                _sync_metrics(metrics_path, start, resume["metrics"])
    net: nn.Module = model
    if rt.world > 1:
        probe = train_adapter(train_data.images[:2].to(rt.device))
        unused = parameters_without_grad(model, probe)
        if unused and rt.main:
            log.info(f"{len(unused)} parameters get no gradient ({', '.join(unused[:3])}"
                     f"{', ...' if len(unused) > 3 else ''}): DDP looks for unused parameters every step")
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            find_unused_parameters=bool(unused))

    history: list[dict[str, Any]] = []
    for epoch in range(start, config.epochs):
        net.train()
        task = f"epoch {epoch + 1}/{config.epochs}"
        gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        loss_sum = correct = seen = 0.0
        t0 = time.perf_counter()
        for step, idx in enumerate(index_batches(len(train_data.labels), config.batch_size, rt, gen)):
            x = train_adapter(train_data.images[idx].to(rt.device, non_blocking=True), train=True)
            y = train_data.labels[idx].to(rt.device, non_blocking=True)
            if rt.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(rt, config):
                logits = logits_of(net(x))
                with torch.no_grad():
                    t_logits = logits_of(teacher(x)) if teacher is not None and config.distill else None
                loss, _, _ = distill_loss(logits.float(), t_logits, y, config)
            finite = bool(torch.isfinite(loss))
            # every rank learns of a bad loss on any rank and stops with it: a rank that stopped
            # alone would leave the others waiting in the next gradient all-reduce
            if (not finite if rt.world == 1 else all_sum([float(not finite)], rt)[0] > 0):
                last = f"the last good checkpoint {out} (epoch {epoch}) is kept" if epoch > 0 else \
                    "no checkpoint was written"
                where = "" if finite else f" on rank {rt.rank}" if rt.world > 1 else ""
                value = loss.item() if not finite else "non-finite on another rank"
                raise TrainingError(f"loss became {value}{where} at epoch {epoch + 1} step {step + 1}; {last}; "
                                    f"lower {param('lr')} or set {param('clip_grad')}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.clip_grad > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            rate = seen * rt.world / (time.perf_counter() - t0)
            if rt.main:
                report(progress, task, step + 1, steps, f"{rate:,.0f} img/s loss {loss_sum / seen:.3f} "
                                                        f"acc {correct / seen:.3f}")
        seconds = time.perf_counter() - t0
        loss_sum, correct, seen = all_sum([loss_sum, correct, seen], rt)
        if rt.world > 1:
            # DDP sends rank 0's buffers before each forward, so each rank's last forward
            # leaves its own batch-norm statistics: make every rank evaluate (and rank 0 save) one model.
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
        test = evaluate(model, test_data, test_adapter, max(256, config.batch_size), rt, config)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
               "test_loss": test["loss"], "test_acc": test["acc"], "lr": scheduler.get_last_lr()[0],
               "images_per_s": seen / seconds, "seconds": seconds, "world_size": rt.world}
        history.append(row)
        if rt.main:
            # The resumable state first (model + optimiser), then the slim model: a kill
            # between the two loses nothing, and `out` never carries optimiser moments.
            provenance = {"epoch": epoch + 1, "data": train_data.name, "train_images": len(train_data.labels),
                          "config": asdict(config), "metrics": row}
            train_state = provenance | {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                        "rng": _rng_state()}
            save(model, state_path(out), spec=spec_of(model), extra={"train_state": train_state})
            save(model, out, spec=spec_of(model), extra={"finetune": provenance})
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            log.info(f"epoch {epoch + 1}/{config.epochs}: train loss {row['train_loss']:.4f} "
                     f"acc {row['train_acc']:.4f}, test loss {row['test_loss']:.4f} "
                     f"acc {row['test_acc']:.4f}, {row['images_per_s']:,.0f} img/s")
        if rt.world > 1:
            dist.barrier()

    verify_tied(model)
    summary: dict[str, Any] = {"out": str(out), "epochs": config.epochs, "history": history,
                               "world_size": rt.world, "fingerprint": fingerprint(model)}
    if rt.world > 1:
        prints: list[Any] = [None] * rt.world
        dist.all_gather_object(prints, summary["fingerprint"])
        if len(set(prints)) != 1:
            raise TrainingError(f"parameters differ across ranks after training: fingerprints {prints}")
        summary["rank_fingerprints"] = prints
        if rt.main:
            log.info(f"parameters and buffers identical on all {rt.world} ranks (fingerprint {prints[0]})")
    return summary


