"""The fit step: tie a trained network with shared kernels fitted to what each member outputs
on real inputs (`kshare.fit.solve`), in one of two orders.

Weight-space inits (`mean`, `norm_mean`) minimise the wrong error: a kernel close to its
members' in weights can compute something far from them. GPTQ/OBC fit each layer's new weights
to reproduce its outputs on calibration inputs, in closed form; here one kernel serves every
member of a group at once, so the least-squares problem sums over the members.

- `oneshot`: one pass of the untied network; every group fitted from its inputs there.
- `sequential` (GPTQ's order): groups in network order, each fitted to the inputs of the
  *partially tied* network (earlier groups fitted, BatchNorm re-estimated) against the untied
  network's outputs (C = Σ x xᵀ̃), so each fit corrects what the ones before it changed instead
  of compounding it. One paired, early-stopped pass per group: a stage of four groups is run
  about four times.
- `progressive`: the same against-the-original fit, visited member by member in the order the
  network runs them, so the copy's stream moves through the network once: it stands just before
  each member with every value live there kept (`kshare.fit.streams.SteppedStream`). At each member its group is
  refitted from the members reached so far, and that kernel goes into this member and every
  member not reached yet, so later members see inputs made with it; members already passed
  keep the kernel they ran with (what the cached streams hold of them, so cached and uncached
  fits agree). The last member reached gives the group its final fit (with its relaxation).
  Interleaved groups (a stage's first and second convs) are thus each fitted on inputs the
  other's fit made.

BatchNorm recalibration and block reconstruction come after this step; `kshare.retrofit` runs
them in order.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from kshare.analysis.inspect import analysis_mode
from kshare.data.datasets import ImageData
from kshare.data.feed import Adapter, adapter_for
from kshare.errors import PlanError
from kshare.fit.batchnorm import batch_norms
from kshare.fit.blocks import UnitReconstruction, held_out_images, reconstruct
from kshare.fit.config import FitConfig
from kshare.fit.solve import Fitted, GroupFit, assign, effective, fit_group, refit_layer, well_posed
from kshare.fit.statistics import (
    Moments,
    SourceOutputs,
    collect,
    fit_batches,
    moments_of_inputs,
    source_outputs,
    supports,
)
from kshare.fit.streams import PairedStreams, SteppedStream, paired_streams, stepped_stream
from kshare.kernels import FITTED
from kshare.planning.plan import Group, SharingPlan
from kshare.planning.relaxation import Relaxation
from kshare.progress import ProgressFn
from kshare.surgery.relax import set_member_delta
from kshare.surgery.tie import apply_plan, plan_of

log = logging.getLogger(__name__)

Refit = tuple[torch.Tensor, torch.Tensor | None]  # an unshared layer's refitted weight and bias


@dataclass(frozen=True)
class FitReport:
    """What the fit did: its mode, how many images it read, how long it took, each group's
    errors; the pipeline adds the BatchNorm layers it re-estimated and the units it trained."""

    mode: str
    images: int
    seconds: float
    groups: tuple[GroupFit, ...]
    recalibrated: int  # BatchNorm layers re-estimated (0: none, or recalibration off)
    compensated: int = 0  # unshared layers refitted to their original outputs (sequential, `compensate`)
    reconstructed: tuple[UnitReconstruction, ...] = ()  # units trained after the fit (`reconstruct`)
    cache: str = ""  # where the sequential fit kept its activations ("in memory as float32", ...); "": one-shot


def following_batchnorms(model: nn.Module, members: Sequence[str], x: torch.Tensor) -> set[str]:
    """The members whose output feeds a BatchNorm directly (conv → BN): their statistics are
    centred, since that BatchNorm removes each channel's mean."""
    modules = dict(model.named_modules())
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor is kept: a freed one's id may be reused
    followed: set[str] = set()

    def after_conv(name: str):  # type: ignore[no-untyped-def]
        def hook(_: nn.Module, __: object, out: torch.Tensor) -> None:
            outputs[id(out)] = (name, out)
        return hook

    def before_norm(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if inputs and id(inputs[0]) in outputs and outputs[id(inputs[0])][1] is inputs[0]:
            followed.add(outputs[id(inputs[0])][0])

    handles = [modules[m].register_forward_hook(after_conv(m)) for m in members]
    handles += [m.register_forward_pre_hook(before_norm) for m in batch_norms(model)]
    _probe(model, x[:2], handles)
    return followed


def _probe(model: nn.Module, x: torch.Tensor, handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    """One forward of `x` for the hooks behind `handles` (removed after), changing nothing."""
    try:
        with analysis_mode(model):
            model(x)
    finally:
        for h in handles:
            h.remove()


def fit_kernels(model: nn.Module, plan: SharingPlan, batches: Sequence[torch.Tensor], config: FitConfig = FitConfig(),
                progress: ProgressFn | None = None) -> FitReport:
    """Tie the untied `model` in place by `plan`, each group's shared kernel (and relaxation) fitted
    to what its members output on `batches` (model input, on the model's device: `fit_batches`).
    Each group's `error` (weights) and `output_error` (outputs on those images) go into the
    attached plan. Groups of convs a fit cannot read are tied with the mean kernel, as said.
    BatchNorm statistics are left as they were (`recalibrated` 0): the pipeline re-estimates them."""
    if plan_of(model) is not None:
        raise PlanError("a data fit needs the untied model (its members' own kernels are the targets): "
                        "fit before tying, or untie first")
    if not plan.groups:
        raise PlanError("the plan ties no group: there is nothing to fit")
    start = time.perf_counter()
    plan.validate(model)
    relaxation = Relaxation.parse(plan.relax)
    modules = dict(model.named_modules())
    readable = [g for g in plan.groups if all(supports(modules[m]) for m in g.members)]
    members = [m for g in readable for m in g.members]
    # a BatchNorm re-estimated after the fit removes each channel's mean: its conv's outputs are fitted up to
    # it; one whose statistics stay (a pretrained network's) needs the raw outputs reproduced
    centred = following_batchnorms(model, members, batches[0]) if members and config.track_batchnorm else set()
    fits: dict[str, Fitted] = {}
    refits: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    kept = ""
    if config.mode == "oneshot":
        moments = collect(model, members, batches, positions=config.positions, seed=config.seed, progress=progress)
        for group in readable:
            fits[group.name] = fit_group(group, [modules[m] for m in group.members], moments, centred, relaxation,
                                          plan.share_bias, config)
    elif config.mode == "progressive":
        work = copy.deepcopy(model)
        steps = _steps(model, readable, batches[0], config.compensate)
        if config.track_batchnorm:
            unshared = [n for step in steps for n in step if n not in set(members)]
            centred |= following_batchnorms(model, unshared, batches[0])
        fits, refits, kept = _progressive(model, work, steps, readable, batches, config, centred, relaxation,
                                          plan.share_bias, progress)
        del work
    else:
        work = copy.deepcopy(model)  # the partially tied network: fitted kernels copied into each member
        units = _units(model, readable, batches[0], config.compensate)
        if config.track_batchnorm:
            centred |= following_batchnorms(model, [n for u in units if isinstance(u, list) for n in u], batches[0])
        fits, refits, kept = _sequential(model, work, units, batches, config, centred, relaxation, plan.share_bias,
                                         progress)
        del work
    kernels = {name: (f.weight.reshape(modules[_first(plan, name)].weight.shape), f.bias) for name, f in fits.items()}
    groups = tuple(dataclasses.replace(g, init=FITTED, error=fits[g.name].report.weight_error,
                                       output_error=fits[g.name].report.output_error) if g.name in fits
                   else dataclasses.replace(g, init="mean") for g in plan.groups)
    fitted_plan = dataclasses.replace(plan, groups=groups)
    apply_plan(model, fitted_plan, kernels=kernels)
    for group in readable:
        for i, name in enumerate(group.members):
            set_member_delta(modules[name], fits[group.name].scales[i], fits[group.name].loras[i])
    with torch.no_grad():
        for name, (weight, bias) in refits.items():
            assign(modules[name], weight, bias)
    reports = tuple(fits[g.name].report if g.name in fits else
                    GroupFit(g.name, len(g.members), float("nan"), float("nan"), float("nan"), fitted=False)
                    for g in plan.groups)
    skipped = [g.name for g in plan.groups if g.name not in fits]
    if skipped:
        log.warning(f"groups {', '.join(skipped)} hold convolutions a data fit cannot read (transposed or 3-D): "
                    "tied with their members' mean kernel")
    return FitReport(config.mode, sum(len(b) for b in batches), time.perf_counter() - start, reports, 0, len(refits),
                     cache=kept)


def _sequential(model: nn.Module, work: nn.Module, units: list[Group | list[str]], batches: Sequence[torch.Tensor],
                config: FitConfig, centred: set[str], relaxation: Relaxation, share_bias: bool,
                progress: ProgressFn | None) -> tuple[dict[str, Fitted], dict[str, Refit], str]:
    """The sequential order: each unit fitted on the partially tied `work` against the untied
    `model`, its fitted kernels copied into `work` before the next; both streams kept at the cut
    before each unit (`kshare.fit.streams`) unless `config.cache` is off or the network does not
    trace. Also returns where the activations were kept, in words."""
    modules, work_modules = dict(model.named_modules()), dict(work.named_modules())
    fits: dict[str, Fitted] = {}
    refits: dict[str, Refit] = {}
    names_of = [list(u.members) if isinstance(u, Group) else u for u in units]
    start = time.perf_counter()
    given = _source_outputs(model, names_of, batches, config, progress)
    cached = paired_streams(model, work, batches, names_of, _left(config, given), progress, given is None) \
        if config.cache else nullcontext(None)
    with cached as streams:
        kept = _where_kept(streams, config)
        for index, (unit, names) in enumerate(zip(units, names_of, strict=True)):  # in execution order
            label = f"unit {index + 1}/{len(units)} ({unit.name if isinstance(unit, Group) else ', '.join(names)})"
            moments = _moments_at(streams, model, work, names, batches, config, index > 0, label, progress, given)
            with torch.no_grad():
                if isinstance(unit, list):  # unshared layers after a tied group: refit to their original outputs
                    _refit_layers(unit, moments, modules, work_modules, centred, config.damp, refits)
                else:
                    fits[unit.name] = _fit_into(unit, modules, work_modules, moments, centred, relaxation, share_bias,
                                                config)
            elapsed = time.perf_counter() - start
            log.info(f"{label}: {sum(len(b) for b in batches):,} images, {elapsed:.1f} s, "
                     f"ETA {elapsed / (index + 1) * (len(units) - index - 1):.0f} s")
    return fits, refits, kept


def _where_kept(streams: PairedStreams | None, config: FitConfig) -> str:
    """Where a sequential or progressive fit kept its activations, in words."""
    if streams is not None:
        return streams.folder.storage.describe()
    return "not cached: every pass from the input" + ("" if not config.cache else " (the model does not trace)")


def _moments_at(streams: PairedStreams | None, model: nn.Module, work: nn.Module, names: Sequence[str],
                batches: Sequence[torch.Tensor], config: FitConfig, after_first: bool, label: str,
                progress: ProgressFn | None, given: SourceOutputs | None) -> dict[str, Moments]:
    """The moments of `names` in the partly tied `work` against `model`, the streams moved to the
    cut before them first (when cached; `given`: the untied one's outputs, read once). After the
    first unit, what the fits before it changed reaches BatchNorm too: re-estimated in the same pass."""
    forward = None
    recalibrate = after_first and config.track_batchnorm
    if streams is not None:
        streams.reach(names, recalibrate, f"activations, {label}")
        forward = streams.forward
    return collect(work, names, batches, source=model, positions=config.positions, seed=config.seed,
                   recalibrate=recalibrate, progress=progress, task=f"statistics, {label}", forward=forward,
                   given=given)


def _moments_stepped(stream: SteppedStream, original: nn.Module, copy: nn.Module, name: str,
                     batches: Sequence[torch.Tensor], config: FitConfig, after_first: bool, label: str,
                     given: SourceOutputs) -> dict[str, Moments]:
    """The moments of layer `name` (`copy` in the partly tied network, `original` in the untied one)
    read where the copy's stepped stream stands, moved to just before it first (BatchNorm by batch
    statistics after the first step, as `_moments_at`)."""
    stream.reach(name, after_first and config.track_batchnorm, f"activations, {label}")
    return {name: moments_of_inputs(copy, name, original, lambda i: stream.input_of(name, i),
                                    len(batches), given, positions=config.positions, seed=config.seed)}


def _left(config: FitConfig, given: SourceOutputs | None) -> int:
    """The cache budget the activations have, once the untied outputs (if read once) hold their part."""
    return config.cache_memory - (given.nbytes if given is not None else 0)


def _source_outputs(model: nn.Module, units: Sequence[Sequence[str]], batches: Sequence[torch.Tensor],
                    config: FitConfig, progress: ProgressFn | None) -> SourceOutputs | None:
    """The untied `model`'s outputs at every layer of `units`, read once within half the cache budget."""
    return source_outputs(model, [n for names in units for n in names], batches, positions=config.positions,
                          seed=config.seed, budget=config.cache_memory // 2, progress=progress)


def _refit_layers(names: Sequence[str], moments: dict[str, Moments], modules: dict[str, nn.Module],
                  work_modules: dict[str, nn.Module], centred: set[str], damp: float, refits: dict[str, Refit]) -> None:
    """Unshared layers after a tied group refitted to their original outputs, into `refits` and the copy."""
    for name in names:
        if not well_posed(moments[name]):
            log.info(f"{name} keeps its weights: {moments[name].rows:,} samples are too few to "
                     f"refit its {moments[name].gram.shape[-1]:,} inputs")
            continue
        refits[name] = refit_layer(modules[name], moments[name], name in centred, damp)
        assign(work_modules[name], *refits[name])


def _fit_into(group: Group, modules: dict[str, nn.Module], work_modules: dict[str, nn.Module],
              moments: dict[str, Moments], centred: set[str], relaxation: Relaxation, share_bias: bool,
              config: FitConfig) -> Fitted:
    """`group` fitted from its members' `moments`, each member of the copy given its kernel."""
    fitted = fit_group(group, [modules[m] for m in group.members], moments, centred, relaxation, share_bias, config)
    for i, name in enumerate(group.members):
        assign(work_modules[name], effective(fitted, i, work_modules[name].weight.shape), fitted.bias)
    return fitted


def reconstruct_fitted(model: nn.Module, original: nn.Module, data: ImageData, batches: Sequence[torch.Tensor],
                       config: FitConfig, adapter: Adapter, device: torch.device, progress: ProgressFn | None = None
                       ) -> tuple[UnitReconstruction, ...]:
    """Block reconstruction of the fitted `model` for `config.reconstruct` steps per unit on its
    fit `batches` (or `config.reconstruct_images` of the same seeded order), each unit judged on
    images of `data` that neither sample took."""
    taken = config.images
    if config.reconstruct_images is not None and config.reconstruct_images != config.images:
        taken = config.reconstruct_images
        batches = fit_batches(data, taken, config.batch_size, adapter, device, config.seed)
    held_out = held_out_images(data, max(taken, config.images), adapter, device, config.seed, config.batch_size)
    return reconstruct(model, original, batches, steps=config.reconstruct, lr=config.reconstruct_lr,
                       held_out=held_out, seed=config.seed, progress=progress)


def _execution_order(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Each layer a fit can read, by the order of its first call on `x`."""
    order: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules() if supports(m)}

    def seen(module: nn.Module, *_: object) -> None:
        order.setdefault(names[module], len(order))

    _probe(model, x[:1], [m.register_forward_pre_hook(seen) for m in names])
    return order


def _steps(model: nn.Module, groups: list[Group], x: torch.Tensor, compensate: bool) -> list[list[str]]:
    """What a progressive fit visits, in execution order: each member alone, and (with
    `compensate`) each unshared layer after the first member, refitted before the stream moves
    through it (the sequential fit refits a run of them from one pass)."""
    order = _execution_order(model, x)
    grouped = {m for g in groups for m in g.members}
    first = min((order[m] for m in grouped if m in order), default=len(order))
    return [[name] for name in sorted(grouped | ({n for n in order if order[n] > first} if compensate else set()),
                                      key=lambda n: order.get(n, 0))]


def _progressive(model: nn.Module, work: nn.Module, steps: list[list[str]], groups: list[Group],
                 batches: Sequence[torch.Tensor], config: FitConfig, centred: set[str], relaxation: Relaxation,
                 share_bias: bool, progress: ProgressFn | None) -> tuple[dict[str, Fitted], dict[str, Refit], str]:
    """The progressive order (see the module): like `_sequential`, with one member, or one
    unshared layer, per step; the copy's stream stepped through the network where it traces and
    the untied outputs were read once, else cached at cuts (`_sequential`'s streams)."""
    modules, work_modules = dict(model.named_modules()), dict(work.named_modules())
    group_of = {m: g for g in groups for m in g.members}
    fits: dict[str, Fitted] = {}
    refits: dict[str, Refit] = {}
    reached: dict[str, Moments] = {}  # the moments of members whose group is not complete yet
    start = time.perf_counter()
    given = _source_outputs(model, steps, batches, config, progress)
    with ExitStack() as stack:  # the copy's stream stepped through the network, else paired streams at cuts
        stream = stack.enter_context(stepped_stream(work, batches, [names[0] for names in steps],
                                                    _left(config, given), progress)) \
            if config.cache and given is not None else None
        streams = stack.enter_context(paired_streams(model, work, batches, steps, _left(config, given), progress,
                                                     given is None)) if config.cache and stream is None else None
        kept = stream.folder.storage.describe() if stream is not None else _where_kept(streams, config)
        for index, names in enumerate(steps):
            group = group_of.get(names[0])
            label = f"step {index + 1}/{len(steps)} ({', '.join(names)}{f' of {group.name}' if group else ''})"
            if stream is not None and given is not None:
                moments = _moments_stepped(stream, modules[names[0]], work_modules[names[0]], names[0], batches,
                                           config, index > 0, label, given)
            else:
                moments = _moments_at(streams, model, work, names, batches, config, index > 0, label, progress, given)
            with torch.no_grad():
                if group is None:
                    _refit_layers(names, moments, modules, work_modules, centred, config.damp, refits)
                else:
                    member = names[0]
                    ahead = [m for m in group.members if m not in reached]  # this member and those after it
                    reached[member] = moments[member]
                    seen = [m for m in group.members if m in reached]
                    shape = work_modules[member].weight.shape
                    if len(seen) == len(group.members):  # the group's final fit
                        fitted = fits[group.name] = fit_group(group, [modules[m] for m in seen], reached, centred,
                                                              relaxation, share_bias, config)
                        assign(work_modules[member], effective(fitted, seen.index(member), shape), fitted.bias)
                        for name in seen:
                            del reached[name]
                    else:  # the kernel so far (no relaxation until every member is reached)
                        partial = dataclasses.replace(group, members=tuple(seen), ranks=())
                        fitted = fit_group(partial, [modules[m] for m in seen], reached, centred, Relaxation(),
                                           share_bias, config, measure=False)
                        for name in ahead:
                            assign(work_modules[name], fitted.weight.reshape(shape), fitted.bias)
            elapsed = time.perf_counter() - start
            log.info(f"{label}: {sum(len(b) for b in batches):,} images, {elapsed:.1f} s, "
                     f"ETA {elapsed / (index + 1) * (len(steps) - index - 1):.0f} s")
    return fits, refits, kept


def _units(model: nn.Module, groups: list[Group], x: torch.Tensor, compensate: bool) -> list[Group | list[str]]:
    """What a sequential fit visits, in execution order: each group, and (with `compensate`) the
    unshared convolutions and linear layers that run after the first group, refitted so that what
    the groups before them changed reaches the layers after them as little as possible."""
    order = _execution_order(model, x)
    grouped = {m for g in groups for m in g.members}
    first = min((order[m] for m in grouped if m in order), default=len(order))
    layers = [n for n in order if n not in grouped and order[n] > first] if compensate else []
    ordered = sorted([*groups, *layers], key=lambda u: min(order.get(m, 0) for m in u.members)
                     if isinstance(u, Group) else order[u])
    units: list[Group | list[str]] = []
    for unit in ordered:  # consecutive unshared layers share one pass (a block's first conv and its shortcut)
        if isinstance(unit, str) and units and isinstance(units[-1], list):
            units[-1].append(unit)
        else:
            units.append([unit] if isinstance(unit, str) else unit)
    return units


def output_metric(model: nn.Module, names: Sequence[str], data: ImageData, config: FitConfig = FitConfig(), *,
                  image_size: int | None = None, device: str | torch.device | None = None,
                  progress: ProgressFn | None = None) -> dict[str, tuple[torch.Tensor, float]] | None:
    """Each named conv's input Gram and output energy on `data` (one pass of the untied model; centred
    where a BatchNorm follows): what a budget plan needs to group kernels by output error
    (`build_plan(..., metric=)`). None, with a warning, when a conv cannot be read."""
    modules = dict(model.named_modules())
    unreadable = [n for n in names if not supports(modules[n])]
    if unreadable:
        log.warning(f"{unreadable[0]} cannot be read by a data fit: the budget plan groups kernels by weight error")
        return None
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    batches = fit_batches(data, config.images, config.batch_size, adapter_for(model, data, image_size), dev,
                                  config.seed)
    centred = following_batchnorms(model, names, batches[0])
    moments = collect(model, names, batches, positions=config.positions, seed=config.seed, progress=progress,
                      task="statistics for the budget plan")
    found = {}
    for name in names:
        gram, _, energy = moments[name].centred() if name in centred else moments[name].raw()
        found[name] = (gram, energy)
    return found


def _first(plan: SharingPlan, group: str) -> str:
    return next(g.members[0] for g in plan.groups if g.name == group)
