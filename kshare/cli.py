"""The `kshare` command: parse, call the Python API, render. Errors are one line, exit 2."""

from __future__ import annotations

import fnmatch
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from torch import nn

from kshare._version import __version__
from kshare.api import Analysis
from kshare.api import analyze as analyze_model
from kshare.checkpoint import load, save, summarize
from kshare.errors import ExportError, KShareError, PlanError
from kshare.export import export_onnx, export_safetensors
from kshare.graph import METHODS
from kshare.plan import SharingPlan
from kshare.policy import POLICY_HELP
from kshare.report import analysis_json, render_analysis, render_applied, render_info
from kshare.report import size as size_text
from kshare.signature import MATCH_MODES
from kshare.surgery import INITS, plan_of, tie
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


ModelArg = Annotated[
    str, typer.Argument(help="torchvision/timm name, kshare:NAME, module:factory or file.py:factory.")
]
GroupsOpt = Annotated[str, typer.Option("--groups", "-g", help=f"Sharing policy: {POLICY_HELP}.")]
MatchOpt = Annotated[str, typer.Option(help="strict: all conv settings equal; shape: weight shape only.")]
IncludeOpt = Annotated[list[str] | None, typer.Option("--include", help="Only layers matching this glob (repeatable).")]
ExcludeOpt = Annotated[
    list[str] | None, typer.Option("--exclude", help="Never share layers matching this glob (repeatable).")
]
MinSizeOpt = Annotated[int, typer.Option(help="Smallest group worth forming.")]
ShareBiasOpt = Annotated[bool, typer.Option(help="Share biases along with kernels.")]
InputSizeOpt = Annotated[str | None, typer.Option(help="Example input C,H,W (default: the model's own).")]
WeightsOpt = Annotated[Path | None, typer.Option(help="Local state dict to load into the model.")]
KwargOpt = Annotated[
    list[str] | None, typer.Option("--kwarg", "-k", help="Model argument KEY=VALUE, e.g. num_classes=10.")
]
TraceOpt = Annotated[str, typer.Option(help="How to find the convs: auto (FX, else hooks), fx, hooks.")]


def _analyze(model: str, groups: str, match: str, include: list[str] | None, exclude: list[str] | None,
             min_size: int, share_bias: bool, input_size: str | None, weights: Path | None,
             kwarg: list[str] | None, trace: str) -> tuple[nn.Module, Analysis]:
    """Build the model and analyse it: the common front half of `analyze` and `apply`."""
    _choice(match, MATCH_MODES, "--match")
    _choice(trace, METHODS, "--trace")
    with Console(stderr=True).status(f"building {model}…"):
        net, spec = load_model(model, parse_kwargs(kwarg), weights)
    result = analyze_model(
        net, groups, match=match, include=include or (), exclude=exclude or (), min_size=min_size,
        share_bias=share_bias, input_size=input_size, method=trace, spec=spec,
    )
    return net, result


@app.command()
@one_line_errors
def analyze(
    model: ModelArg = DEFAULT_MODEL,
    groups: GroupsOpt = "all",
    match: MatchOpt = "strict",
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    min_size: MinSizeOpt = 2,
    share_bias: ShareBiasOpt = True,
    input_size: InputSizeOpt = None,
    weights: WeightsOpt = None,
    kwarg: KwargOpt = None,
    trace: TraceOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON for scripts.")] = False,
) -> None:
    """Show which convolutions could share a kernel under a policy, and what it saves."""
    _, result = _analyze(model, groups, match, include, exclude, min_size, share_bias, input_size, weights,
                         kwarg, trace)
    if as_json:
        typer.echo(analysis_json(result))
    else:
        render_analysis(result, Console())


@app.command()
@one_line_errors
def apply(
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write (atomically).")],
    model: ModelArg = DEFAULT_MODEL,
    groups: GroupsOpt = "all",
    plan: Annotated[Path | None, typer.Option(help="Apply this plan JSON instead of a policy.")] = None,
    init: Annotated[str, typer.Option(help="Shared kernel from the members': first, mean, medoid.")] = "first",
    match: MatchOpt = "strict",
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    min_size: MinSizeOpt = 2,
    share_bias: ShareBiasOpt = True,
    input_size: InputSizeOpt = None,
    weights: WeightsOpt = None,
    kwarg: KwargOpt = None,
    trace: TraceOpt = "auto",
) -> None:
    """Tie the sharing groups of a model and save it: each shared kernel is stored once."""
    _choice(init, INITS, "--init")
    if plan is not None:
        if not plan.is_file():
            raise PlanError(f"plan file not found: {plan}")
        chosen = SharingPlan.from_json(plan.read_text())
        net, spec = load_model(model, parse_kwargs(kwarg), weights)
    else:
        net, result = _analyze(model, groups, match, include, exclude, min_size, share_bias, input_size, weights,
                               kwarg, trace)
        chosen, spec = result.plan, result.spec
    tie(net, chosen, init=init)
    path = save(net, out, spec=spec)
    render_applied(plan_of(net), path, Console())


@app.command()
@one_line_errors
def info(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `kshare apply` or kshare.save.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Show a checkpoint's source, plan, groups and parameter and byte figures."""
    summary = summarize(checkpoint)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        render_info(summary, Console())


@app.command()
@one_line_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A kshare checkpoint.")],
    onnx: Annotated[Path | None, typer.Option(help="Write ONNX here (one initializer per shared kernel).")] = None,
    safetensors: Annotated[Path | None, typer.Option(help="Write safetensors here (shared tensors once).")] = None,
    input_size: InputSizeOpt = None,
    opset: Annotated[int, typer.Option(help="ONNX opset version.")] = 17,
    model: Annotated[
        str | None, typer.Option(help="Architecture to load into, for checkpoints of models kshare cannot rebuild.")
    ] = None,
) -> None:
    """Export a checkpoint to ONNX and/or safetensors, keeping shared tensors shared."""
    if onnx is None and safetensors is None:
        raise ExportError("nothing to export: pass --onnx FILE and/or --safetensors FILE")
    net = load(checkpoint, load_model(model)[0] if model else None)
    console = Console()
    if onnx is not None:
        with Console(stderr=True).status("exporting ONNX…"):
            export_onnx(net, onnx, input_size=input_size, opset=opset)
        console.print(f"wrote {onnx} ({size_text(onnx.stat().st_size)})")
    if safetensors is not None:
        export_safetensors(net, safetensors)
        console.print(f"wrote {safetensors} ({size_text(safetensors.stat().st_size)})")


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
