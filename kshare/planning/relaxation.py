"""`Relaxation`: which per-member parameters a plan puts on top of each shared kernel, and
what they cost. Plan data (a plan records its relaxation by name, and
`kshare.planning.plan.with_relaxation` counts it); the mechanism that applies one lives in
`kshare.surgery.relax`.

- `scale`: one factor per output channel, `W_m = s_m ⊙ W` (per slice of the kernel's first
  dimension: for a transposed convolution, whose kernel is in × out/groups × k, that is per
  input channel);
- `lora:R`: a rank-R delta, `W_m = W + A_m B_m` (A: out × R, B: R × in·k·k);
- `scale+lora:R`: both;
- `lora:auto` (and `scale+lora:auto`): a budget plan gives each member its own rank, spending
  what the budget leaves after the shared kernels where it removes the most error.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from kshare.errors import PlanError
from kshare.kernels import fan_in

RELAX_HELP = "none, scale, lora:R, scale+lora:R, or lora:auto / scale+lora:auto with a budget plan"


@dataclass(frozen=True)
class Relaxation:
    """Which per-member parameters sit on top of a shared kernel."""

    scale: bool = False
    rank: int = 0
    auto: bool = False  # ranks per member, chosen by a budget plan (`Group.ranks`)

    @classmethod
    def parse(cls, spec: str | Relaxation | None) -> Relaxation:
        if isinstance(spec, Relaxation):
            return spec
        if spec in (None, "", "none"):
            return cls()
        scale, rank, auto = False, 0, False
        for token in str(spec).split("+"):
            if token == "scale" and not scale:
                scale = True
            elif token == "lora:auto" and not (rank or auto):
                auto = True
            elif (m := re.fullmatch(r"lora:([0-9]+)", token, flags=re.ASCII)) and not (rank or auto):
                rank = int(m.group(1))
                if rank < 1:
                    raise PlanError(f"lora rank must be at least 1 in {spec!r}")
            else:
                raise PlanError(f"bad relaxation {spec!r}: expected {RELAX_HELP}")
        return cls(scale, rank, auto)

    @property
    def name(self) -> str:
        lora = "lora:auto" if self.auto else f"lora:{self.rank}" if self.rank else ""
        return "+".join(p for p in ("scale" if self.scale else "", lora) if p) or "none"

    @property
    def active(self) -> bool:
        return self.scale or self.rank > 0 or self.auto

    def rank_for(self, weight_shape: Sequence[int]) -> int:
        """The rank a member of this shape gets: no more than its kernel matrix has."""
        return min(self.rank, weight_shape[0], fan_in(weight_shape))

    def params_per_member(self, weight_shape: Sequence[int], rank: int | None = None) -> int:
        """Parameters one member adds; `rank` overrides the relaxation's (a `lora:auto` member's own)."""
        out, width = weight_shape[0], fan_in(weight_shape)
        rank = self.rank_for(weight_shape) if rank is None else rank
        return (out if self.scale else 0) + rank * (out + width)

    def member_ranks(self, weight_shape: Sequence[int], members: int, ranks: Sequence[int] = (),
                     group: str = "") -> tuple[int, ...]:
        """The LoRA rank of each of a group's `members` under this relaxation; `ranks`: the
        ones a budget plan chose for the group (what `lora:auto` uses)."""
        if not self.auto:
            return (self.rank_for(weight_shape),) * members
        if len(ranks) != members:
            raise PlanError(f"{self.name} takes its ranks from a budget plan (policy budget:F), and plan group "
                            f"{group} records none: plan with a budget, or name a rank (lora:R)")
        return tuple(ranks)
