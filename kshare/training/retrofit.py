"""Data-aware retrofit: tie a trained network with shared kernels fitted to what each member
outputs on real inputs, so it keeps what it knew without retraining.

Weight-space inits (`mean`, `norm_mean`) minimise the wrong error: a kernel close to its
members' in weights can compute something far from them. GPTQ/OBC fit each layer's new weights
to reproduce its outputs on calibration inputs, in closed form; here one kernel serves every
member of a group at once, so the least-squares problem sums over the members:

    W = (Σ a_i W_i C_i)(Σ a_i H_i + λI)⁻¹

with H_i, C_i the member's input statistics (`kshare.training.statistics`) and a_i each
member's weight: `relative` divides by its output energy, so every member counts by its
relative error (what a following BatchNorm, which renormalises each channel, sees). For a
member a BatchNorm follows directly, the statistics are centred: that BatchNorm removes each
channel's mean, so matching means would spend the fit on nothing.

- `oneshot`: one pass of the untied network; every group fitted from its inputs there.
- `sequential` (GPTQ's order): groups in network order, each fitted to the inputs of the
  *partially tied* network (earlier groups fitted, BatchNorm re-estimated) against the untied
  network's outputs (C = Σ x xᵀ̃), so each fit corrects what the ones before it changed instead
  of compounding it. One paired, early-stopped pass per group.

Relaxations are fitted in the same metric: `scale` per output row by weighted least squares,
`lora:R` (and the plan's own ranks under `lora:auto`) as the truncated SVD of the residual in
the H-whitened space. BatchNorm statistics are re-estimated on the calibration images last.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kshare.analysis.inspect import analysis_mode
from kshare.errors import PlanError, TrainingError, param
from kshare.kernels import (
    FITTED,
    blocks,
    damped,
    fit_residual,
    lowrank_factors,
    output_error,
    scale_fit,
    shared_fit,
    solve_right,
    whitened_lowrank,
)
from kshare.planning.plan import Group, SharingPlan
from kshare.planning.relaxation import Relaxation
from kshare.progress import ProgressFn
from kshare.surgery.relax import set_member_delta
from kshare.surgery.tie import apply_plan, plan_of
from kshare.training.calibrate import batch_norms, recalibrate_on
from kshare.training.config import finite_number
from kshare.training.data import Adapter, ImageData, adapter_for
from kshare.training.reconstruct import UnitReconstruction, held_out_images, reconstruct
from kshare.training.statistics import Moments, calibration_batches, collect, supports

log = logging.getLogger(__name__)

FIT_MODES = ("sequential", "oneshot")
WEIGHTINGS = ("relative", "none")


@dataclass(frozen=True)
class FitConfig:
    """How shared kernels are fitted to data: `mode`, how many calibration `images` (a seeded,
    class-balanced sample; labels unused), at most `positions` output positions per image and
    layer, the dampening `damp` (fraction of the mean diagonal), the members' `weighting`, and
    whether BatchNorm statistics are re-estimated on the calibration images at the end
    (`recalibrate`; the sequential mode always re-estimates them between groups of its copy).
    `reconstruct` > 0 then trains each unit of blocks for that many steps towards the untied
    outputs (`kshare.training.reconstruct`), at `reconstruct_lr`, on `reconstruct_images` of the
    same seeded order (default: the fit's own; the closed form is done by about 512, while the
    reconstruction, which trains, keeps gaining from more)."""

    mode: str = "sequential"
    images: int = 512
    batch_size: int = 256
    positions: int = 32
    damp: float = 0.01
    weighting: str = "relative"
    compensate: bool = True
    recalibrate: bool = True
    seed: int = 0
    reconstruct: int = 0
    reconstruct_lr: float = 1e-3
    reconstruct_images: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in FIT_MODES:
            raise TrainingError(f"unknown fit mode {self.mode!r}: expected one of {', '.join(FIT_MODES)}")
        if self.weighting not in WEIGHTINGS:
            raise TrainingError(f"unknown weighting {self.weighting!r}: expected one of {', '.join(WEIGHTINGS)}")
        counts: tuple[tuple[str, int], ...] = (("images", 1), ("batch_size", 1), ("positions", 1), ("reconstruct", 0))
        if self.reconstruct_images is not None:  # None: the fit's own images
            counts += (("reconstruct_images", 1),)
        for name, low in counts:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise TrainingError(f"{param('calib_images' if name == 'images' else name)} must be a whole number "
                                    f"of at least {low}, got {value!r}")
        if not 0.0 <= self.damp <= 10.0:
            raise TrainingError(f"{param('damp')} must be in [0, 10], got {self.damp!r}")
        finite_number("reconstruct_lr", self.reconstruct_lr, 0.0, math.inf, low_open=True)
        if self.reconstruct_images is not None and not self.reconstruct:
            raise TrainingError(f"{param('reconstruct_images')} sets the images of the block reconstruction: give "
                                f"{param('reconstruct')} STEPS too")


@dataclass(frozen=True)
class GroupFit:
    """What fitting did to one group: relative output error on the calibration images with the
    members' mean kernel and with the fitted one, and the fitted kernel's weight error."""

    name: str
    members: int
    mean_output_error: float
    output_error: float
    weight_error: float
    fitted: bool = True  # False: members a data fit cannot read (transposed, 3-D): mean init instead


@dataclass(frozen=True)
class FitReport:
    mode: str
    images: int
    seconds: float
    groups: tuple[GroupFit, ...]
    recalibrated: int  # BatchNorm layers re-estimated (0: none, or recalibration off)
    compensated: int = 0  # unshared layers refitted to their original outputs (sequential, `compensate`)
    reconstructed: tuple[UnitReconstruction, ...] = ()  # units trained after the fit (`reconstruct`)


def following_batchnorms(model: nn.Module, members: Sequence[str], x: torch.Tensor) -> set[str]:
    """The members whose output feeds a BatchNorm directly (conv → BN): their statistics are
    centred, since that BatchNorm removes each channel's mean."""
    modules = dict(model.named_modules())
    outputs: dict[int, str] = {}
    followed: set[str] = set()

    def after_conv(name: str):  # type: ignore[no-untyped-def]
        def hook(_: nn.Module, __: object, out: torch.Tensor) -> None:
            outputs[id(out)] = name
        return hook

    def before_norm(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if inputs and id(inputs[0]) in outputs:
            followed.add(outputs[id(inputs[0])])

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


@dataclass
class _Fitted:
    weight: torch.Tensor  # (G, O, F) float64
    bias: torch.Tensor | None
    scales: list[torch.Tensor | None]
    loras: list[tuple[torch.Tensor, torch.Tensor] | None]
    report: GroupFit


def _fit_group(group: Group, convs: list[nn.Module], moments: dict[str, Moments], centred: set[str],
               relaxation: Relaxation, share_bias: bool, config: FitConfig) -> _Fitted:
    """One group's shared kernel (and bias, scales, deltas) from its members' statistics. Where
    the outputs need the bias (shared, and no BatchNorm to remove it), kernel and bias are fitted
    together: a constant 1 is appended to every patch."""
    g = convs[0].groups
    stats = [moments[m].centred() if m in centred else moments[m].raw() for m in group.members]
    grams, crosses, energies = [s[0] for s in stats], [s[1] for s in stats], [s[2] for s in stats]
    targets = [blocks(c.weight, g) for c in convs]
    has_bias = share_bias and all(c.bias is not None for c in convs)
    fit_bias = has_bias and not any(m in centred for m in group.members)
    mean = torch.stack(targets).mean(0)
    if fit_bias:
        aug = [_augmented(moments[m], t, c.bias) for m, t, c in zip(group.members, targets, convs, strict=True)]
        full_targets, full_crosses, full_grams = ([a[i] for a in aug] for i in range(3))
        energies = [a[3] for a in aug]
        mean_bias = torch.stack([c.bias.detach().float() for c in convs]).mean(0).reshape(g, -1, 1)
        prior = torch.cat([mean, mean_bias], -1)
    else:
        full_targets, full_crosses, full_grams, prior = targets, crosses, grams, mean
    weights = [1.0 / max(e, 1e-30) if config.weighting == "relative" else 1.0 for e in energies]
    full_pulls = [t @ c for t, c in zip(full_targets, full_crosses, strict=True)]  # W_i C_i: the fit and its errors
    solved = shared_fit(full_pulls, full_grams, weights, prior, config.damp).float()
    if fit_bias:
        kernel, bias = solved[..., :-1], solved[..., -1].reshape(-1)
    else:
        kernel = solved
        bias = torch.stack([c.bias.detach().float() for c in convs]).mean(0) if has_bias else None
    before = sum(w * output_error(prior, p, h, e)
                 for w, p, h, e in zip(weights, full_pulls, full_grams, energies, strict=True))
    scales: list[torch.Tensor | None] = []
    loras: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    after = 0.0
    ranks = group.ranks_under(relaxation)
    for i, (t, c, h, rank) in enumerate(zip(targets, crosses, grams, ranks, strict=True)):
        p = t @ c
        if relaxation.scale:
            scale = scale_fit(kernel, p, h).float()
        else:
            scale = torch.ones(kernel.shape[:2], device=kernel.device)
        member = scale[..., None] * kernel
        lora = None
        if rank:
            if g == 1:  # the least-squares delta E = W_i C H⁻¹ − S W, then its best rank in the H metric
                full = solve_right(p, damped(h, config.damp)) - member.double()
                a, b = whitened_lowrank(full, h, rank, config.damp)
                lora = (a[0].float(), b[0].float())
            else:  # a grouped kernel's LoRA spans its blocks, each with its own metric: weight space then
                _, residual = fit_residual(member.reshape(-1, member.shape[-1]), t.reshape(-1, t.shape[-1]), False)
                a, b = lowrank_factors(residual, rank)
                lora = (a.float(), b.float())
            member = member + (lora[0] @ lora[1]).reshape(member.shape)
        scales.append(scale.reshape(-1) if relaxation.scale else None)
        loras.append(lora)
        if fit_bias:
            member = torch.cat([member, solved[..., -1:]], -1)
        after += weights[i] * output_error(member, full_pulls[i], full_grams[i], energies[i])
    total = sum(w * e for w, e in zip(weights, energies, strict=True))
    flat = [c.weight.detach().double().flatten() for c in convs]
    weight_error = sum(float((kernel.double().flatten() - f).square().sum()) for f in flat) / max(
        sum(float(f.square().sum()) for f in flat), 1e-30)
    report = GroupFit(group.name, len(convs), before / max(total, 1e-30), after / max(total, 1e-30), weight_error)
    return _Fitted(kernel, bias, scales, loras, report)


def _augmented(m: Moments, target: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor, float]:
    """Target, cross, gram and output energy with a constant input 1 appended to every patch, so a
    bias is fitted with the kernel (per conv group: the bias of group g's rows sees its own 1)."""
    gram, cross, energy = m.raw()
    g, f = gram.shape[0], gram.shape[1]
    total = m.total.float()
    source_total = total if m.source_total is None else m.source_total.float()
    big_gram = torch.zeros(g, f + 1, f + 1, dtype=gram.dtype, device=gram.device)
    big_gram[:, :f, :f], big_gram[:, :f, f], big_gram[:, f, :f], big_gram[:, f, f] = gram, total, total, m.rows
    big_cross = torch.zeros_like(big_gram)
    big_cross[:, :f, :f], big_cross[:, :f, f], big_cross[:, f, :f], big_cross[:, f, f] = \
        cross, source_total, total, m.rows
    b = bias.detach().float().reshape(g, -1, 1).to(target.device)
    # ‖W x + b‖² summed: the energy, twice b against Σ W x, and every row's b² once per patch
    outputs = m.energy_total if m.energy_total is not None else torch.zeros(b.shape[:2], dtype=torch.float64,
                                                                                     device=b.device)
    energy += 2 * float((b[..., 0].double() * outputs.reshape(b.shape[:2])).sum()) + m.rows * float(b.square().sum())
    return torch.cat([target, b], -1), big_cross, big_gram, energy


def _effective(fitted: _Fitted, index: int, shape: torch.Size) -> torch.Tensor:
    """Member `index`'s kernel as the tied model will compute it (shared, scaled, plus delta)."""
    kernel = fitted.weight
    scale = fitted.scales[index]
    if scale is not None:
        kernel = scale.reshape(kernel.shape[:2])[..., None] * kernel
    lora = fitted.loras[index]
    if lora is not None:
        kernel = kernel + (lora[0] @ lora[1]).reshape(kernel.shape)
    return kernel.reshape(shape)


def fit_and_tie(model: nn.Module, plan: SharingPlan, data: ImageData, config: FitConfig = FitConfig(), *,
                image_size: int | None = None, device: str | torch.device | None = None,
                progress: ProgressFn | None = None) -> FitReport:
    """Tie the untied `model` in place by `plan`, each group's shared kernel (and relaxation) fitted
    to what its members output on `data`'s images; then re-estimate BatchNorm statistics there.
    Each group's `error` (weights) and `output_error` (outputs on the calibration images) go into
    the attached plan. Groups of convs a fit cannot read are tied with the mean kernel, as said."""
    if plan_of(model) is not None:
        raise PlanError("a data fit needs the untied model (its members' own kernels are the targets): "
                        "fit before tying, or untie first")
    if not plan.groups:
        raise PlanError("the plan ties no group: there is nothing to fit")
    start = time.perf_counter()
    plan.validate(model)
    relaxation = Relaxation.parse(plan.relax)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    adapter = adapter_for(model, data, image_size)
    batches = calibration_batches(data, config.images, config.batch_size, adapter, dev, config.seed)
    modules = dict(model.named_modules())
    readable = [g for g in plan.groups if all(supports(modules[m]) for m in g.members)]
    members = [m for g in readable for m in g.members]
    centred = following_batchnorms(model, members, batches[0]) if members else set()
    fits: dict[str, _Fitted] = {}
    refits: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    if config.mode == "oneshot":
        moments = collect(model, members, batches, positions=config.positions, seed=config.seed, progress=progress)
        for group in readable:
            fits[group.name] = _fit_group(group, [modules[m] for m in group.members], moments, centred, relaxation,
                                          plan.share_bias, config)
    else:
        work = copy.deepcopy(model)  # the partially tied network: fitted kernels copied into each member
        work_modules = dict(work.named_modules())
        units = _units(model, readable, batches[0], config.compensate)
        centred |= following_batchnorms(model, [n for u in units if isinstance(u, list) for n in u], batches[0])
        for index, unit in enumerate(units):  # in execution order
            names = list(unit.members) if isinstance(unit, Group) else unit
            # what the fits before it changed reaches BatchNorm too: re-estimated in the same pass
            moments = collect(work, names, batches, source=model, positions=config.positions, seed=config.seed,
                              recalibrate=index > 0, progress=progress, task=f"statistics {index + 1}/{len(units)}")
            with torch.no_grad():
                if isinstance(unit, list):  # unshared layers after a tied group: refit to their original outputs
                    for name in unit:
                        refits[name] = _refit_layer(modules[name], moments[name], name in centred, config.damp)
                        _assign(work_modules[name], *refits[name])
                    continue
                fitted = fits[unit.name] = _fit_group(unit, [modules[m] for m in unit.members], moments, centred,
                                                      relaxation, plan.share_bias, config)
                for i, name in enumerate(unit.members):
                    _assign(work_modules[name], _effective(fitted, i, work_modules[name].weight.shape), fitted.bias)
        del work
    kernels = {name: (f.weight.reshape(modules[_first(plan, name)].weight.shape), f.bias) for name, f in fits.items()}
    groups = tuple(dataclasses.replace(g, init=FITTED, error=fits[g.name].report.weight_error,
                                       output_error=fits[g.name].report.output_error) if g.name in fits
                   else dataclasses.replace(g, init="mean") for g in plan.groups)
    fitted_plan = dataclasses.replace(plan, groups=groups)
    original = copy.deepcopy(model) if config.reconstruct else None  # the targets of the reconstruction
    apply_plan(model, fitted_plan, kernels=kernels)
    for group in readable:
        for i, name in enumerate(group.members):
            set_member_delta(modules[name], fits[group.name].scales[i], fits[group.name].loras[i])
    with torch.no_grad():
        for name, (weight, bias) in refits.items():
            _assign(modules[name], weight, bias)
    layers = recalibrate_on(model, batches) if config.recalibrate else 0
    units = reconstruct_fitted(model, original, data, batches, config, adapter, dev,
                               progress) if original is not None else ()
    reports = tuple(fits[g.name].report if g.name in fits else
                    GroupFit(g.name, len(g.members), float("nan"), float("nan"), float("nan"), fitted=False)
                    for g in plan.groups)
    skipped = [g.name for g in plan.groups if g.name not in fits]
    if skipped:
        log.warning(f"groups {', '.join(skipped)} hold convolutions a data fit cannot read (transposed or 3-D): "
                    "tied with their members' mean kernel")
    return FitReport(config.mode, sum(len(b) for b in batches), time.perf_counter() - start, reports, layers,
                     len(refits), units)


def reconstruct_fitted(model: nn.Module, original: nn.Module, data: ImageData, batches: Sequence[torch.Tensor],
                       config: FitConfig, adapter: Adapter, device: torch.device, progress: ProgressFn | None = None
                       ) -> tuple[UnitReconstruction, ...]:
    """Block reconstruction of the fitted `model` for `config.reconstruct` steps per unit on its
    calibration `batches` (or `config.reconstruct_images` of the same seeded order), each unit
    judged on images of `data` that neither sample took."""
    taken = config.images
    if config.reconstruct_images is not None and config.reconstruct_images != config.images:
        taken = config.reconstruct_images
        batches = calibration_batches(data, taken, config.batch_size, adapter, device, config.seed)
    held_out = held_out_images(data, max(taken, config.images), adapter, device, config.seed, config.batch_size)
    return reconstruct(model, original, batches, steps=config.reconstruct, lr=config.reconstruct_lr,
                       held_out=held_out, seed=config.seed, progress=progress)


def _units(model: nn.Module, groups: list[Group], x: torch.Tensor, compensate: bool) -> list[Group | list[str]]:
    """What a sequential fit visits, in execution order: each group, and (with `compensate`) the
    unshared convolutions and linear layers that run after the first group, refitted so that what
    the groups before them changed reaches the layers after them as little as possible."""
    order: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules() if supports(m)}

    def seen(module: nn.Module, *_: object) -> None:
        order.setdefault(names[module], len(order))

    _probe(model, x[:1], [m.register_forward_pre_hook(seen) for m in names])
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


def _refit_layer(layer: nn.Module, moments: Moments, centred: bool, damp: float
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An unshared layer's weights (and bias, unless a BatchNorm removes it) refitted to reproduce
    its original outputs from the inputs the tied network now gives it, its own weights the prior."""
    groups = getattr(layer, "groups", 1)
    target = blocks(layer.weight, groups)
    if layer.bias is not None and not centred:
        aug_target, cross, gram, _ = _augmented(moments, target, layer.bias)
        solved = shared_fit([aug_target @ cross], [gram], [1.0], aug_target, damp).float()
        return solved[..., :-1].reshape(layer.weight.shape), solved[..., -1].reshape(layer.bias.shape)
    gram, cross, _ = moments.centred() if centred else moments.raw()
    return shared_fit([target @ cross], [gram], [1.0], target, damp).float().reshape(layer.weight.shape), None


def _assign(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    layer.weight.copy_(weight.reshape(layer.weight.shape))
    if bias is not None and layer.bias is not None:
        layer.bias.copy_(bias.reshape(layer.bias.shape))


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
    batches = calibration_batches(data, config.images, config.batch_size, adapter_for(model, data, image_size), dev,
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
