"""Files in and out: tensors loaded without ever executing pickled code, and atomic writes."""

from __future__ import annotations

import errno
import glob
import os
import pickle
import shutil
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
    """Write via a temporary file in the target's folder, fsync, then rename over the target.

    An interrupted write leaves the old file intact and, at worst, a temporary file named
    after the target and the writing process: the next write of the same target removes those
    whose process is gone. Any failure (a full disk, a writer's own error) is one `error`."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise error(f"cannot write {path}: folder {folder} does not exist")
    if path.is_dir():
        raise error(f"cannot write {path}: it is a folder")
    remove_stale_temporaries(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise error(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # mkstemp makes the file 0600: give it the mode a plain open() would (or the old file's)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_UMASK)
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, KShareError) or not isinstance(exc, Exception):
            raise  # already one line, or an interrupt that must stay one
        raise error(f"cannot write {path}: {_why(exc, folder)}") from None
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def _why(exc: Exception, folder: Path) -> str:
    """One line on why a write failed; writers that hide the OS error (torch.save says only
    'file write failed') are told apart from a full disk by asking the disk."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "no space left on the device"
    try:
        full = shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        full = False
    if full:
        return "no space left on the device"
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{exc.strerror}" if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {text[:160]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files earlier writes of `path` left behind when they were killed
    (their process is gone); the ones of a live writer stay. Returns what was removed."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    removed = []
    try:
        candidates = list(folder.glob(f".{glob.escape(path.name)}.*.tmp"))
    except OSError:
        return removed
    for tmp in candidates:
        middle = tmp.name[len(path.name) + 2 : -len(".tmp")]
        pid = middle.split(".", 1)[0]
        owner = int(pid) if pid.isdigit() and "." in middle else None  # older names carry no process
        if owner is not None and (owner == os.getpid() or _alive(owner)):
            continue  # a write in progress
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed
