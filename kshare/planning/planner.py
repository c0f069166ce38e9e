"""The one planner entry point: (model or inspection, config) → `SharingPlan`.

Each config type has one planner, registered here (torchao's pattern: a config says *what*,
its registered handler does *how*). A planner takes the model (budget plans read its kernels;
positional plans need only the inspection), the inspection and the config. Every plan leaves
with its relaxation counted in the totals and, when the model is given, a reconstruction error
for every group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import nn

from kshare.analysis.inspect import Inspection, inspect_model
from kshare.errors import PolicyError
from kshare.models.zoo import default_input_size, spec_of
from kshare.planning.budget import Metric, plan_budget
from kshare.planning.config import BudgetConfig, PositionalConfig, SharingConfig, parse_config
from kshare.planning.kernel_error import with_errors
from kshare.planning.plan import SharingPlan, with_relaxation
from kshare.planning.positional import plan_positional

Planner = Callable[[nn.Module | None, Inspection, SharingConfig, str | None, Metric | None], SharingPlan]
C = TypeVar("C", bound=SharingConfig)

_PLANNERS: dict[type[SharingConfig], Planner] = {}


def register_planner(kind: type[C]) -> Callable[[Planner], Planner]:
    """Make the decorated function the planner of configs of type `kind`."""

    def register(planner: Planner) -> Planner:
        _PLANNERS[kind] = planner
        return planner

    return register


@register_planner(PositionalConfig)
def _positional(model: nn.Module | None, inspection: Inspection, config: SharingConfig, source: str | None,
                metric: Metric | None) -> SharingPlan:
    assert isinstance(config, PositionalConfig)
    plan = with_relaxation(plan_positional(inspection, config, source), config.relax)
    return with_errors(model, plan) if model is not None else plan


@register_planner(BudgetConfig)
def _budget(model: nn.Module | None, inspection: Inspection, config: SharingConfig, source: str | None,
            metric: Metric | None) -> SharingPlan:
    assert isinstance(config, BudgetConfig)
    if model is None:
        raise PolicyError(f"{config.name} reads the kernels: plan it from the model, not from an inspection alone")
    plan = plan_budget(model, inspection, config, source, metric)
    if metric is not None:
        plan = dataclasses.replace(plan, notes=(*plan.notes, "kernels grouped (and delta ranks allotted) by their "
                                                              "output error on calibration images"))
    return plan


def build_plan(target: nn.Module | Inspection, config: SharingConfig | str = "all", *,
               inspection: Inspection | None = None, input_size: Sequence[int] | str | None = None,
               method: str = "auto", source: str | None = None, metric: Metric | None = None,
               example_inputs: Any = None, **options: object) -> SharingPlan:
    """Plan `target` (a model, or an `Inspection` for configs that need no weights) under `config`.

    `config` is a `SharingConfig` or a policy string (`parse_config`); keyword `options`
    replace its fields. A model is inspected here (at `input_size`, by default its own) unless
    `inspection` is given. `metric` (each candidate's input Gram and output energy on real
    images, `kshare.fit.order.output_metric`) makes a budget plan group kernels and
    allot delta ranks by output error instead of weight error. `example_inputs` says how a model
    that takes more than one image batch is called (`kshare.analysis.calls`)."""
    config = parse_config(config, **options)
    if isinstance(target, Inspection):
        model, inspection = None, target
    else:
        model = target
        if inspection is None:
            size = input_size if input_size is not None or example_inputs is not None \
                else default_input_size(model, spec_of(model))
            inspection = inspect_model(model, size, method=method, example_inputs=example_inputs)
    planner = next((p for kind, p in _PLANNERS.items() if isinstance(config, kind)), None)
    if planner is None:
        raise PolicyError(f"no planner for {type(config).__name__}: register one with register_planner")
    return planner(model, inspection, config, source, metric)
