"""The paper's experiment and the retrofit experiment it did not run, as data in, records out.

Two settings on one dataset:

1. *scratch* (the paper's): each architecture trained from random init unshared and with
   every sharing policy, the same budget, several seeds;
2. *retrofit* (new): the trained unshared model is tied with each policy and init strategy
   and fine-tuned for a fraction of the baseline's epochs, with and without distillation from
   the untied original.

Every run is a `RunRecord` (JSON-ready); the study file is rewritten after each run and runs
already in it are skipped, so an interrupted study continues where it stopped.
`results_page` (next to this file) turns the records into tables and plots.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from kshare import TrainConfig, evaluate, finetune, load, load_data, load_model, plan, tie
from kshare.data import Adapter, ImageData, input_channels
from kshare.errors import StudyError

STUDY_FORMAT = "kshare.study/1"


@dataclass(frozen=True)
class Arch:
    """One architecture of the study and its training budget."""

    label: str
    ref: str
    kwargs: dict[str, Any]
    epochs: int
    lr: float
    batch_size: int = 128
    image_size: int | None = None  # resize the data for this architecture (None: as it is)

    @property
    def slug(self) -> str:
        return self.label.lower().replace("/", "-").replace(" ", "-")


@dataclass(frozen=True)
class Study:
    """What to run. Defaults: the CPU study of `examples/reproduce_paper.py`."""

    archs: tuple[Arch, ...]
    data: str = "fashion-mnist"
    data_root: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    policies: tuple[str, ...] = ("all", "stage", "chunk:2")
    inits: tuple[str, ...] = ("first", "mean", "medoid")
    retrofit_seeds: tuple[int, ...] = (0,)
    retrofit_fraction: float = 0.5
    retrofit_lr_scale: float = 0.5
    train_limit: int | None = None
    test_limit: int | None = None
    train_eval_limit: int = 10_000

    def retrofit_epochs(self, arch: Arch) -> int:
        return max(1, round(arch.epochs * self.retrofit_fraction))


@dataclass
class RunRecord:
    """One trained model: what it was, what it stores, how well it does, how long it took."""

    key: str
    setting: str  # "scratch" or "retrofit"
    arch: str
    policy: str  # "none" for the unshared model
    seed: int
    epochs: int
    params: int
    file_bytes: int
    train_acc: float
    test_acc: float
    seconds: float
    init: str | None = None
    distill: bool | None = None
    acc_before: float | None = None  # retrofit: right after tying, before any fine-tuning
    baseline_acc: float | None = None  # retrofit: the unshared model it came from
    epochs_to_1pt: int | None = None  # retrofit: first epoch within 1 point of the baseline
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def gap(self) -> float:
        return self.train_acc - self.test_acc


def _key(*parts: object) -> str:
    return "/".join(str(p) for p in parts if p is not None)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _epochs_within(history: list[dict[str, Any]], baseline: float, points: float = 0.01) -> int | None:
    return next((row["epoch"] for row in history if row["test_acc"] >= baseline - points), None)


class StudyFile:
    """The JSON of a study: settings, machine, and every finished run, rewritten after each."""

    def __init__(self, path: Path, study: Study) -> None:
        self.path = path
        self.study = study
        self.records: dict[str, RunRecord] = {}
        self.notes: dict[str, Any] = {}
        self.machine = machine()  # where the runs were measured: a file keeps the one that started it
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise StudyError(f"{path} is not a study file: {exc}") from None
            if data.get("format") != STUDY_FORMAT:
                raise StudyError(f"{path} is not a kshare study file (format {data.get('format')!r})")
            if data.get("study") != _jsonable(study):
                raise StudyError(f"{path} holds a study with other settings: pass another --out, or delete it")
            self.records = {r["key"]: RunRecord(**r) for r in data.get("runs", [])}
            self.notes = data.get("notes", {})
            self.machine = data.get("machine") or self.machine

    def set_note(self, key: str, value: Any) -> None:
        self.notes[key] = value
        self._write()

    def add(self, record: RunRecord) -> None:
        self.records[record.key] = record
        self._write()

    def _write(self) -> None:
        payload = {"format": STUDY_FORMAT, "study": _jsonable(self.study), "machine": self.machine,
                   "notes": self.notes, "runs": [asdict(r) for r in self.records.values()]}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(self.path)


def _jsonable(study: Study) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(study)))


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    import os
    import platform

    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "device": "cpu"}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    return info


def _accuracy(model: nn.Module, data: ImageData, arch: Arch) -> float:
    adapter = Adapter.for_model(data, input_channels(model), arch.image_size, augment=False)
    return evaluate(model, data, adapter)["acc"]


def _train(model: nn.Module, arch: Arch, epochs: int, lr: float, seed: int, train: ImageData, test: ImageData,
           out: Path, teacher: nn.Module | None = None) -> tuple[dict[str, Any], float]:
    config = TrainConfig(epochs=epochs, lr=lr, batch_size=arch.batch_size, seed=seed, warmup_epochs=0.0,
                         distill=teacher is not None, image_size=arch.image_size)
    out.with_suffix(".metrics.jsonl").unlink(missing_ok=True)
    start = time.perf_counter()
    summary = finetune(model, train, test, config, out, teacher=teacher)
    return summary, time.perf_counter() - start


def run_study(study: Study, path: str | Path, work: str | Path, console: Console | None = None,
              on_record: Callable[[RunRecord], None] | None = None) -> list[RunRecord]:
    """Run every missing run of `study`, saving models under `work` and records in `path`."""
    console = console or Console(stderr=True)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    file = StudyFile(Path(path), study)
    train = load_data(study.data, "train", study.data_root).subset(study.train_limit)
    test = load_data(study.data, "test", study.data_root).subset(study.test_limit)
    train_eval = train.subset(study.train_eval_limit)
    kwargs: dict[str, Any] = {"num_classes": len(train.classes)}
    channels = train.images.shape[1]
    same = {arch.label: distinct_policies(study, arch, channels, train.images.shape[2], len(train.classes))
            for arch in study.archs}
    file.set_note("same_plan", {a: {p: q for p, q in m.items() if p != q} for a, m in same.items()})

    def record(rec: RunRecord) -> None:
        file.add(rec)
        if on_record:
            on_record(rec)
        console.print(f"[green]done[/] {rec.key}: test acc {rec.test_acc:.4f}, {rec.params:,} params, "
                      f"{rec.seconds:.0f} s", soft_wrap=True)

    for arch, seed, policy in _scratch_runs(study, same):
        key = _key("scratch", arch.slug, policy, f"seed{seed}")
        if key in file.records:
            continue
        console.print(f"[bold]{key}[/]: {arch.epochs} epochs from scratch", soft_wrap=True)
        torch.manual_seed(seed)
        model, _ = load_model(arch.ref, {**_channel_kwarg(arch, channels), **arch.kwargs, **kwargs})
        if policy != "none":
            tie(model, policy)
        out = work / f"{arch.slug}-{policy}-s{seed}.pt"
        summary, seconds = _train(model, arch, arch.epochs, arch.lr, seed, train, test, out)
        record(RunRecord(key, "scratch", arch.label, policy, seed, arch.epochs, _params(model), out.stat().st_size,
                         _accuracy(model, train_eval, arch), summary["history"][-1]["test_acc"], seconds,
                         init="random" if policy != "none" else None, history=summary["history"]))

    for arch, seed, policy, init, distill in _retrofit_runs(study, same):
        key = _key("retrofit", arch.slug, policy, init, "distill" if distill else "ce", f"seed{seed}")
        if key in file.records:
            continue
        base_key = _key("scratch", arch.slug, "none", f"seed{seed}")
        base_path = work / f"{arch.slug}-none-s{seed}.pt"
        if base_key not in file.records or not base_path.is_file():
            raise StudyError(f"{key} needs the trained baseline {base_path}: run the scratch setting first")
        baseline = file.records[base_key]
        teacher = load(base_path) if distill else None
        model = tie(load(base_path), policy, init=init)
        epochs = study.retrofit_epochs(arch)
        before = _accuracy(model, test, arch)
        console.print(f"[bold]{key}[/]: tied at {before:.4f} (baseline {baseline.test_acc:.4f}), "
                      f"{epochs} fine-tune epochs", soft_wrap=True)
        out = work / f"{arch.slug}-{policy}-{init}-{'kd' if distill else 'ce'}-s{seed}.pt"
        summary, seconds = _train(model, arch, epochs, arch.lr * study.retrofit_lr_scale, seed, train, test, out,
                                  teacher)
        record(RunRecord(key, "retrofit", arch.label, policy, seed, epochs, _params(model), out.stat().st_size,
                         _accuracy(model, train_eval, arch), summary["history"][-1]["test_acc"], seconds,
                         init=init, distill=distill, acc_before=before, baseline_acc=baseline.test_acc,
                         epochs_to_1pt=_epochs_within(summary["history"], baseline.test_acc),
                         history=summary["history"]))
    return list(file.records.values())


def distinct_policies(study: Study, arch: Arch, channels: int, size: int, classes: int) -> dict[str, str]:
    """Each policy of the study mapped to the first policy with the same groups for `arch`.

    On ConvMixer `stage` ties exactly what `all` ties (one resolution); training both would
    spend an hour to print the same row twice. A policy that ties nothing maps to "none".
    """
    model, _ = load_model(arch.ref, {**_channel_kwarg(arch, channels), **arch.kwargs, "num_classes": classes})
    size = arch.image_size or size
    seen: dict[tuple[tuple[str, ...], ...], str] = {}
    out = {}
    for policy in study.policies:
        groups = tuple(g.members for g in plan(model, policy, input_size=(channels, size, size)).groups)
        out[policy] = "none" if not groups else seen.setdefault(groups, policy)
    return out


def _channel_kwarg(arch: Arch, channels: int) -> dict[str, Any]:
    """The paper's models are built for the data's channels; others get them adapted (and say so)."""
    return {"in_chans": channels} if arch.ref.startswith("kshare:") else {}


def _scratch_runs(study: Study, same: dict[str, dict[str, str]]) -> Iterator[tuple[Arch, int, str]]:
    for arch in study.archs:
        for seed in study.seeds:
            for policy in ("none", *study.policies):
                if policy == "none" or same[arch.label][policy] == policy:
                    yield arch, seed, policy


def _retrofit_runs(study: Study, same: dict[str, dict[str, str]]) -> Iterator[tuple[Arch, int, str, str, bool]]:
    for arch in study.archs:
        for seed in study.retrofit_seeds:
            for policy in study.policies:
                if same[arch.label][policy] != policy:
                    continue
                for init in study.inits:
                    for distill in (False, True):
                        yield arch, seed, policy, init, distill


def read_study(path: str | Path) -> tuple[dict[str, Any], list[RunRecord]]:
    """A study file's header (settings, machine) and its records."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StudyError(f"cannot read study file {path}: {exc}") from None
    if data.get("format") != STUDY_FORMAT:
        raise StudyError(f"{path} is not a kshare study file")
    return data, [RunRecord(**r) for r in data.get("runs", [])]
