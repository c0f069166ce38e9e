"""Commands that choose, apply and store sharing: `analyze`, `apply`, `info`, `export`, `fold`,
`models`. Each parses its options, calls the Python API and renders the result."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from torch import nn

from kshare.analysis.inspect import METHODS, inspect_model, parse_input_size
from kshare.analysis.signature import MATCH_MODES
from kshare.api import Analysis, tie
from kshare.api import analyze as analyze_model
from kshare.cli.app import (
    DATA,
    DATA_NAMES,
    FIT,
    MODEL,
    OUTPUT,
    PLAN,
    BatchNormOpt,
    CacheMemoryOpt,
    ConfigOpt,
    DataRootOpt,
    DeviceOpt,
    FeedRequest,
    FitCacheOpt,
    FitImagesOpt,
    FitModeOpt,
    FitOpt,
    HeldOutOpt,
    ImageSizeOpt,
    InputSizeOpt,
    KwargOpt,
    ModelArg,
    ReconstructImagesOpt,
    ReconstructOpt,
    TrustOpt,
    WeightsOpt,
    app,
    choice,
    one_line_errors,
    option_group,
    with_feed_options,
)
from kshare.cli.progress import progress_bars
from kshare.cli.report import (
    analysis_json,
    render_analysis,
    render_applied,
    render_info,
    render_onnx_info,
    render_retrofit,
)
from kshare.cli.report import size as size_text
from kshare.data import decoding_for, load_data
from kshare.errors import DataError, ExportError, KShareError, PlanError
from kshare.fit.config import FitConfig
from kshare.io.checkpoint import load, save, summarize
from kshare.io.deployed import deployed_cost, example_shape, measure_session, onnxruntime_available, summarize_onnx
from kshare.io.onnx_export import export_onnx
from kshare.io.safetensors_io import export_safetensors
from kshare.kernels import INITS
from kshare.models.zoo import catalog, default_input_size, load_model, parse_kwargs, spec_of
from kshare.planning.config import POLICY_HELP, BudgetConfig, SharingConfig, parse_config
from kshare.planning.plan import SharingPlan
from kshare.planning.relaxation import RELAX_HELP
from kshare.quantize import export_int8
from kshare.retrofit import HELD_OUT, batchnorm_mode, retrofit
from kshare.surgery.fold import fold
from kshare.surgery.tie import plan_of
from kshare.training.runtime import resolve_device

FITS = ("weights", "data")

DEFAULT_MODEL = "kshare:convmixer_256_16"


@dataclass(frozen=True)
class PlanRequest:
    """What `analyze` and `apply` are asked: a model, how to build it, and a sharing config."""

    model: str
    groups: str
    match: str
    include: list[str] | None
    exclude: list[str] | None
    min_size: int
    share_bias: bool
    input_size: str | None
    weights: Path | None
    kwarg: list[str] | None
    trace: str
    relax: str | None

    def config(self) -> SharingConfig:
        choice(self.match, MATCH_MODES, "--match")
        return parse_config(self.groups, match=self.match, include=tuple(self.include or ()),
                            exclude=tuple(self.exclude or ()), min_size=self.min_size, share_bias=self.share_bias,
                            relax=self.relax)

    def build(self) -> tuple[nn.Module, Any]:
        with Console(stderr=True).status(f"building {self.model}…"):
            return load_model(self.model, parse_kwargs(self.kwarg), self.weights)

    def analyze(self, metric: Callable[[nn.Module, list[str]], Any] | None = None) -> tuple[nn.Module, Analysis]:
        """Build the model and plan it; `metric(model, conv names)` gives a budget plan output statistics."""
        config = self.config()
        choice(self.trace, METHODS, "--trace")
        net, spec = self.build()
        stats = None
        if metric is not None and isinstance(config, BudgetConfig):
            size = self.input_size if self.input_size is not None else default_input_size(net, spec)
            stats = metric(net, [s.name for s in inspect_model(net, size, method=self.trace).sites])
        # a budget plan clusters every kernel, many times over with a relaxation: up to a minute on resnet50
        relaxed = "" if not config.relax.active else f" with {config.relax.name}"
        with Console(stderr=True).status(f"planning {config.name}{relaxed}…"):
            return net, analyze_model(net, config, input_size=self.input_size, method=self.trace, spec=spec,
                                      metric=stats)


_PLAN_OPTIONS: list[tuple[str, Any, Any]] = [  # name, annotation, default: declared once for both commands
    ("model", ModelArg, DEFAULT_MODEL),
    ("groups", Annotated[str, typer.Option("--groups", "-g", help=f"Sharing policy: {POLICY_HELP}.",
                                           rich_help_panel=PLAN)], "all"),
    ("match", Annotated[str, typer.Option(help="strict: all conv settings equal; shape: weight shape only.",
                                          rich_help_panel=PLAN)], "strict"),
    ("include", Annotated[list[str] | None, typer.Option("--include", help="Only layers matching this glob "
                                                         "(repeatable).", rich_help_panel=PLAN)], None),
    ("exclude", Annotated[list[str] | None, typer.Option("--exclude", help="Never share layers matching this glob "
                                                         "(repeatable).", rich_help_panel=PLAN)], None),
    ("min_size", Annotated[int, typer.Option(help="Smallest group worth forming.", rich_help_panel=PLAN)], 2),
    ("share_bias", Annotated[bool, typer.Option(help="Share biases along with kernels.", rich_help_panel=PLAN)],
     True),
    ("input_size", InputSizeOpt, None),
    ("weights", WeightsOpt, None),
    ("kwarg", KwargOpt, None),
    ("trace", Annotated[str, typer.Option(help="How to find the convs: auto (FX, else hooks), fx, hooks.",
                                          rich_help_panel=MODEL)], "auto"),
    ("relax", Annotated[str | None, typer.Option(help=f"Per-member parameters on the shared kernel: {RELAX_HELP}; "
                                                      "counted in every figure and in a budget "
                                                      "(default: none; with --plan, the plan's own).",
                                                 rich_help_panel=PLAN)], None),
    ("config_file", ConfigOpt, None),
]


with_plan_options = option_group("request", _PLAN_OPTIONS, PlanRequest)
"""Give a command the model and sharing options above; it receives them as one `PlanRequest`."""


@app.command()
@one_line_errors
@with_plan_options
def analyze(
    request: PlanRequest,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON for scripts.")] = False,
) -> None:
    """Show which convolutions could share a kernel under a policy, and what it saves."""
    _, result = request.analyze()
    if as_json:
        typer.echo(analysis_json(result))
    else:
        render_analysis(result, Console())


@app.command()
@one_line_errors
@with_plan_options
@with_feed_options
def apply(
    request: PlanRequest,
    feed: FeedRequest,
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write (atomically).",
                                      rich_help_panel=OUTPUT)],
    plan: Annotated[Path | None, typer.Option(help="Apply this plan JSON instead of a policy.",
                                              rich_help_panel=PLAN)] = None,
    init: Annotated[str | None, typer.Option(help="Shared kernel from the members': first, mean, medoid, norm_mean "
                                                  "(default: the plan's own; budget plans use mean, others first).",
                                             rich_help_panel=FIT)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random init (models built without --weights) and of the "
                                           "fit sample.", rich_help_panel=MODEL)] = 0,
    fit: FitOpt = "weights",
    data: Annotated[str | None, typer.Option("--data", help="Images to fit to with --fit data: "
                                                            + ", ".join(DATA_NAMES) + ".", rich_help_panel=DATA)
                    ] = None,
    data_root: DataRootOpt = None,
    image_size: ImageSizeOpt = None,
    held_out: HeldOutOpt = HELD_OUT,
    fit_images: FitImagesOpt = 512,
    fit_mode: FitModeOpt = "sequential",
    reconstruct: ReconstructOpt = 0,
    reconstruct_images: ReconstructImagesOpt = None,
    fit_cache: FitCacheOpt = True,
    cache_memory: CacheMemoryOpt = 4.0,
    batchnorm: BatchNormOpt = "auto",
    device: DeviceOpt = None,
) -> None:
    """Tie the sharing groups of a model and save it: each shared kernel is stored once.

    `--groups none` saves the model untied: a baseline checkpoint for `finetune`, `eval`,
    `--teacher` and `sweep`. `--fit data --data NAME` fits each shared kernel to what its
    members output on NAME's images (no labels needed), re-estimates BatchNorm there and
    reports fidelity to the untied model on held-out images; `--reconstruct STEPS` then trains
    each unit of blocks towards the untied outputs.
    """
    if init is not None:
        choice(init, INITS, "--init")
    choice(fit, FITS, "--fit")
    if fit == "data":
        if data is None:
            raise DataError("--fit data needs images to fit to: pass --data NAME (e.g. images:PATH)")
        if init is not None:
            raise PlanError("--fit data computes each shared kernel from data: drop --init")
        if request.groups == "none" and plan is None:
            raise PlanError("--fit data with --groups none: no group is tied, so there is nothing to fit")
    elif data is not None:
        raise DataError("--data is for --fit data (or use finetune, eval and recalibrate for training data)")
    elif reconstruct:
        raise PlanError("--reconstruct trains the blocks of a data fit towards the untied outputs: "
                        "add --fit data --data NAME")
    torch.manual_seed(seed)
    if request.groups == "none" and plan is None:
        net, spec = request.build()
        path = save(net, out, spec=spec)
        render_applied(None, path, Console())
        return
    if plan is not None:
        if not plan.is_file():
            raise PlanError(f"plan file not found: {plan}")
        chosen: SharingPlan | SharingConfig = SharingPlan.from_json(plan.read_text())
        net, spec = request.build()
    elif fit == "data":  # planned by the pipeline: a budget plan groups kernels by output error on the same images
        chosen = request.config()
        net, spec = request.build()
    else:
        net, result = request.analyze()
        chosen, spec = result.plan, result.spec
    if fit == "data":
        assert data is not None
        feed.apply(net)
        config, recal = batchnorm_mode(batchnorm, FitConfig(
            mode=fit_mode, images=fit_images, reconstruct=reconstruct, reconstruct_images=reconstruct_images,
            seed=seed, cache=fit_cache, cache_memory=int(cache_memory * 2**30)))
        images = load_data(data, "train", data_root, decoding_for(net, image_size))
        with progress_bars() as progress:
            report = retrofit(net, chosen, images, fit=config, recalibrate=recal, relax=request.relax,
                              held_out=held_out, image_size=image_size, input_size=request.input_size,
                              device=resolve_device(device), progress=progress)
        path = save(net.cpu(), out, spec=spec, extra={"retrofit": report.record()})
        render_applied(plan_of(net), path, Console())
        render_retrofit(report, Console())
        return
    tie(net, chosen, init=init, relax=request.relax)
    path = save(net, out, spec=spec)
    render_applied(plan_of(net), path, Console())


@app.command()
@one_line_errors
def info(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `kshare apply` or kshare.save, or an "
                                                    "ONNX file `kshare export` wrote.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    input_size: InputSizeOpt = None,
) -> None:
    """Show a checkpoint's source, plan, groups and parameter and byte figures; for an ONNX file,
    its bytes, shared kernels and (with onnxruntime) the memory and latency of a default session."""
    if checkpoint.suffix.lower() == ".onnx":
        summary = summarize_onnx(checkpoint)
        if onnxruntime_available():
            size = parse_input_size(input_size) if input_size is not None else (3, 224, 224)
            summary["session"] = asdict(measure_session(checkpoint, example_shape(summary, size)))
    else:
        summary = summarize(checkpoint)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    elif "nodes" in summary:
        render_onnx_info(summary, Console())
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
    form: Annotated[str | None, typer.Option(
        help="How shared kernels are written so ONNX Runtime keeps one copy of each: affine (the default; each "
             "member's BatchNorm as its own depthwise 1x1 conv: the untied model's speed), inputs (shared kernels "
             "also graph inputs: least memory, slower), plain (as PyTorch writes it: ORT folds a copy per conv). "
             "Not with --int8, which writes its own.", show_default=False)
    ] = None,
    int8: Annotated[bool, typer.Option(
        "--int8", help="Write the ONNX file as int8 (static, QDQ, per-channel weights), calibrated on --data's images "
                       "(no labels needed): one int8 tensor per shared kernel, checked; fidelity to the fp32 model on "
                       "held-out images printed.")] = False,
    data: Annotated[str | None, typer.Option(help="Calibration images for --int8 (images:PATH, a dataset name).")
                    ] = None,
    data_root: DataRootOpt = None,
    calib_images: Annotated[int, typer.Option(help="Images --int8 calibrates on.")] = 256,
    held_out: Annotated[int, typer.Option(help="Further images --int8's fidelity is measured on (0: none).")] = 256,
    model: Annotated[
        str | None, typer.Option(help="Architecture to load into, for checkpoints of models kshare cannot rebuild.")
    ] = None,
    trust_code: TrustOpt = False,
    measure: Annotated[bool, typer.Option(
        help="With onnxruntime installed, open the ONNX file in a default session and print its resident memory "
             "and latency, against the same model untied (exported to a temporary file).")] = True,
) -> None:
    """Export a checkpoint to ONNX and/or safetensors, keeping shared tensors shared."""
    if onnx is None and safetensors is None:
        raise ExportError("nothing to export: pass --onnx FILE and/or --safetensors FILE")
    if int8 and (onnx is None or data is None):
        raise ExportError("--int8 writes the --onnx file, calibrated on --data's images: give --onnx FILE and "
                          "--data images:PATH")
    if data is not None and not int8:
        raise ExportError("--data calibrates an --int8 export: give --int8 too")
    if int8 and form is not None:
        raise ExportError("--form chooses how the fp32 ONNX file is written; --int8 writes its own: drop --form")
    net = load(checkpoint, load_model(model)[0] if model else None, trust_code=trust_code)
    console = Console()
    failed = []  # each file on its own: one that cannot be written does not stop the other
    if safetensors is not None:
        try:
            export_safetensors(net, safetensors)
            console.print(f"wrote {safetensors} ({size_text(safetensors.stat().st_size)})")
        except KShareError as exc:
            failed.append(str(exc))
    if onnx is not None and int8:
        assert data is not None
        calibration = load_data(data, "train", data_root, decoding_for(net, None))
        with Console(stderr=True).status("quantising to int8…"):
            found = export_int8(net, onnx, calibration, calib_images=calib_images, held_out=held_out,
                                input_size=input_size)
        console.print(found.line())
        if measure:  # onnxruntime is there: the int8 export needs it
            with Console(stderr=True).status("measuring an ONNX Runtime session…"):
                session = measure_session(onnx, _session_shape(onnx, net, input_size))
            console.print(f"int8 {session.line()} (default session, one thread)")
    elif onnx is not None:
        form = form or "affine"
        try:
            with Console(stderr=True).status("exporting ONNX…"):
                export_onnx(net, onnx, input_size=input_size, opset=opset, form=form)
            console.print(f"wrote {onnx} ({size_text(onnx.stat().st_size)})"
                          + (f"; {FORM_LINES[form]}" if plan_of(net) is not None else ""))
            if measure and onnxruntime_available():
                with Console(stderr=True).status("measuring ONNX Runtime sessions, tied and untied…"):
                    cost = deployed_cost(net, onnx, _session_shape(onnx, net, input_size), input_size=input_size,
                                         opset=opset, form=form)
                console.print(cost.line())
            elif measure:
                console.print("session memory not measured: pip install onnxruntime to have it measured")
        except KShareError as exc:
            failed.append(str(exc))
    if failed:
        raise ExportError("; ".join(failed))


FORM_LINES = {
    "affine": "shared kernels stored once, each member's BatchNorm its own 1x1 depthwise conv: ONNX Runtime keeps "
              "one copy of each kernel on its fast path (--form inputs: less memory in ONNX Runtime, slower)",
    "inputs": "shared kernels are graph inputs with stored values: ONNX Runtime keeps one copy of each (and warns "
              "that it will not fold them), on its slower path",
    "plain": "shared kernels as plain initializers: ONNX Runtime's default session folds a copy per conv",
}


def _session_shape(path: Path, net: nn.Module, input_size: str | None) -> tuple[int, ...]:
    """What a session of the ONNX file at `path` is fed to be measured: its input's shape, with
    the model's input size (or --input-size) where the file leaves a dimension open."""
    size = parse_input_size(input_size) if input_size is not None else default_input_size(net, spec_of(net))
    return example_shape(summarize_onnx(path), size)


@app.command("fold")
@one_line_errors
def fold_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A tied (optionally relaxed) kshare checkpoint.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the plain model.")],
    trust_code: TrustOpt = False,
) -> None:
    """Bake every member's kernel into a plain convolution (no sharing, same outputs)."""
    net = load(checkpoint, trust_code=trust_code)
    plan = plan_of(net)
    fold(net)
    path = save(net, out)
    what = f"relaxation {plan.relax}, " if plan and plan.relax != "none" else ""
    typer.echo(f"folded {what}{len(plan.groups) if plan else 0} groups into plain convolutions; "
               f"wrote {path} ({size_text(path.stat().st_size)})")


@app.command()
def models(
    pattern: Annotated[str, typer.Argument(help="Glob on the name, e.g. 'resnet*'.")] = "*",
) -> None:
    """List the model names kshare can build (user models aside)."""
    for ref in catalog():
        if fnmatch.fnmatchcase(ref.partition(":")[2], pattern):
            typer.echo(ref)
