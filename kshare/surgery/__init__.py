"""Surgery: apply a plan (tie, untie), relaxed members, fold. Reads the plan data and kernel
arithmetic; nothing else of planning."""

from kshare.surgery.fold import fold
from kshare.surgery.relax import MemberDelta, is_relaxed, relax_member
from kshare.surgery.tie import apply_plan, forget_plan, plan_of, untie, verify_tied, with_init

__all__ = ["MemberDelta", "apply_plan", "fold", "forget_plan", "is_relaxed", "plan_of", "relax_member", "untie",
           "verify_tied", "with_init"]
