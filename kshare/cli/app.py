"""The `kshare` Typer app and what every command shares: one-line errors that name flags,
library log records on stderr, and the option types.

Library errors name the Python parameters they are about (`` `trust_code=True` ``); here they
become this command line's flags (`--trust-code`) before they are printed.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from kshare._version import __version__
from kshare.errors import KShareError, OptionError
from kshare.training.data import NAMES as DATA_NAMES

app = typer.Typer(
    name="kshare",
    help="Retrofit inter-layer kernel sharing onto PyTorch CNNs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])

# Python parameter → the flag that sets it on this command line.
FLAGS = {
    "alpha": "--alpha", "batch_size": "--batch-size", "calib_images": "--calib-images", "channels_last":
    "--channels-last", "clip_grad": "--clip-grad", "data": "--data", "data_root": "--data-root", "device": "--device",
    "distill": "--distill", "epochs": "--epochs", "exclude": "--exclude", "groups": "--groups", "image_size":
    "--image-size", "images": "--images", "include": "--include", "init": "--init", "input_size": "--input-size",
    "label_smoothing": "--label-smoothing", "limit_test": "--limit-test", "limit_train": "--limit-train", "lr": "--lr",
    "match": "--match", "min_size": "--min-size", "model": "--model", "momentum": "--momentum", "opset": "--opset",
    "optimizer": "--optimizer", "plan": "--plan", "precision": "--precision", "relax": "--relax", "seed": "--seed",
    "share_bias": "--share-bias", "teacher": "--teacher", "teacher_weights": "--teacher-weights", "temperature":
    "--temperature", "trust_code": "--trust-code", "warmup_epochs": "--warmup", "weight_decay": "--weight-decay",
    "weights": "--weights",
}
_PARAM = re.compile(r"`([a-z_]+)(?:=([^`]*))?`")


def as_flags(message: str) -> str:
    """Rewrite the parameters a library message names (`` `name` ``, `` `name=value` ``) as flags."""

    def flag(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        option = FLAGS.get(name)
        if option is None:  # a model argument or a name this CLI has no flag for
            return f"-k {name}={value}" if name in ("num_classes", "in_chans") and value else m.group(0).strip("`")
        if value is None or value == "True":
            return option
        if value == "False":
            return "--no-" + option.removeprefix("--")
        return f"{option} {value}"

    return _PARAM.sub(flag, message)


def fail(message: str) -> typer.Exit:
    """Print `message` as the one `error:` line and return the exit to raise (code 2)."""
    typer.echo(f"error: {' '.join(as_flags(message).split())}", err=True)
    return typer.Exit(2)


def one_line_errors(fn: F) -> F:
    """Turn a `KShareError`, a file the OS refuses (`OSError`) or a missing optional package
    (`ImportError`) into one `error: ...` line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KShareError as exc:
            message = str(exc)
        except ImportError as exc:
            message = f"{exc}; install the extra that provides it, e.g. pip install 'kshare[export]'"
        except OSError as exc:
            message = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        raise fail(message) from None

    return wrapper  # type: ignore[return-value]


class _StderrHandler(logging.Handler):
    """Library log records, one line each on the stderr of the moment (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        typer.echo(prefix + as_flags(record.getMessage()), err=True)


def _log_to_stderr() -> None:
    logger = logging.getLogger("kshare")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
        logger.propagate = False
    logger.setLevel(logging.INFO)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kshare {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Retrofit inter-layer kernel sharing onto PyTorch CNNs."""
    _log_to_stderr()


def choice(value: str, allowed: tuple[str, ...], flag: str) -> str:
    if value not in allowed:
        raise OptionError(f"{flag}: {value!r} is not one of {', '.join(allowed)}")
    return value


def csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


ModelArg = Annotated[
    str, typer.Argument(help="torchvision/timm name, kshare:NAME, module:factory or file.py:factory.")
]
InputSizeOpt = Annotated[str | None, typer.Option(help="Example input C,H,W (default: the model's own).")]
WeightsOpt = Annotated[Path | None, typer.Option(help="Local state dict to load into the model.")]
KwargOpt = Annotated[
    list[str] | None, typer.Option("--kwarg", "-k", help="Model argument KEY=VALUE, e.g. num_classes=10.")
]
TrustOpt = Annotated[
    bool, typer.Option(help="Let a checkpoint rebuild its model by running the user code it names "
                            "(module:factory, file.py:factory). Only for files you trust.")
]
DataOpt = Annotated[str, typer.Option("--data", help=", ".join(DATA_NAMES) + ".")]
DataRootOpt = Annotated[Path | None, typer.Option(help="Folder holding the dataset's files.")]
ImageSizeOpt = Annotated[int | None, typer.Option(help="Resize images to this size (default: the data's own).")]
LimitOpt = Annotated[int | None, typer.Option(help="Use only the first N samples (quick runs).")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: cuda when available).")]


def main() -> None:
    app(prog_name="kshare")
