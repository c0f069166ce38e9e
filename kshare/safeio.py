"""Load tensors from files without ever executing pickled code, with one-line errors."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from kshare.errors import KShareError


def safe_load(path: str | Path, error: type[KShareError]) -> Any:
    """`torch.load(weights_only=True)` (or safetensors); failures raise `error` in one line.

    A file whose pickle names a global outside PyTorch's allow-list (a function to call on
    load) is refused before anything runs; truncated or foreign files say so.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        culprit = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), "")
        if culprit:
            raise error(f"refused to load {path}: it holds pickled code, not just tensors ({culprit})") from None
        raise error(f"cannot read {path}: not a PyTorch tensor file") from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise error(f"cannot read {path}: {type(exc).__name__}: {first[:160]}") from None
