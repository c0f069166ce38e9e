"""The closed form: one group's shared kernel (and bias, scales, low-rank deltas) from its
members' input statistics, and an unshared layer refitted to its original outputs.

    W = (Σ a_i W_i C_i)(Σ a_i H_i + λI)⁻¹

with H_i, C_i the member's input statistics (`kshare.fit.statistics`) and a_i each member's
weight: `relative` divides by its output energy, so every member counts by its relative error
(what a following BatchNorm, which renormalises each channel, sees). For a member a BatchNorm
follows directly, the statistics are centred: that BatchNorm removes each channel's mean, so
matching means would spend the fit on nothing. Relaxations are fitted in the same metric:
`scale` per output row by weighted least squares, `lora:R` as the truncated SVD of the residual
in the H-whitened space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kshare.fit.config import FitConfig
from kshare.fit.statistics import Moments
from kshare.kernels import (
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
from kshare.planning.plan import Group
from kshare.planning.relaxation import Relaxation


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


@dataclass
class Fitted:
    weight: torch.Tensor  # (G, O, F) float64
    bias: torch.Tensor | None
    scales: list[torch.Tensor | None]
    loras: list[tuple[torch.Tensor, torch.Tensor] | None]
    report: GroupFit


def fit_group(group: Group, convs: list[nn.Module], moments: dict[str, Moments], centred: set[str],
               relaxation: Relaxation, share_bias: bool, config: FitConfig, measure: bool = True) -> Fitted:
    """One group's shared kernel (and bias, scales, deltas) from its members' statistics. Where
    the outputs need the bias (shared, and no BatchNorm to remove it), kernel and bias are fitted
    together: a constant 1 is appended to every patch. Without `measure`, the report's errors are
    NaN (an intermediate fit nobody reads: its error sums cost as much as the solve)."""
    g = convs[0].groups
    stats = [moments[m].centred() if m in centred else moments[m].raw() for m in group.members]
    grams, pulls, energies = [s[0] for s in stats], [s[1] for s in stats], [s[2] for s in stats]
    targets = [blocks(c.weight, g) for c in convs]
    has_bias = share_bias and all(c.bias is not None for c in convs)
    fit_bias = has_bias and not any(m in centred for m in group.members)
    mean = torch.stack(targets).mean(0)
    if fit_bias:
        aug = [augmented(moments[m], t, c.bias) for m, t, c in zip(group.members, targets, convs, strict=True)]
        full_pulls, full_grams = [a[1] for a in aug], [a[2] for a in aug]
        energies = [a[3] for a in aug]
        mean_bias = torch.stack([c.bias.detach().float() for c in convs]).mean(0).reshape(g, -1, 1)
        prior = torch.cat([mean, mean_bias], -1)
    else:
        full_pulls, full_grams, prior = pulls, grams, mean  # W_i C_i: the fit and its errors
    weights = [1.0 / max(e, 1e-30) if config.weighting == "relative" else 1.0 for e in energies]
    solved = shared_fit(full_pulls, full_grams, weights, prior, config.damp).float()
    if fit_bias:
        kernel, bias = solved[..., :-1], solved[..., -1].reshape(-1)
    else:
        kernel = solved
        bias = torch.stack([c.bias.detach().float() for c in convs]).mean(0) if has_bias else None
    before = sum(w * output_error(prior, p, h, e)
                 for w, p, h, e in zip(weights, full_pulls, full_grams, energies, strict=True)) if measure else math.nan
    scales: list[torch.Tensor | None] = []
    loras: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    after = 0.0
    ranks = group.ranks_under(relaxation)
    for i, (t, p, h, rank) in enumerate(zip(targets, pulls, grams, ranks, strict=True)):
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
        if measure:
            after += weights[i] * output_error(member, full_pulls[i], full_grams[i], energies[i])
    total = sum(w * e for w, e in zip(weights, energies, strict=True))
    weight_error = math.nan
    if measure:
        flat = [c.weight.detach().double().flatten() for c in convs]
        weight_error = sum(float((kernel.double().flatten() - f).square().sum()) for f in flat) / max(
            sum(float(f.square().sum()) for f in flat), 1e-30)
    else:
        after = math.nan
    report = GroupFit(group.name, len(convs), before / max(total, 1e-30), after / max(total, 1e-30), weight_error)
    return Fitted(kernel, bias, scales, loras, report)


def augmented(m: Moments, target: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor, float]:
    """Target, pull, gram and output energy with a constant input 1 appended to every patch, so a
    bias is fitted with the kernel (per conv group: the bias of group g's rows sees its own 1)."""
    gram, pull, energy = m.raw()
    g, f = gram.shape[0], gram.shape[1]
    total = m.total.float()
    big_gram = torch.zeros(g, f + 1, f + 1, dtype=gram.dtype, device=gram.device)
    big_gram[:, :f, :f], big_gram[:, :f, f], big_gram[:, f, :f], big_gram[:, f, f] = gram, total, total, m.rows
    b = bias.detach().float().reshape(g, -1, 1).to(target.device)
    outputs = m.energy_total if m.energy_total is not None else torch.zeros(b.shape[:2], dtype=torch.float64,
                                                                                     device=b.device)
    outputs = outputs.reshape(b.shape[:2])  # Σ W x, per output row
    # [W b] times the cross sums with a 1 appended: W Σ x x̃ᵀ + b Σ x̃ᵀ, and Σ W x + b once per patch
    big_pull = torch.cat([pull + b * total[:, None, :], outputs.float()[..., None] + m.rows * b], -1)
    # ‖W x + b‖² summed: the energy, twice b against Σ W x, and every row's b² once per patch
    energy += 2 * float((b[..., 0].double() * outputs).sum()) + m.rows * float(b.square().sum())
    return torch.cat([target, b], -1), big_pull, big_gram, energy


def effective(fitted: Fitted, index: int, shape: torch.Size) -> torch.Tensor:
    """Member `index`'s kernel as the tied model will compute it (shared, scaled, plus delta)."""
    kernel = fitted.weight
    scale = fitted.scales[index]
    if scale is not None:
        kernel = scale.reshape(kernel.shape[:2])[..., None] * kernel
    lora = fitted.loras[index]
    if lora is not None:
        kernel = kernel + (lora[0] @ lora[1]).reshape(kernel.shape)
    return kernel.reshape(shape)


REFIT_ROWS_PER_INPUT = 4  # samples per input feature below which a refit learns the images, not the layer


def well_posed(moments: Moments) -> bool:
    """Whether `moments` hold enough samples to refit a layer from them: at least
    `REFIT_ROWS_PER_INPUT` per input feature. A classifier with 1,280 inputs, refitted on 560
    images (one sample each), reproduces those images and moves every other output."""
    return moments.rows >= REFIT_ROWS_PER_INPUT * moments.gram.shape[-1]


def refit_layer(layer: nn.Module, moments: Moments, centred: bool, damp: float
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An unshared layer's weights (and bias, unless a BatchNorm removes it) refitted to reproduce
    its original outputs from the inputs the tied network now gives it, its own weights the prior."""
    groups = getattr(layer, "groups", 1)
    target = blocks(layer.weight, groups)
    if layer.bias is not None and not centred:
        aug_target, pull, gram, _ = augmented(moments, target, layer.bias)
        solved = shared_fit([pull], [gram], [1.0], aug_target, damp).float()
        return solved[..., :-1].reshape(layer.weight.shape), solved[..., -1].reshape(layer.bias.shape)
    gram, pull, _ = moments.centred() if centred else moments.raw()
    return shared_fit([pull], [gram], [1.0], target, damp).float().reshape(layer.weight.shape), None


def assign(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    layer.weight.copy_(weight.reshape(layer.weight.shape))
    if bias is not None and layer.bias is not None:
        layer.bias.copy_(bias.reshape(layer.bias.shape))
