"""The one-liners users call: `analyze`, `plan` (analysis never changes the model) and `tie`
(plan, then apply the plan through the surgery layer, or fit it to data first)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kshare.analysis.inspect import Inspection, inspect_model
from kshare.data import ImageSource
from kshare.errors import PlanError, param
from kshare.fit.config import FitConfig
from kshare.kernels import FITTED
from kshare.models.zoo import ModelSpec, default_input_size, load_model, spec_of
from kshare.planning.config import SharingConfig, parse_config
from kshare.planning.kernel_error import with_errors
from kshare.planning.plan import SharingPlan
from kshare.planning.planner import build_plan
from kshare.retrofit import retrofit
from kshare.surgery.tie import apply_plan, plan_of, with_init


@dataclass(frozen=True)
class Analysis:
    """Everything `kshare analyze` shows: the inspected sites and the plan built from them."""

    inspection: Inspection
    plan: SharingPlan
    spec: ModelSpec | None = None


def analyze(
    model: nn.Module | str,
    policy: SharingConfig | str = "all",
    *,
    input_size: Sequence[int] | str | None = None,
    method: str = "auto",
    spec: ModelSpec | None = None,
    metric: Mapping[str, tuple[torch.Tensor, float]] | None = None,
    example_inputs: Any = None,
    **options: object,
) -> Analysis:
    """Inspect `model` (a module, or a name `kshare.models.zoo` resolves) and plan its sharing.

    `policy` is a `SharingConfig` or a policy string (`all`, `stage`, `chunk:K`,
    `stage+chunk:K`, or `budget:F` for a similarity-driven plan keeping at most fraction F of
    the conv parameters); keyword `options` (`match`, `include`, `exclude`, `min_size`,
    `share_bias`, `relax`) replace the config's fields. A relaxation (`relax="lora:4"`) is
    counted in the totals, and in a budget. `spec` records where a module came from (set
    automatically when `model` is a name). `metric` (`kshare.fit.order.output_metric`)
    makes a budget plan group by output error on real images. `example_inputs` (a tensor, a tuple
    of the model's arguments, or a list of images as detection models take) is how the model is
    called, for models whose input is not one image batch; torchvision's detection and
    optical-flow models get theirs by default.
    """
    if isinstance(model, str):
        model, spec = load_model(model)
    spec = spec or spec_of(model)
    size = input_size if input_size is not None or example_inputs is not None else default_input_size(model, spec)
    inspection = inspect_model(model, size, method=method, example_inputs=example_inputs)
    plan = build_plan(model, policy, inspection=inspection, source=spec.ref if spec else None, metric=metric,
                      **options)
    return Analysis(inspection=inspection, plan=plan, spec=spec)


def plan(model: nn.Module | str, policy: SharingConfig | str = "all", **options: object) -> SharingPlan:
    """Shortcut for `analyze(model, policy, **options).plan`."""
    return analyze(model, policy, **options).plan  # type: ignore[arg-type]


def tie(
    model: nn.Module,
    plan: SharingPlan | SharingConfig | str = "all",
    *,
    init: str | None = None,
    input_size: Sequence[int] | str | None = None,
    calib: ImageSource | None = None,
    fit: FitConfig | None = None,
    example_inputs: Any = None,
    **options: object,
) -> nn.Module:
    """Tie `model` in place by a plan (or a policy, planned here) and return it.

    `init` says how each group's shared kernel is computed from the members' current
    kernels: `first` (the first member's, in execution order), `mean` (elementwise mean),
    `medoid` (the member closest to all others) or `norm_mean` (the mean, each output
    channel rescaled to the members' average norm), so a pretrained model keeps what it can.
    With a ready plan and no `init`, each group uses the init the plan records. The plan
    is attached (`plan_of(model)`), each group's reconstruction error computed for the init
    it used; tying a tied model is refused: `untie` first.

    `relax` (`scale`, `lora:R`, `scale+lora:R`, `lora:auto` with a budget; see
    `kshare.planning.relaxation`) gives each member a few parameters of its own on top of the
    shared kernel, fitted to its kernel before tying; the plan's totals count them. With a
    ready plan and no `relax`, the plan's own is used. Other keyword options configure the
    policy (`match`, `include`, `exclude`, `min_size`, `share_bias`).

    `calib` (images; labels are not read) fits each shared kernel, and each relaxation, to what
    the members output on those images instead, then re-estimates BatchNorm statistics there
    (`kshare.retrofit`; `fit` says how): a trained network keeps what it knew. The
    plan then records each group's output error next to its weight error. `example_inputs`:
    how the model is called, as in `analyze`.
    """
    if plan_of(model) is not None:
        raise PlanError("model is already tied by kshare: call kshare.untie(model) before tying it again")
    if calib is not None:
        if init is not None:
            raise PlanError(f"a fit to data computes each shared kernel: give {param('init')} or "
                            f"{param('calib')}, not both")
        relax = options.pop("relax", None)
        retrofit(model, plan, calib, fit=fit or FitConfig(), relax=relax, held_out=0, input_size=input_size,  # type: ignore[arg-type]
                 **options)
        return model
    relax = None
    if isinstance(plan, SharingPlan):
        relax = options.pop("relax", None)
        if options:
            raise PlanError(f"policy options {sorted(options)} apply to a policy, not to a ready plan")
        chosen = plan
    else:
        chosen = analyze(model, parse_config(plan, **options), input_size=input_size,
                         example_inputs=example_inputs).plan
    chosen.validate(model)
    if init is None and any(g.init == FITTED for g in chosen.groups):
        raise PlanError(f"this plan's kernels were fitted to data: pass images as {param('calib')} to fit them "
                        f"again, or name a weight-space {param('init')}")
    chosen = with_errors(model, with_init(chosen, init))
    return apply_plan(model, chosen, relax=relax)  # type: ignore[arg-type]
