"""Resumable runs: where the state lives, reading it back (checked, since a file may hold
anything), the settings a resumed run changes, and the metrics file kept to the epochs done."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kshare._checks import is_int
from kshare.errors import TrainingError, param
from kshare.io.checkpoint import read, restore
from kshare.training.config import TrainConfig


def state_path(out: str | Path) -> Path:
    """Where a run writing `out` keeps its resumable state: `model.pt` → `model.resume.pt`."""
    out = Path(out)
    return out.with_name(out.stem + ".resume" + (out.suffix or ".pt"))


def metrics_path(out: str | Path) -> Path:
    """Where a run writing `out` appends its metrics: `model.pt` → `model.metrics.jsonl`."""
    return Path(out).with_suffix(".metrics.jsonl")


def resume_state(out: str | Path, model: nn.Module | None = None, trust_code: bool = False
                 ) -> tuple[nn.Module, dict[str, Any]]:
    """The model and training state saved by the last completed epoch of the run writing `out`."""
    path = state_path(out)
    if not path.is_file():
        raise TrainingError(f"no resumable state {path} next to {out}: pass the {param('out')} of a run that "
                            "finished at least one epoch")
    payload = read(path)
    state = payload.get("extra", {}).get("train_state")
    if not state:
        raise TrainingError(f"{path} holds no training state to resume from")
    check_train_state(state, str(path))
    return restore(payload, model, what=str(path), trust_code=trust_code), state


def check_train_state(state: Any, what: str) -> None:
    """The parts of a resumable state the loop reads, each of the right kind."""
    def bad(part: str) -> TrainingError:
        return TrainingError(f"{what} holds a damaged training state ({part}): resume is not possible; start "
                             "the run again without resuming")

    if not isinstance(state, Mapping):
        raise bad("not a mapping")
    if not is_int(state.get("epoch")) or state["epoch"] < 1:
        raise bad("epoch")
    for key in ("optimizer", "scheduler", "rng", "config"):
        if not isinstance(state.get(key), Mapping):
            raise bad(key)
    rng = state["rng"]
    if not isinstance(rng.get("torch"), torch.Tensor) or rng["torch"].dtype != torch.uint8 \
            or not isinstance(rng.get("python"), tuple):
        raise bad("random number generator state")
    if "setup" in state and not isinstance(state["setup"], Mapping):
        raise bad("setup")


def restore_training(state: Mapping[str, Any], config: TrainConfig, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, what: str) -> int:
    """Load the optimiser, schedule and RNG of a resumable state; the epoch it ends. Moments of
    one optimiser cannot continue another: changing it on resume is refused."""
    saved = state["config"].get("optimizer")
    if saved != config.optimizer:
        raise TrainingError(f"the run in {what} trained with {saved!r}; resume it with "
                            f"{param('optimizer', saved)} (its state cannot continue {config.optimizer!r}), "
                            "or start a new run")
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise TrainingError(f"{what} holds a damaged training state ({type(exc).__name__}): resume is not "
                            "possible; start the run again without resuming") from None
    return int(state["epoch"])


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_changes(saved: Mapping[str, Any], config: TrainConfig) -> list[str]:
    """Settings a resumed run changes relative to the run it continues (epochs aside)."""
    now = asdict(config)
    return [f"{k} {saved[k]!r} → {now[k]!r}" for k in now if k != "epochs" and k in saved and saved[k] != now[k]]


def sync_metrics(path: Path, epoch: int, row: dict[str, Any]) -> None:
    """Make the metrics file hold exactly the rows of epochs 1..`epoch` before a resumed run appends."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                item = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue  # a line cut short by the kill
            if isinstance(item, dict) and is_int(item.get("epoch")) and item["epoch"] < epoch:
                rows.append(item)
    rows = [r for i, r in enumerate(rows) if all(r["epoch"] != q["epoch"] for q in rows[i + 1 :])]
    if isinstance(row, dict):
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


