"""Local weights into a built model: a state dict found in common file layouts, checked
key by key and shape by shape, and copied in (copy mode keeps any aliasing)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kshare._files import safe_load
from kshare.errors import KShareError, WeightsError
from kshare.models.recipe import InputRecipe, attach_recipe


def unwrap_state(obj: Any) -> dict[str, torch.Tensor]:
    """Find the state dict in common checkpoint layouts; strip a DDP `module.` prefix.

    A kshare checkpoint (`kshare.checkpoint/1`) gives its state with the aliases expanded, so
    a fine-tuned baseline can be the `--weights` of the next `apply`.
    """
    if isinstance(obj, dict) and obj.get("format") == "kshare.checkpoint/1" and isinstance(obj.get("state"), dict):
        state = dict(obj["state"])
        aliases = obj.get("aliases")
        for key, target in (aliases.items() if isinstance(aliases, dict) else ()):
            if isinstance(target, str) and target in state:
                state[key] = state[target]
        obj = state
    for key in ("state_dict", "model", "model_state", "state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise WeightsError("weights file holds no state dict (a mapping of names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def check_state_fits(
    model: nn.Module, state: Mapping[str, torch.Tensor], error: type[KShareError], what: str
) -> None:
    """Raise `error` in one line unless `state` has exactly the model's keys and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            theirs, ours = tuple(state[k].shape), tuple(own[k].shape)
            parts.append(f"{len(wrong)} shape mismatch(es) (e.g. {k}: file {theirs} vs model {ours})")
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[0]})")
        raise error(f"{what} do not fit the model: {'; '.join(parts)}")


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Copy a local state dict into `model` (copy mode: any aliasing in the model is kept).

    From a kshare checkpoint, the model also takes the recipe of how it was trained to be fed
    (`kshare.models.recipe`), so a fine-tuned baseline tied by `apply --weights` keeps it."""
    path = Path(path)
    obj = safe_load(path, WeightsError)
    state = unwrap_state(obj)
    check_state_fits(model, state, WeightsError, f"weights {path}")
    model.load_state_dict(state, strict=True)
    if isinstance(obj, dict) and obj.get("format") == "kshare.checkpoint/1" and obj.get("input") is not None:
        try:
            attach_recipe(model, InputRecipe.from_dict(obj["input"], str(path)))
        except KShareError as exc:
            raise WeightsError(str(exc)) from None
    return model
