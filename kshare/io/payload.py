"""The checkpoint payload: a dict of plain containers and tensors that
`torch.load(weights_only=True)` reads, shared by checkpoints and safetensors exports.

The state dict is stored with each aliased tensor under one key (the alias table maps the
other keys to it) and packed into one storage per dtype. `read_payload` checks what a file
holds before anything is built from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kshare._version import __version__
from kshare.errors import CheckpointError
from kshare.models.zoo import ModelSpec, spec_of
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
