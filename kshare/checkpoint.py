"""`save` and `load`: a checkpoint that stores each shared tensor once and re-ties on load.

The file is a dict of plain containers and tensors (so `torch.load(weights_only=True)` reads
it): the source spec that rebuilds the architecture, the sharing plan, the state dict with
each aliased tensor stored under one key, and the alias table for the others. It is written
to a temporary file in the same folder and renamed over the target, so an interrupted save
leaves the previous file intact. Loading a plain `load_state_dict` into an untied model
would silently untie it; `load` ties from the plan first, then copies the state in.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kshare._version import __version__
from kshare.errors import CheckpointError, KShareError
from kshare.plan import SharingPlan
from kshare.safeio import safe_load
from kshare.surgery import plan_of, tie
from kshare.zoo import ModelSpec, attach_spec, build, check_state_fits, spec_of

CHECKPOINT_FORMAT = "kshare.checkpoint/1"
_UMASK = os.umask(0)  # read once, at import: umask can only be read by setting it
os.umask(_UMASK)


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Two state entries with this key are one tensor (same memory, same view)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def dedup_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep the first key of each aliased tensor; map every other key to it."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple[Any, ...], str] = {}
    for key, tensor in state.items():
        k = _storage_key(tensor)
        if k in first and tensor.numel() > 0:
            aliases[key] = first[k]
        else:
            first.setdefault(k, key)
            unique[key] = tensor
    return unique, aliases


def expand_state(unique: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The full state dict back: every alias key points at its tensor."""
    state = dict(unique)
    for key, target in aliases.items():
        if target not in unique:
            raise CheckpointError(f"checkpoint alias {key!r} points at missing tensor {target!r}")
        state[key] = unique[target]
    return state


def pack_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors as views into one storage per dtype.

    `torch.save` writes one archive record (headers, name, alignment padding) per storage,
    about 190 bytes each: 7% of the small DenseNet's file in docs/results.md when every tensor
    has its own, and more than a relaxed model's small per-member tensors hold. Saving holds
    one extra copy of the tensors while the storage is assembled."""
    groups: dict[torch.dtype, list[str]] = {}
    for key, tensor in state.items():
        if tensor.layout == torch.strided and not tensor.is_quantized and tensor.numel():
            groups.setdefault(tensor.dtype, []).append(key)
    packed = dict(state)
    for keys in groups.values():
        flat = torch.cat([state[k].reshape(-1) for k in keys])
        offset = 0
        for key in keys:
            n = state[key].numel()
            packed[key] = flat[offset:offset + n].view(state[key].shape)
            offset += n
    return packed


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the distinct tensors in a state dict."""
    unique, _ = dedup_state(state)
    return sum(t.numel() * t.element_size() for t in unique.values())


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write via a temporary file in the target's folder, fsync, then rename over the target."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CheckpointError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # mkstemp makes the file 0600: give it the mode a plain open() would (or the old file's)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_UMASK)
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def checkpoint_payload(model: nn.Module, spec: ModelSpec | None = None, extra: Mapping[str, Any] | None = None
                       ) -> dict[str, Any]:
    """The dict `save` writes: plain containers and tensors only."""
    spec = spec or spec_of(model)
    plan = plan_of(model)
    unique, aliases = dedup_state(model.state_dict())  # on the model's device: .cpu() would copy aliases apart
    unique = pack_state({k: v.detach().cpu() for k, v in unique.items()})
    return {
        "format": CHECKPOINT_FORMAT,
        "kshare_version": __version__,
        "spec": spec.to_dict() if spec else None,
        "plan": plan.to_dict() if plan else None,
        "state": unique,
        "aliases": aliases,
        "extra": dict(extra or {}),
    }


def save(model: nn.Module, path: str | Path, *, spec: ModelSpec | None = None,
         extra: Mapping[str, Any] | None = None) -> Path:
    """Write `model` (tied or not) atomically; each shared tensor is stored once."""
    payload = checkpoint_payload(model, spec, extra)
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read(path: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint's payload without building anything."""
    payload = safe_load(path, CheckpointError)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a kshare checkpoint (no {CHECKPOINT_FORMAT!r} marker): "
                              "pass a file written by `kshare apply` or kshare.save")
    for key, kind in (("state", torch.Tensor), ("aliases", str)):
        section = payload.get(key)
        if not isinstance(section, dict):
            raise CheckpointError(f"{path} is a damaged kshare checkpoint: no {key!r} section")
        if not all(isinstance(k, str) and isinstance(v, kind) for k, v in section.items()):
            raise CheckpointError(f"{path} is a damaged kshare checkpoint: its {key!r} section holds "
                                  f"entries other than names of {kind.__name__}s")
    return payload


def plan_from(payload: Mapping[str, Any]) -> SharingPlan | None:
    data = payload.get("plan")
    return SharingPlan.from_dict(data) if data else None


def spec_from(payload: Mapping[str, Any], what: str = "checkpoint") -> ModelSpec | None:
    """The payload's source spec, checked for shape (a file may hold anything `weights_only` admits)."""
    data = payload.get("spec")
    if not data:
        return None
    if not (isinstance(data, Mapping) and isinstance(data.get("source"), str) and isinstance(data.get("name"), str)
            and isinstance(data.get("kwargs") or {}, Mapping)):
        raise CheckpointError(f"{what} is a damaged kshare checkpoint: its model spec is malformed")
    return ModelSpec.from_dict(data)


def restore(payload: Mapping[str, Any], model: nn.Module | None = None, what: str = "checkpoint",
            trust_code: bool = False) -> nn.Module:
    """Build (or take) the model, tie it from the plan, copy the state in.

    A spec that rebuilds by importing or calling the user's code (`module:factory`,
    `file.py:factory`) is built only with `trust_code`: otherwise a file would run code on load."""
    spec = spec_from(payload, what)
    if model is None:
        if spec is None:
            raise CheckpointError(
                f"{what} holds a model kshare cannot rebuild: pass the model (kshare.load(path, model), --model)"
            )
        if not trust_code and spec.runs_user_code:
            raise CheckpointError(
                f"{what} rebuilds its model by running {spec.name} (code outside kshare, torchvision and timm): "
                "if you trust the file, pass --trust-code (kshare.load(path, trust_code=True)), or pass the model"
            )
        try:
            model = build(spec)
        except KShareError as exc:
            raise CheckpointError(f"cannot rebuild the model of {what}: {exc}") from None
    if spec is not None:
        attach_spec(model, spec)
    state = expand_state(payload["state"], payload["aliases"])
    plan = plan_from(payload)
    if plan is not None:
        try:
            plan.validate(model)
            tie(model, plan)  # a relaxed plan renames the members' kernels: check the state after
        except KShareError as exc:
            raise CheckpointError(f"the plan in {what} does not fit the model: {exc}") from None
    check_state_fits(model, state, CheckpointError, f"the tensors in {what}")
    model.load_state_dict(state, strict=True)
    return model


def load(path: str | Path, model: nn.Module | None = None, *, trust_code: bool = False) -> nn.Module:
    """Load a kshare checkpoint (`.pt`, or a `.safetensors` export): tied exactly as saved.

    `trust_code`: rebuild a model whose spec names the user's own code (see `restore`)."""
    if Path(path).suffix == ".safetensors":
        from kshare.export import read_safetensors

        return restore(read_safetensors(path), model, what=str(path), trust_code=trust_code)
    return restore(read(path), model, what=str(path), trust_code=trust_code)


def summarize(path: str | Path) -> dict[str, Any]:
    """Figures about a checkpoint, read without building the model (for `kshare info`)."""
    payload = read(path)
    plan = plan_from(payload)
    unique, aliases = payload["state"], payload["aliases"]
    stored = sum(t.numel() * t.element_size() for t in unique.values())
    expanded = stored + sum(unique[t].numel() * unique[t].element_size() for t in aliases.values())
    spec = spec_from(payload, str(path))
    return {
        "path": str(path),
        "file_bytes": Path(path).stat().st_size,
        "kshare_version": payload.get("kshare_version"),
        "source": spec.ref if spec else None,
        "kwargs": spec.kwargs if spec else {},
        "tensors_stored": len(unique),
        "aliases": len(aliases),
        "stored_tensor_bytes": stored,
        "untied_tensor_bytes": expanded,
        "plan": plan.to_dict() if plan else None,
        "training": _training_summary(payload.get("extra", {})),
    }


def _training_summary(extra: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON-safe part of a fine-tune's record: epoch, settings, last metrics, resumable or not."""
    record = extra.get("finetune") or extra.get("train_state")
    if not isinstance(record, Mapping):
        return None
    keep = {k: record[k] for k in ("epoch", "data", "config", "metrics") if k in record}
    return keep | {"resumable": "optimizer" in record}
