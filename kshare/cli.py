"""The `kshare` command: parse, call the Python API, render. Errors are one line, exit 2."""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from kshare import __version__
from kshare.api import analyze as analyze_model
from kshare.errors import KShareError
from kshare.graph import METHODS
from kshare.policy import POLICY_HELP
from kshare.report import analysis_json, render_analysis
from kshare.signature import MATCH_MODES
from kshare.zoo import catalog, load_model, parse_kwargs

DEFAULT_MODEL = "kshare:convmixer_256_16"

app = typer.Typer(
    name="kshare",
    help="Retrofit inter-layer kernel sharing onto PyTorch CNNs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def one_line_errors(fn: F) -> F:
    """Turn a `KShareError` into `error: ...` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KShareError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


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


def _choice(value: str, allowed: tuple[str, ...], flag: str) -> str:
    if value not in allowed:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=flag)
    return value


@app.command()
@one_line_errors
def analyze(
    model: Annotated[
        str, typer.Argument(help="torchvision/timm name, kshare:NAME, module:factory or file.py:factory.")
    ] = DEFAULT_MODEL,
    groups: Annotated[str, typer.Option("--groups", "-g", help=f"Sharing policy: {POLICY_HELP}.")] = "all",
    match: Annotated[str, typer.Option(help="strict: all conv settings equal; shape: weight shape only.")] = "strict",
    include: Annotated[
        list[str] | None, typer.Option("--include", help="Only layers matching this glob (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Never share layers matching this glob (repeatable).")
    ] = None,
    min_size: Annotated[int, typer.Option(help="Smallest group worth forming.")] = 2,
    share_bias: Annotated[bool, typer.Option(help="Share biases along with kernels.")] = True,
    input_size: Annotated[
        str | None, typer.Option(help="Example input C,H,W (default: the model's own).")
    ] = None,
    weights: Annotated[Path | None, typer.Option(help="Local state dict to load into the model.")] = None,
    kwarg: Annotated[
        list[str] | None, typer.Option("--kwarg", "-k", help="Model argument KEY=VALUE, e.g. num_classes=10.")
    ] = None,
    trace: Annotated[str, typer.Option(help="How to find the convs: auto (FX, else hooks), fx, hooks.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON for scripts.")] = False,
) -> None:
    """Show which convolutions could share a kernel under a policy, and what it saves."""
    _choice(match, MATCH_MODES, "--match")
    _choice(trace, METHODS, "--trace")
    err = Console(stderr=True)
    with err.status(f"building {model}…"):
        net, spec = load_model(model, parse_kwargs(kwarg), weights)
    result = analyze_model(
        net,
        groups,
        match=match,
        include=include or (),
        exclude=exclude or (),
        min_size=min_size,
        share_bias=share_bias,
        input_size=input_size,
        method=trace,
        spec=spec,
    )
    if as_json:
        typer.echo(analysis_json(result))
    else:
        render_analysis(result, Console())


@app.command()
def models(
    pattern: Annotated[str, typer.Argument(help="Glob on the name, e.g. 'resnet*'.")] = "*",
) -> None:
    """List the model names kshare can build (user models aside)."""
    for ref in catalog():
        if fnmatch.fnmatchcase(ref.partition(":")[2], pattern):
            typer.echo(ref)


def main() -> None:
    app(prog_name="kshare")


if __name__ == "__main__":
    main()
