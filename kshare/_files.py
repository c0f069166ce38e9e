"""Files in and out: tensors loaded without ever executing pickled code, and atomic writes."""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kshare.errors import KShareError

_UMASK = os.umask(0)  # read once, at import: umask can only be read by setting it
os.umask(_UMASK)


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


def atomic_write(path: str | Path, write: Callable[[Path], None], error: type[KShareError] = KShareError) -> Path:
    """Write via a temporary file in the target's folder, fsync, then rename over the target."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise error(f"cannot write {path}: folder {folder} does not exist")
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
