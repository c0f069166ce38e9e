"""The public Python calls: `analyze` and `plan` (analysis never changes the model)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from kshare.budget import budget_plan, parse_budget
from kshare.graph import Inspection, inspect_model
from kshare.plan import SharingPlan
from kshare.policy import Policy, build_plan
from kshare.relax import Relaxation, with_relaxation
from kshare.zoo import ModelSpec, default_input_size, load_model, spec_of


@dataclass(frozen=True)
class Analysis:
    """Everything `kshare analyze` shows: the inspected sites and the plan built from them."""

    inspection: Inspection
    plan: SharingPlan
    spec: ModelSpec | None = None


def analyze(
    model: nn.Module | str,
    policy: Policy | str = "all",
    *,
    match: str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    min_size: int | None = None,
    share_bias: bool | None = None,
    input_size: Sequence[int] | str | None = None,
    method: str = "auto",
    spec: ModelSpec | None = None,
    relax: str | None = None,
) -> Analysis:
    """Inspect `model` (a module, or a name `kshare.zoo` resolves) and plan its sharing.

    `policy` is a `Policy` or a policy string (`all`, `stage`, `chunk:K`, `stage+chunk:K`, or
    `budget:F` for a similarity-driven plan keeping at most fraction F of the conv parameters);
    keyword options override the matching fields of the policy. `spec` records where a
    module came from (set automatically when `model` is a name). `relax` (`scale`, `lora:R`)
    counts a relaxation's per-member parameters in the totals, and in a budget.
    """
    relaxation = Relaxation.parse(relax)
    if isinstance(model, str):
        model, spec = load_model(model)
    spec = spec or spec_of(model)
    options = {
        "match": match, "include": include, "exclude": exclude,
        "min_size": min_size, "share_bias": share_bias,
    }
    budget = parse_budget(policy) if isinstance(policy, str) else None
    if isinstance(policy, Policy):
        policy = Policy.parse(policy.name, **({k: getattr(policy, k) for k in options} | _set(options)))
    else:
        policy = Policy.parse("all" if budget is not None else policy, **_set(options))
    size = input_size if input_size is not None else default_input_size(model, spec)
    inspection = inspect_model(model, size, method=method)
    source = spec.ref if spec else None
    if budget is not None:
        plan = budget_plan(model, inspection, budget, policy, source=source, relaxation=relaxation)
    else:
        plan = with_relaxation(build_plan(inspection, policy, source=source), relaxation)
    return Analysis(inspection=inspection, plan=plan, spec=spec)


def _set(options: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in options.items() if v is not None}


def plan(model: nn.Module | str, policy: Policy | str = "all", **options: object) -> SharingPlan:
    """Shortcut for `analyze(model, policy, **options).plan`."""
    return analyze(model, policy, **options).plan  # type: ignore[arg-type]
