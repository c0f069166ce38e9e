"""Planning: typed sharing configs, one parser, one planner entry point, and the plan data.

Imports analysis (what the convolutions are), models (a model's default input) and kernel
arithmetic; nothing above. `kshare.planning.plan` and `kshare.planning.relaxation` are the
plan data the surgery layer reads.
"""

from kshare.planning.config import (
    POLICY_HELP,
    BudgetConfig,
    Policy,
    PositionalConfig,
    SharingConfig,
    parse_config,
)
from kshare.planning.plan import PLAN_FORMAT, Group, SharingPlan, Totals, Unshared, with_relaxation
from kshare.planning.planner import build_plan, register_planner
from kshare.planning.relaxation import RELAX_HELP, Relaxation

__all__ = ["PLAN_FORMAT", "POLICY_HELP", "RELAX_HELP", "BudgetConfig", "Group", "Policy", "PositionalConfig",
           "Relaxation", "SharingConfig", "SharingPlan", "Totals", "Unshared", "build_plan", "parse_config",
           "register_planner", "with_relaxation"]
