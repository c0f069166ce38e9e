"""The `kshare` command: parse, call the Python API, render. Errors are one line, exit 2."""

from __future__ import annotations

import fnmatch
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import torch
import typer
from rich.console import Console
from torch import nn

from kshare._version import __version__
from kshare.api import Analysis
from kshare.api import analyze as analyze_model
from kshare.calibrate import batch_norms, recalibrate_bn
from kshare.checkpoint import load, restore, save, summarize
from kshare.checkpoint import read as read_checkpoint
from kshare.data import Adapter, load_data
from kshare.errors import (
    ExportError,
    KShareError,
    OptionError,
    PlanError,
    PolicyError,
    StudyError,
    TrainingError,
    WeightsError,
)
from kshare.export import export_onnx, export_safetensors
from kshare.graph import METHODS
from kshare.plan import SharingPlan
from kshare.policy import POLICY_HELP
from kshare.relax import RELAX_HELP, Relaxation, fold
from kshare.report import analysis_json, render_analysis, render_applied, render_info
from kshare.report import size as size_text
from kshare.signature import MATCH_MODES
from kshare.surgery import INITS, plan_of, tie
from kshare.sweep import SweepConfig, aggregate, pareto, plot_sweep, run_sweep
from kshare.train import TrainConfig, check_classes, evaluate, input_channels, resume_state, runtime, shutdown
from kshare.train import finetune as run_finetune
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
        typer.echo(f"error: {' '.join(message.split())}", err=True)
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
        raise OptionError(f"{flag}: {value!r} is not one of {', '.join(allowed)}")
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
TrustOpt = Annotated[
    bool, typer.Option(help="Let a checkpoint rebuild its model by running the user code it names "
                            "(module:factory, file.py:factory). Only for files you trust.")
]
TraceOpt = Annotated[str, typer.Option(help="How to find the convs: auto (FX, else hooks), fx, hooks.")]
RelaxOpt = Annotated[str, typer.Option(help=f"Per-member parameters on the shared kernel: {RELAX_HELP}; "
                                            "counted in every figure and in a budget.")]


def _analyze(model: str, groups: str, match: str, include: list[str] | None, exclude: list[str] | None,
             min_size: int, share_bias: bool, input_size: str | None, weights: Path | None,
             kwarg: list[str] | None, trace: str, relax: str) -> tuple[nn.Module, Analysis]:
    """Build the model and analyse it: the common front half of `analyze` and `apply`."""
    _choice(match, MATCH_MODES, "--match")
    _choice(trace, METHODS, "--trace")
    with Console(stderr=True).status(f"building {model}…"):
        net, spec = load_model(model, parse_kwargs(kwarg), weights)
    # a budget plan clusters every kernel, many times over with a relaxation: up to a minute on resnet50
    with Console(stderr=True).status(f"planning {groups}" + ("" if relax == "none" else f" with {relax}") + "…"):
        result = analyze_model(
            net, groups, match=match, include=include or (), exclude=exclude or (), min_size=min_size,
            share_bias=share_bias, input_size=input_size, method=trace, spec=spec, relax=relax,
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
    relax: RelaxOpt = "none",
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON for scripts.")] = False,
) -> None:
    """Show which convolutions could share a kernel under a policy, and what it saves."""
    _, result = _analyze(model, groups, match, include, exclude, min_size, share_bias, input_size, weights,
                         kwarg, trace, relax)
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
    init: Annotated[str | None, typer.Option(help="Shared kernel from the members': first, mean, medoid, norm_mean "
                                                  "(default: the plan's own; budget plans use mean, others first).")
                    ] = None,
    match: MatchOpt = "strict",
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    min_size: MinSizeOpt = 2,
    share_bias: ShareBiasOpt = True,
    input_size: InputSizeOpt = None,
    weights: WeightsOpt = None,
    kwarg: KwargOpt = None,
    trace: TraceOpt = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the random init (models built without --weights).")] = 0,
    relax: RelaxOpt = "none",
) -> None:
    """Tie the sharing groups of a model and save it: each shared kernel is stored once.

    `--groups none` saves the model untied: a baseline checkpoint for `finetune`, `eval`,
    `--teacher` and `sweep`.
    """
    if init is not None:
        _choice(init, INITS, "--init")
    Relaxation.parse(relax)
    torch.manual_seed(seed)
    if groups == "none" and plan is None:
        net, spec = load_model(model, parse_kwargs(kwarg), weights)
        path = save(net, out, spec=spec)
        render_applied(None, path, Console())
        return
    if plan is not None:
        if not plan.is_file():
            raise PlanError(f"plan file not found: {plan}")
        chosen = SharingPlan.from_json(plan.read_text())
        net, spec = load_model(model, parse_kwargs(kwarg), weights)
    else:
        net, result = _analyze(model, groups, match, include, exclude, min_size, share_bias, input_size, weights,
                               kwarg, trace, relax)
        chosen, spec = result.plan, result.spec
    tie(net, chosen, init=init, relax=relax)
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
    trust_code: TrustOpt = False,
) -> None:
    """Export a checkpoint to ONNX and/or safetensors, keeping shared tensors shared."""
    if onnx is None and safetensors is None:
        raise ExportError("nothing to export: pass --onnx FILE and/or --safetensors FILE")
    net = load(checkpoint, load_model(model)[0] if model else None, trust_code=trust_code)
    console = Console()
    if onnx is not None:
        with Console(stderr=True).status("exporting ONNX…"):
            export_onnx(net, onnx, input_size=input_size, opset=opset)
        console.print(f"wrote {onnx} ({size_text(onnx.stat().st_size)})")
    if safetensors is not None:
        export_safetensors(net, safetensors)
        console.print(f"wrote {safetensors} ({size_text(safetensors.stat().st_size)})")


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


DataOpt = Annotated[
    str, typer.Option("--data", help="fashion-mnist, cifar10, cifar100, imagefolder:PATH, digits, fake.")
]
DataRootOpt = Annotated[Path | None, typer.Option(help="Folder holding the dataset's files.")]
ImageSizeOpt = Annotated[int | None, typer.Option(help="Resize images to this size (default: the data's own).")]
LimitOpt = Annotated[int | None, typer.Option(help="Use only the first N samples (quick runs).")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: cuda when available).")]


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


@app.command()
@one_line_errors
def sweep(
    source: Annotated[str, typer.Argument(help="An untied kshare checkpoint, or a model name (with --weights).")],
    data: Annotated[str, typer.Option("--data", help="Dataset to evaluate (and fine-tune) on.")] = "fashion-mnist",
    data_root: DataRootOpt = None,
    weights: WeightsOpt = None,
    kwarg: KwargOpt = None,
    policies: Annotated[str, typer.Option(help="Positional policies, comma-separated.")] = "all,stage",
    budgets: Annotated[str, typer.Option(help="Budget fractions, comma-separated (e.g. 0.3,0.5).")] = "",
    relax: Annotated[str, typer.Option(help="Relaxations, comma-separated (none,scale,lora:2,lora:auto,...).")
                     ] = "none",
    match: Annotated[str, typer.Option(help="Also fit a budget plan per relaxation to these policies' sizes.")
                     ] = "",
    init: Annotated[str, typer.Option(help="Shared-kernel init for every point.")] = "mean",
    epochs: Annotated[int, typer.Option(help="Fine-tune epochs per point (0: evaluate right after tying).")] = 0,
    loss: Annotated[str, typer.Option(help="ce, kd (distil from the untied model) or ce,kd.")] = "ce",
    lr: Annotated[float, typer.Option(help="Fine-tune learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 128,
    seeds: Annotated[str, typer.Option(help="Fine-tune seeds, comma-separated (each point runs once per seed).")
                     ] = "0",
    size_tolerance: Annotated[float, typer.Option(help="--match admits plans up to this fraction larger "
                                                       "(0.005: within 0.5%).")] = 0.0,
    calibrate: Annotated[int, typer.Option(help="Re-estimate BatchNorm statistics on this many training images "
                                                "after tying (0: off).")] = 0,
    trust_code: TrustOpt = False,
    image_size: ImageSizeOpt = None,
    limit_train: LimitOpt = None,
    limit_test: LimitOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Sweep JSON.")] = Path("sweep.json"),
    plot: Annotated[Path | None, typer.Option(help="Pareto plot PNG (default: OUT with .png).")] = None,
) -> None:
    """Evaluate a grid of policies, budgets and relaxations on one trained model; JSON + Pareto plot."""
    _choice(init, INITS, "--init")
    config = SweepConfig(policies=_csv(policies), budgets=tuple(_fraction(b) for b in _csv(budgets)),
                         relaxations=_csv(relax) or ("none",), match=_csv(match), init=init, epochs=epochs,
                         losses=_csv(loss), lr=lr, batch_size=batch_size, image_size=image_size,
                         seeds=tuple(_integer(x, "--seeds") for x in _csv(seeds)), size_tolerance=size_tolerance,
                         calibrate=calibrate)
    baseline = None
    if Path(source).is_file():
        if weights is not None:
            raise WeightsError("--weights is for a model name; a checkpoint already holds its weights")
        payload = read_checkpoint(source)  # read once: the model and how it was trained
        net = restore(payload, what=source, trust_code=trust_code)
        if plan_of(net) is not None:
            raise PlanError(f"{source} is already tied: sweep starts from the untied model (kshare apply -g none)")
        baseline = payload.get("extra", {}).get("finetune")
    else:
        net, _ = load_model(source, parse_kwargs(kwarg), weights)
    train_data = load_data(data, "train", data_root, image_size).subset(limit_train)
    test_data = load_data(data, "test", data_root, image_size).subset(limit_test)
    check_classes(net, test_data, Adapter.for_model(test_data, input_channels(net), image_size, False),
                  next(net.parameters()).device)
    rows = run_sweep(net, train_data, test_data, config, out, baseline=baseline)
    picture = plot_sweep(rows, plot or out.with_suffix(".png"), f"{source} on {test_data.name}")
    front = ", ".join(r.label + (f" ({r.loss})" if r.loss else "") for r in pareto(aggregate(rows)))
    typer.echo(f"wrote {out} ({len(rows)} points) and {picture}; Pareto front: {front}")


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise PolicyError(f"bad budget {text!r}: expected a fraction such as 0.3") from None


def _integer(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise StudyError(f"bad {option} value {text!r}: expected whole numbers such as 0,1,2") from None


def _load_teacher(ref: str, weights: Path | None, trust_code: bool) -> nn.Module:
    """A teacher from a kshare checkpoint, or a model name plus --teacher-weights (a teacher
    with random weights would teach noise: refused)."""
    if Path(ref).is_file():
        if weights is not None:
            raise TrainingError("--teacher-weights is for a model name; a checkpoint already holds its weights")
        return load(ref, trust_code=trust_code)
    if weights is None:
        raise TrainingError(f"teacher {ref!r} is a model name without weights: pass --teacher-weights FILE "
                            "or a trained kshare checkpoint as --teacher")
    return load_model(ref, weights=weights)[0]


@app.command()
@one_line_errors
def finetune(
    checkpoint: Annotated[Path, typer.Argument(help="A kshare checkpoint, tied or not.")],
    data: DataOpt = "fashion-mnist",
    data_root: DataRootOpt = None,
    epochs: Annotated[int, typer.Option(help="Total epochs (a resumed run continues up to this).")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Images per step (per process under torchrun).")] = 128,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd (Nesterov momentum).")] = "adamw",
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 0.05,
    warmup: Annotated[float, typer.Option(help="Linear warm-up, in epochs (fractions allowed).")] = 0.0,
    clip_grad: Annotated[float, typer.Option(help="Clip the gradient norm to this (0: off).")] = 0.0,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the cross-entropy.")] = 0.0,
    distill: Annotated[bool, typer.Option(help="Add knowledge distillation from --teacher.")] = False,
    teacher: Annotated[str | None, typer.Option(help="Teacher: a kshare checkpoint or a model name.")] = None,
    teacher_weights: Annotated[Path | None, typer.Option(help="Weights for a teacher given by name.")] = None,
    temperature: Annotated[float, typer.Option(help="Distillation temperature.")] = 4.0,
    alpha: Annotated[float, typer.Option(help="Weight of the distillation term (CE gets 1 - alpha).")] = 0.5,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Checkpoint to write each epoch.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last completed epoch of the run writing --out.")
                      ] = False,
    metrics: Annotated[Path | None, typer.Option(help="Metrics JSONL (default: OUT.metrics.jsonl).")] = None,
    image_size: ImageSizeOpt = None,
    limit_train: LimitOpt = None,
    limit_test: LimitOpt = None,
    seed: Annotated[int, typer.Option(help="Seed for init order, shuffling and augmentation.")] = 0,
    device: DeviceOpt = None,
    amp: Annotated[bool, typer.Option(help="Mixed precision on CUDA (bf16, else fp16 with scaling).")] = True,
    trust_code: TrustOpt = False,
) -> None:
    """Fine-tune a checkpoint on real data, keeping its sharing; optionally distil from a teacher."""
    config = TrainConfig(
        epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay,
        warmup_epochs=warmup, clip_grad=clip_grad, label_smoothing=label_smoothing, distill=distill,
        temperature=temperature, alpha=alpha, seed=seed, amp=amp, image_size=image_size,
    )
    if teacher is not None and not distill:
        raise TrainingError("--teacher given without --distill")
    out = out or checkpoint.with_name(checkpoint.stem + ".ft.pt")
    net, state = resume_state(out, trust_code=trust_code) if resume else (load(checkpoint, trust_code=trust_code), None)
    teacher_net = _load_teacher(teacher, teacher_weights, trust_code) if distill and teacher else None
    train_data = load_data(data, "train", data_root, image_size).subset(limit_train)
    test_data = load_data(data, "test", data_root, image_size).subset(limit_test)
    try:
        summary = run_finetune(net, train_data, test_data, config, out, teacher=teacher_net, resume=state,
                               metrics=metrics, device=device)
    finally:
        shutdown()
    last = summary["history"][-1] if summary["history"] else None
    if last is None:
        typer.echo(f"nothing to do: {out} already has {epochs} epochs")
    elif int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"done: test acc {last['test_acc']:.4f} after epoch {last['epoch']}; wrote {out}")


@app.command("eval")
@one_line_errors
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A kshare checkpoint.")],
    data: DataOpt = "fashion-mnist",
    data_root: DataRootOpt = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 256,
    image_size: ImageSizeOpt = None,
    limit_test: LimitOpt = None,
    device: DeviceOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    trust_code: TrustOpt = False,
) -> None:
    """Test accuracy and loss of a checkpoint on a dataset's test split."""
    net = load(checkpoint, trust_code=trust_code)
    test_data = load_data(data, "test", data_root, image_size).subset(limit_test)
    rt = runtime(device)
    net.to(rt.device)
    adapter = Adapter.for_model(test_data, input_channels(net), image_size, augment=False)
    check_classes(net, test_data, adapter, rt.device)
    result = evaluate(net, test_data, adapter, batch_size, rt) | {"data": test_data.name}
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"{checkpoint}: test acc {result['acc']:.4f}, loss {result['loss']:.4f} "
                   f"on {int(result['n'])} {test_data.name} images")


@app.command()
@one_line_errors
def calibrate(
    checkpoint: Annotated[Path, typer.Argument(help="A kshare checkpoint, usually just tied by `apply`.")],
    data: DataOpt = "fashion-mnist",
    data_root: DataRootOpt = None,
    images: Annotated[int, typer.Option(help="Training images to estimate the statistics on.")] = 2048,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 128,
    image_size: ImageSizeOpt = None,
    limit_test: LimitOpt = None,
    device: DeviceOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to save (default: overwrite CHECKPOINT).")
                   ] = None,
    trust_code: TrustOpt = False,
) -> None:
    """Re-estimate BatchNorm statistics after tying (no labels, no training); report test accuracy."""
    if images < 1:
        raise TrainingError(f"--images must be at least 1, got {images}")
    net = load(checkpoint, trust_code=trust_code)
    if not batch_norms(net):
        raise TrainingError(f"{checkpoint} has no BatchNorm layer with running statistics: nothing to calibrate")
    train_data = load_data(data, "train", data_root, image_size)
    test_data = load_data(data, "test", data_root, image_size).subset(limit_test)
    rt = runtime(device)
    net.to(rt.device)
    channels = input_channels(net)
    test_adapter = Adapter.for_model(test_data, channels, image_size, augment=False)
    check_classes(net, test_data, test_adapter, rt.device)
    before = evaluate(net, test_data, test_adapter, rt=rt)["acc"]
    layers = recalibrate_bn(net, train_data, images=images, batch_size=batch_size,
                            adapter=Adapter.for_model(train_data, channels, image_size, augment=False))
    after = evaluate(net, test_data, test_adapter, rt=rt)["acc"]
    target = save(net.cpu(), out or checkpoint)
    typer.echo(f"recalibrated {layers} BatchNorm layers on {min(images, len(train_data.labels)):,} "
               f"{train_data.name} images: test acc {before:.4f} → {after:.4f}; wrote {target}")


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
