"""`save` and `load`: a checkpoint that stores each shared tensor once and re-ties on load.

The file is the payload of `kshare.io.payload` (plain containers and tensors, so
`torch.load(weights_only=True)` reads it): the source spec that rebuilds the architecture,
the sharing plan, the state dict with each aliased tensor stored under one key, and the
alias table for the others. It is written to a temporary file in the same folder and renamed
over the target, so an interrupted save leaves the previous file intact. Loading a plain
`load_state_dict` into an untied model would silently untie it; `load` ties from the plan
first, then copies the state in.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kshare._checks import is_int
from kshare._files import atomic_write, safe_load
from kshare.errors import CheckpointError, KShareError, param
from kshare.io.payload import check_payload, checkpoint_payload, expand_state, plan_from, recipe_from, spec_from
from kshare.io.safetensors_io import read_safetensors
from kshare.models.recipe import attach_recipe, recipe_of
from kshare.models.weights import check_state_fits
from kshare.models.zoo import ModelSpec, attach_spec, build
from kshare.surgery.tie import apply_plan, verify_tied


def save(model: nn.Module, path: str | Path, *, spec: ModelSpec | None = None,
         extra: Mapping[str, Any] | None = None) -> Path:
    """Write `model` (tied or not) atomically; each shared tensor is stored once."""
    payload = checkpoint_payload(model, spec, extra)
    return atomic_write(path, lambda tmp: torch.save(payload, tmp), CheckpointError)


def read(path: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint's payload (a `.pt` file or a `.safetensors` export) without
    building anything."""
    if Path(path).suffix == ".safetensors":
        return read_safetensors(path)
    return check_payload(safe_load(path, CheckpointError), str(path))


def restore(payload: Mapping[str, Any], model: nn.Module | None = None, what: str = "checkpoint",
            trust_code: bool = False) -> nn.Module:
    """Build (or take) the model, tie it from the plan, copy the state in.

    A spec that rebuilds by importing or calling the user's code (`module:factory`,
    `file.py:factory`) is built only with `trust_code`: otherwise a file would run code on load."""
    payload = check_payload(payload, what)
    spec = spec_from(payload, what)
    if model is None:
        if spec is None:
            raise CheckpointError(
                f"{what} holds a model kshare cannot rebuild: pass the model ({param('model')})"
            )
        if not trust_code and spec.runs_user_code:
            raise CheckpointError(
                f"{what} rebuilds its model by running {spec.name} (code outside kshare, torchvision and timm): "
                f"if you trust the file, pass {param('trust_code', True)}, or pass the model"
            )
        try:
            model = build(spec)
        except KShareError as exc:
            raise CheckpointError(f"cannot rebuild the model of {what}: {exc}") from None
    if spec is not None:
        attach_spec(model, spec)
    attach_recipe(model, recipe_from(payload, what) or recipe_of(model))
    state = expand_state(payload["state"], payload["aliases"])
    plan = plan_from(payload, what)
    if plan is not None:
        try:
            plan.validate(model)
            apply_plan(model, plan)  # a relaxed plan renames the members' kernels: check the state after
        except KShareError as exc:
            raise CheckpointError(f"the plan in {what} does not fit the model: {exc}") from None
    check_state_fits(model, state, CheckpointError, f"the tensors in {what}")
    model.load_state_dict(state, strict=True)
    verify_tied(model)
    return model


def load(path: str | Path, model: nn.Module | None = None, *, trust_code: bool = False) -> nn.Module:
    """Load a kshare checkpoint (`.pt`, or a `.safetensors` export): tied exactly as saved.

    `trust_code`: rebuild a model whose spec names the user's own code (see `restore`)."""
    return restore(read(path), model, what=str(path), trust_code=trust_code)


def summarize(path: str | Path) -> dict[str, Any]:
    """Figures about a checkpoint, read without building the model (for `kshare info`)."""
    payload = read(path)
    plan = plan_from(payload, str(path))
    recipe = recipe_from(payload, str(path))
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
        "input": recipe.to_dict() if recipe else None,
        "training": _training_summary(payload.get("extra", {})),
        "retrofit": _retrofit_summary(payload.get("extra", {})),
        "search": _search_summary(payload.get("extra", {})),
    }


def _retrofit_summary(extra: Mapping[str, Any]) -> dict[str, Any] | None:
    """The plain part of a retrofit's record (`RetrofitReport.record`): its data, each step's
    figures, the BatchNorm choice, each group's cost."""
    return _plain_record(extra, "retrofit", "steps")


def _search_summary(extra: Mapping[str, Any]) -> dict[str, Any] | None:
    """The plain part of a fidelity search's record (`SearchReport.record`): target, trials, choice."""
    return _plain_record(extra, "search", "trials")


def _plain_record(extra: Mapping[str, Any], key: str, rows: str) -> dict[str, Any] | None:
    """`extra[key]` in plain values, if it is a record with a list of `rows`."""
    record = extra.get(key)
    if not isinstance(record, Mapping) or not isinstance(record.get(rows), list):
        return None
    found = _plain(record)
    assert isinstance(found, dict)
    return found


def _plain(value: Any, depth: int = 0) -> Any:
    """`value` with only plain values (str, numbers, bools, None) in lists and str-keyed dicts,
    four levels deep at most: a file may hold anything."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if depth >= 4:
        return None
    if isinstance(value, Mapping):
        return {k: _plain(v, depth + 1) for k, v in value.items() if isinstance(k, str)}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    return None


def _training_summary(extra: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON-safe part of a fine-tune's record: epoch, settings, last metrics, resumable or not."""
    record = extra.get("finetune") or extra.get("train_state")
    if not isinstance(record, Mapping):
        return None
    plain = (str, int, float, bool, type(None))
    keep: dict[str, Any] = {}
    if is_int(record.get("epoch")):
        keep["epoch"] = record["epoch"]
    if isinstance(record.get("data"), str):
        keep["data"] = record["data"]
    for key in ("config", "metrics"):  # only plain values: a file may hold anything
        if isinstance(record.get(key), Mapping):
            keep[key] = {k: v for k, v in record[key].items() if isinstance(k, str) and isinstance(v, plain)}
    return keep | {"resumable": "optimizer" in record}
