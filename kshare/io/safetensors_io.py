"""safetensors export and import that keep shared tensors shared.

safetensors refuses tensors that share memory; kshare stores each shared tensor once and
records the other names in the file's metadata, next to the source spec and the plan, so
`kshare.load` re-ties a model from a `.safetensors` file as from a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from kshare._files import atomic_write, safe_load
from kshare.errors import CheckpointError, ExportError
from kshare.io.payload import CHECKPOINT_FORMAT, check_payload, checkpoint_payload

SAFETENSORS_FORMAT = "kshare.safetensors/1"


def export_safetensors(model: nn.Module, path: str | Path) -> Path:
    """Write the unique tensors plus spec, plan and alias table as safetensors metadata."""
    from safetensors.torch import save_file

    payload = checkpoint_payload(model)
    tensors = {k: v.contiguous().clone() for k, v in payload["state"].items()}
    metadata = {
        "format": SAFETENSORS_FORMAT,
        "kshare_version": str(payload["kshare_version"]),
        "spec": json.dumps(payload["spec"]),
        "plan": json.dumps(payload["plan"]),
        "aliases": json.dumps(payload["aliases"]),
        "input": json.dumps(payload["input"]),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), ExportError)


def read_safetensors(path: str | Path) -> dict[str, Any]:
    """A safetensors export as a checkpoint payload (for `kshare.checkpoint.restore`)."""
    from safetensors import safe_open

    tensors = safe_load(path, CheckpointError)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}") from None
    if meta.get("format") != SAFETENSORS_FORMAT:
        raise CheckpointError(f"{path} is a safetensors file, but not one kshare exported (no format marker)")
    fields = {}
    for key in ("spec", "plan", "aliases", "input"):
        try:
            fields[key] = json.loads(meta.get(key, "null"))
        except (json.JSONDecodeError, RecursionError, TypeError):
            raise CheckpointError(f"{path} has damaged kshare metadata: {key!r} is not valid JSON") from None
    payload = {"format": CHECKPOINT_FORMAT, "kshare_version": meta.get("kshare_version"), **fields, "state": tensors}
    return check_payload(payload, str(path))
