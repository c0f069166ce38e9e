"""The `kshare` Typer app and what every command shares: one-line errors that name flags,
library log records on stderr, and the option types.

Library errors name the Python parameters they are about (`` `trust_code=True` ``); here they
become this command line's flags (`--trust-code`) before they are printed.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperGroup

from kshare._version import __version__
from kshare.data import NAMES as DATA_NAMES
from kshare.errors import KShareError, OptionError, first_line

try:  # typer that carries its own copy of click: its usage errors derive from TyperException
    from typer.exceptions import TyperException as CommandLineError
except ImportError:  # pragma: no cover  (typer running on the click package)
    from click import ClickException as CommandLineError  # type: ignore[assignment]

class _OneLineErrors(TyperGroup):
    """The command group, with click's own errors (an unknown option, a value of the wrong type)
    ending like kshare's: one `error:` line on stderr and exit code 2, not a usage box."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except CommandLineError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `kshare` alone: the help, as always
                exc.show()  # type: ignore[attr-defined]
            else:
                typer.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(2)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="kshare",
    help="Retrofit inter-layer kernel sharing onto PyTorch CNNs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_OneLineErrors,
)

F = TypeVar("F", bound=Callable[..., Any])

# Python parameters with a flag of the same name here (`image_size` → `--image-size`), and those whose flag differs.
FLAGGED = frozenset("""alpha batch_size batchnorm budgets cache_memory calib_images channels_last fit_mode groups
    held_out clip_grad compile crop_pct data data_root device distill distill_batch distill_epochs distill_lr
    epochs exclude feature_weight fit fit_cache form
    fit_images image_size images include init input_size interpolation label_smoothing limit_test limit_train lr match
    max_trials mean min_size model momentum opset optimizer out patience plan precision reconstruct reconstruct_images
    relax resume seed seeds share_bias std target teacher teacher_weights temperature time_limit trust_code
    weight_decay weights""".split())
RENAMED = {"warmup_epochs": "--warmup", "policy": "--groups"}
MODEL_ARGUMENTS = ("num_classes", "in_chans")  # passed as `-k KEY=VALUE`


def flag_of(name: str) -> str | None:
    return RENAMED.get(name) or ("--" + name.replace("_", "-") if name in FLAGGED else None)


_PARAM = re.compile(r"`([a-z_]+)(?:=([^`]*))?`")


def as_flags(message: str) -> str:
    """Rewrite the parameters a library message names (`` `name` ``, `` `name=value` ``) as flags."""

    def flag(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        option = flag_of(name)
        if option is None:  # a model argument or a name this CLI has no flag for
            return f"-k {name}={value}" if name in MODEL_ARGUMENTS and value else m.group(0).strip("`")
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
    """Turn a `KShareError`, a file the OS refuses (`OSError`), a missing optional package
    (`ImportError`) or memory that runs out into one `error: ...` line on stderr and exit code 2.
    Anything else is a kshare bug: one line too, exit code 1, and the traceback when
    `KSHARE_DEBUG=1`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except KShareError as exc:
            message = str(exc)
        except ImportError as exc:
            message = f"{exc}; install the extra that provides it, e.g. pip install 'kshare[export]'"
        except OSError as exc:
            message = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        except Exception as exc:
            text = first_line(exc)
            if isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text:
                message = f"not enough memory: {text or type(exc).__name__}; use a smaller batch, input or model"
            elif os.environ.get("KSHARE_DEBUG"):
                raise
            else:
                typer.echo(f"error: internal error ({type(exc).__name__}: {text}); this is a kshare bug: please "
                           "report it, with the traceback KSHARE_DEBUG=1 shows", err=True)
                raise typer.Exit(1) from None
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


# Help panels: every option of a command sits in the panel of what it is about.
MODEL, PLAN, DATA, FIT, FINETUNE, OUTPUT, DEVICE = "Model", "Plan", "Data", "Fit", "Fine-tune", "Output", "Device"
SEARCH = "Fidelity search"

ModelArg = Annotated[
    str, typer.Argument(help="torchvision/timm name, kshare:NAME, module:factory or file.py:factory.",
                        rich_help_panel=MODEL)
]
InputSizeOpt = Annotated[str | None, typer.Option(help="Example input C,H,W (default: the model's own).",
                                                  rich_help_panel=MODEL)]
WeightsOpt = Annotated[Path | None, typer.Option(help="Local state dict to load into the model.",
                                                 rich_help_panel=MODEL)]
KwargOpt = Annotated[
    list[str] | None, typer.Option("--kwarg", "-k", help="Model argument KEY=VALUE, e.g. num_classes=10.",
                                   rich_help_panel=MODEL)
]
TrustOpt = Annotated[
    bool, typer.Option(help="Let a checkpoint rebuild its model by running the user code it names "
                            "(module:factory, file.py:factory). Only for files you trust.", rich_help_panel=MODEL)
]
DataOpt = Annotated[str, typer.Option("--data", help=", ".join(DATA_NAMES) + ".", rich_help_panel=DATA)]
DataRootOpt = Annotated[Path | None, typer.Option(help="Folder holding the dataset's files.", rich_help_panel=DATA)]
ImageSizeOpt = Annotated[int | None, typer.Option(help="Resize images to this size (default: the data's own).",
                                                  rich_help_panel=DATA)]
LimitOpt = Annotated[int | None, typer.Option(help="Use a seeded, class-balanced sample of N images (quick runs).",
                                              rich_help_panel=DATA)]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: cuda when available).",
                                               rich_help_panel=DEVICE)]
PrecisionOpt = Annotated[str, typer.Option(help="auto (time the candidates on a GPU; fp32 on the CPU), bf16, fp16 "
                                                "(with loss scaling) or fp32.", rich_help_panel=DEVICE)]
ChannelsLastOpt = Annotated[bool | None, typer.Option("--channels-last/--no-channels-last",
                                                      help="Memory format of the steps (default: auto, timed on a "
                                                           "GPU; NCHW on the CPU).", show_default=False,
                                                      rich_help_panel=DEVICE)]
FitOpt = Annotated[str, typer.Option(help="weights: each shared kernel from its members' kernels (--init); data: "
                                           "fitted to what the members output on --data's images (no labels "
                                           "needed), BatchNorm re-estimated there.", rich_help_panel=FIT)]
FitImagesOpt = Annotated[int, typer.Option("--fit-images", "--calib-images",
                                           help="Images a data fit reads (a seeded, class-balanced sample; "
                                                "--calib-images is its old name).", rich_help_panel=FIT)]
FitModeOpt = Annotated[str, typer.Option(help="sequential: groups fitted in network order on the partially tied "
                                              "network (best); progressive: the same member by member, the network "
                                              "passed once (each group refitted as its members are reached); "
                                              "oneshot: all from one pass of the untied network (fastest).",
                                         rich_help_panel=FIT)]
ReconstructOpt = Annotated[int, typer.Option(
    help="After the data fit: Adam steps per unit of blocks (the blocks a group spans) towards the untied "
         "network's outputs on the fit images; no labels (0: off; a few hundred recover much of what "
         "the closed form leaves).", rich_help_panel=FIT)]
ReconstructImagesOpt = Annotated[int | None, typer.Option(
    help="Images the block reconstruction trains on: the same seeded sample as --fit-images, extended "
         "(default: those; more keep helping after the fit has stopped gaining).", show_default=False,
    rich_help_panel=FIT)]
FitCacheOpt = Annotated[bool, typer.Option(
    help="The sequential fit keeps both networks' activations at the cut before each group instead of running "
         "every pass from the input (same kernels; off: the old passes).", rich_help_panel=FIT)]
CacheMemoryOpt = Annotated[float, typer.Option(
    help="GiB the sequential fit's activation caches may take in memory: float32 within it, else float16, "
         "else float16 memory-mapped on disk (0: always on disk).", min=0.0, rich_help_panel=FIT)]
BatchNormOpt = Annotated[str, typer.Option(
    help="auto: all where re-estimating the untied model's statistics on the fit images leaves it at least 90% "
         "top-1 agreement with itself (they describe these images), else measure. measure: the fit works under "
         "the model's statistics, unshared layers keep their weights, then a block's statistics are re-estimated "
         "only where that brings the model closer to the untied one on the fit images. all: the fit re-estimates "
         "them as it goes, refits unshared layers, and every layer is re-estimated. keep: as measure, nothing "
         "re-estimated.", rich_help_panel=FIT)]
BATCHNORM_MODES = ("auto", "measure", "all", "keep")
HeldOutOpt = Annotated[int, typer.Option(help="Images of --data no step reads, where fidelity to the untied model "
                                              "is measured (fewer when the data is small; 0: none).",
                                         rich_help_panel=DATA)]
WarmupOpt = Annotated[float, typer.Option(help="Linear warm-up of the learning rate, in epochs (fractions allowed).",
                                          rich_help_panel=FINETUNE)]
FeatureWeightOpt = Annotated[float, typer.Option(
    help="Weight of matching the teacher's block outputs (each block holding a tied conv; 0: off).",
    rich_help_panel=FINETUNE)]
CompileOpt = Annotated[bool, typer.Option(help="Run the model through torch.compile (slow to start, faster after).",
                                          rich_help_panel=DEVICE)]


def _read_config(ctx: typer.Context, _: Any, path: Path | None) -> Path | None:
    """`--config FILE`: a TOML file whose keys are the command's long option names (`fit-images =
    1024`, `groups = "stage"`) and argument names (`model`); they become the defaults, so options
    given on the command line still win. An unknown key is an error, not ignored."""
    if path is None:
        return None
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        settings = tomllib.loads(path.read_text())
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise typer.BadParameter(f"{path} is not TOML: {exc}") from None
    names: dict[str, str] = {}
    for param in ctx.command.params:
        names[param.name.replace("_", "-")] = param.name  # type: ignore[union-attr]
        for opt in (*param.opts, *param.secondary_opts):
            if opt.startswith("--") and not opt.startswith("--no-"):
                names[opt[2:]] = param.name  # type: ignore[assignment]
    names.pop("config", None)
    defaults = {}
    for key, value in settings.items():
        if key not in names:
            raise typer.BadParameter(f"{path}: unknown key {key!r}; the keys are this command's long options, "
                                     f"e.g. {', '.join(sorted(names)[:6])}")
        defaults[names[key]] = value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="TOML file of this command's options (keys: the long option names); the command line wins.",
    callback=_read_config, is_eager=True, rich_help_panel=OUTPUT, show_default=False)]


def option_group(param_name: str, options: list[tuple[str, Any, Any]], build: Callable[..., Any]) -> Callable[[F], F]:
    """A decorator giving a command the `options` (name, annotation, default), declared once for
    every command that takes them; the command receives them as one object, `build(**values)`,
    in its parameter `param_name`. A `config_file` option is read by its callback and dropped."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn, eval_str=True)  # typer reads the annotations of the signature set below
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                 for name, annotation, default in options]
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values()
               if p.name != param_name]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name, _, _ in options}
            values.pop("config_file", None)  # read by its callback, into the defaults of the others
            return fn(**{param_name: build(**values)}, **kwargs)

        command.__signature__ = signature.replace(parameters=[*added, *own])  # type: ignore[attr-defined]
        command.__annotations__ = ({p.name: p.annotation for p in [*added, *own]}
                                   | {"return": signature.return_annotation})
        return command  # type: ignore[return-value]

    return decorate


@dataclass(frozen=True)
class FeedRequest:
    """How the model is fed, when the user says otherwise than its recipe (`--mean`, `--std`,
    `--crop-pct`, `--interpolation`); `apply(model)` attaches the resulting recipe."""

    mean: str | None = None
    std: str | None = None
    crop_pct: float | None = None
    interpolation: str | None = None

    def apply(self, model: Any) -> None:
        from kshare.data import override_recipe

        override_recipe(model, mean=_floats(self.mean, "--mean"), std=_floats(self.std, "--std"),
                        crop_pct=self.crop_pct, interpolation=self.interpolation)


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in csv(text))
    except ValueError:
        raise OptionError(f"{flag} takes numbers separated by commas (e.g. 0.5,0.5,0.5), got {text!r}") from None


_FEED_OPTIONS: list[tuple[str, Any, Any]] = [
    ("mean", Annotated[str | None, typer.Option(help="Normalisation mean, one per channel or one for all (default: "
                                                     "the model's recipe, its timm/torchvision pretrained config, "
                                                     "else ImageNet's for photos).", rich_help_panel=DATA)], None),
    ("std", Annotated[str | None, typer.Option(help="Normalisation std, as --mean.", rich_help_panel=DATA)], None),
    ("crop_pct", Annotated[float | None, typer.Option(help="Image folders: the centre crop's share of the resized "
                                                           "shorter side (timm's crop_pct; 1: the whole side).",
                                                      rich_help_panel=DATA)], None),
    ("interpolation", Annotated[str | None, typer.Option(help="Image folders: bilinear, bicubic or nearest resizing.",
                                                         rich_help_panel=DATA)], None),
]
with_feed_options = option_group("feed", _FEED_OPTIONS, FeedRequest)


def main() -> None:
    app(prog_name="kshare")
