"""The checkpoint payload: a dict of plain containers and tensors that
`torch.load(weights_only=True)` reads, shared by checkpoints and safetensors exports.

The state dict is stored with each aliased tensor under one key (the alias table maps the
other keys to it) and packed into one storage per dtype. `check_payload` checks all a file
holds before anything is built from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kshare._version import __version__
from kshare.errors import CheckpointError, KShareError, PlanError
from kshare.models.recipe import InputRecipe, recipe_of
from kshare.models.zoo import ModelSpec, check_spec, spec_of
from kshare.planning.plan import SharingPlan
from kshare.surgery.tie import plan_of

CHECKPOINT_FORMAT = "kshare.checkpoint/1"


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


def checkpoint_payload(model: nn.Module, spec: ModelSpec | None = None, extra: Mapping[str, Any] | None = None
                       ) -> dict[str, Any]:
    """The dict `save` writes: plain containers and tensors only."""
    spec = spec or spec_of(model)
    plan = plan_of(model)
    recipe = recipe_of(model)
    unique, aliases = dedup_state(model.state_dict())  # on the model's device: .cpu() would copy aliases apart
    unique = pack_state({k: v.detach().cpu() for k, v in unique.items()})
    return {
        "format": CHECKPOINT_FORMAT,
        "kshare_version": __version__,
        "spec": spec.to_dict() if spec else None,
        "plan": plan.to_dict() if plan else None,
        "input": recipe.to_dict() if recipe else None,
        "state": unique,
        "aliases": aliases,
        "extra": dict(extra or {}),
    }


def check_payload(payload: Any, what: str) -> dict[str, Any]:
    """Check everything a checkpoint or a safetensors export holds before any of it is used: the
    sections and their entries, the spec, the plan (and that its members' kernels are in the
    state, one stored tensor per group, with the group's shape), the input recipe. A file may
    hold anything `weights_only` admits; whatever is wrong is one `CheckpointError`."""
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{what} is not a kshare checkpoint (no {CHECKPOINT_FORMAT!r} marker): "
                              "pass a file written by `kshare apply` or kshare.save")
    for key, kind in (("state", torch.Tensor), ("aliases", str)):
        section = payload.get(key)
        if not isinstance(section, dict):
            raise CheckpointError(f"{what} is a damaged kshare checkpoint: no {key!r} section (or not a mapping)")
        if not all(isinstance(k, str) and isinstance(v, kind) for k, v in section.items()):
            raise CheckpointError(f"{what} is a damaged kshare checkpoint: its {key!r} section holds "
                                  f"entries other than names of {kind.__name__}s")
    state, aliases = payload["state"], payload["aliases"]
    if bad := next((k for k, target in aliases.items() if target not in state or k in state), None):
        raise CheckpointError(f"{what} is a damaged kshare checkpoint: alias {bad!r} names no stored tensor "
                              "(or a stored tensor has its name)")
    if not isinstance(payload.get("extra", {}), dict):
        raise CheckpointError(f"{what} is a damaged kshare checkpoint: its 'extra' section is not a mapping")
    spec_from(payload, what)
    recipe_from(payload, what)
    plan = plan_from(payload, what)
    if plan is not None:
        _check_plan_fits_state(plan, state, aliases, what)
    return payload


def _check_plan_fits_state(plan: SharingPlan, state: Mapping[str, torch.Tensor], aliases: Mapping[str, str],
                           what: str) -> None:
    """Each member's kernel is in the file with the group's shape, and a group stores one kernel."""
    for group in plan.groups:
        stored = set()
        for member in group.members:
            key = next((k for k in (f"{member}.weight", f"{member}.parametrizations.weight.original")
                        if k in state or k in aliases), None)
            if key is None:
                raise CheckpointError(f"the plan in {what} names {member!r} (group {group.name}), whose kernel is "
                                      "not in the file")
            target = aliases.get(key, key)
            if tuple(state[target].shape) != group.signature.weight_shape:
                raise CheckpointError(f"the plan in {what} gives group {group.name} kernels of shape "
                                      f"{group.signature.weight_shape}, but {member}'s is {tuple(state[target].shape)}")
            stored.add(target)
        if len(stored) != 1:
            raise CheckpointError(f"the plan in {what} ties group {group.name}, but the file stores {len(stored)} "
                                  "separate kernels for it")


def plan_from(payload: Mapping[str, Any], what: str = "checkpoint") -> SharingPlan | None:
    data = payload.get("plan")
    if data is None:
        return None
    try:
        return SharingPlan.from_dict(data)
    except PlanError as exc:
        raise CheckpointError(f"{what} holds a damaged plan: {exc}") from None


def spec_from(payload: Mapping[str, Any], what: str = "checkpoint") -> ModelSpec | None:
    """The payload's source spec, checked for shape (a file may hold anything `weights_only` admits)."""
    data = payload.get("spec")
    if data is None:
        return None
    kwargs = data.get("kwargs") if isinstance(data, Mapping) else None
    if not (isinstance(data, Mapping) and isinstance(data.get("source"), str) and isinstance(data.get("name"), str)
            and data["source"] and data["name"] and isinstance(kwargs or {}, Mapping)
            and all(isinstance(k, str) and k.isidentifier() for k in (kwargs or {}))):
        raise CheckpointError(f"{what} is a damaged kshare checkpoint: its model spec is malformed")
    spec = ModelSpec.from_dict(data)
    try:
        check_spec(spec)
    except KShareError as exc:
        raise CheckpointError(f"{what} names a model this installation cannot build: {exc}") from None
    return spec


def recipe_from(payload: Mapping[str, Any], what: str = "checkpoint") -> InputRecipe | None:
    data = payload.get("input")
    return None if data is None else InputRecipe.from_dict(data, what)
