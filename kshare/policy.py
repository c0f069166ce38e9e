"""Policies: how isomorphic conv sites are turned into sharing groups.

A policy string names the scope and an optional split, joined by `+`:

- `all`: every set of isomorphic convolutions in the model shares one kernel (the paper's
  extreme point);
- `stage`: the same, but only within a stage, a run of sites with one output resolution
  (convs on globally pooled tensors, such as squeeze-excitation, stay in their stage but
  group only among themselves: a group never mixes resolutions);
- `chunk:K`: split each group into consecutive runs of at most K members, as even as
  possible (`chunk:4` alone means `all+chunk:4`; `stage+chunk:4` splits stage groups).

Options on top: `match` (`strict` or `shape`, see `kshare.signature`), `include`/`exclude`
globs on module names, `min_size` (smallest group worth forming), `share_bias`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

from kshare.errors import PolicyError
from kshare.graph import ConvSite, Inspection
from kshare.plan import SharingPlan, Unshared, make_plan
from kshare.signature import MATCH_MODES

SCOPES = ("all", "stage")
POLICY_HELP = "all, stage, chunk:K, a combination such as stage+chunk:4, or budget:F"


@dataclass(frozen=True)
class Policy:
    """What to share; `build_plan` decides how."""

    scope: str = "all"
    chunk: int | None = None
    match: str = "strict"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_size: int = 2
    share_bias: bool = True

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise PolicyError(f"unknown policy scope {self.scope!r}: expected {POLICY_HELP}")
        if self.match not in MATCH_MODES:
            raise PolicyError(f"unknown match mode {self.match!r}: expected one of {', '.join(MATCH_MODES)}")
        if self.chunk is not None and self.chunk < 2:
            raise PolicyError(f"chunk size must be at least 2, got {self.chunk}")
        if self.min_size < 2:
            raise PolicyError(f"min_size must be at least 2 (a group of one shares nothing), got {self.min_size}")

    @property
    def name(self) -> str:
        """The policy string that `parse` turns back into this policy's grouping."""
        return self.scope + (f"+chunk:{self.chunk}" if self.chunk else "")

    @classmethod
    def parse(cls, spec: str, **options: object) -> Policy:
        """Read a policy string (see the module docstring); keyword options set the rest."""
        scope, chunk = None, None
        for token in (t.strip() for t in str(spec).split("+")):
            if token in SCOPES and scope is None:
                scope = token
            elif token.startswith("chunk:") and chunk is None:
                value = token.removeprefix("chunk:")
                if not value.isdigit():
                    raise PolicyError(f"bad chunk size in policy {spec!r}: expected chunk:K with an integer K >= 2")
                chunk = int(value)
            else:
                raise PolicyError(f"bad policy {spec!r}: expected {POLICY_HELP}")
        fields = {k: tuple(v) if k in ("include", "exclude") else v for k, v in options.items() if v is not None}
        return cls(scope=scope or "all", chunk=chunk, **fields)  # type: ignore[arg-type]


def _check_globs(flag: str, patterns: Sequence[str], names: Sequence[str]) -> None:
    """A pattern that matches no conv is almost always a typo: say so rather than ignore it."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            example = f" (names look like {names[0]!r})" if names else ""
            raise PolicyError(f"{flag} {pattern!r} matches no convolution{example}")


def _even_chunks(members: list[ConvSite], k: int) -> list[list[ConvSite]]:
    """Consecutive runs of at most k, as even as possible (5 by 4 gives 3+2, not 4+1)."""
    count = math.ceil(len(members) / k)
    base, extra = divmod(len(members), count)
    out, start = [], 0
    for i in range(count):
        size = base + (1 if i < extra else 0)
        out.append(members[start : start + size])
        start += size
    return out


def candidate_sites(inspection: Inspection, policy: Policy) -> tuple[list[ConvSite], list[Unshared]]:
    """The sites a policy may group, and the others with the reason each is left alone."""
    all_names = [s.name for s in inspection.sites] + list(inspection.unused)
    _check_globs("--include", policy.include, all_names)
    _check_globs("--exclude", policy.exclude, all_names)

    unshared: list[Unshared] = [Unshared(n, "never called in the forward pass") for n in inspection.unused]
    candidates: list[ConvSite] = []
    for site in inspection.sites:
        excluded = next((p for p in policy.exclude if fnmatch.fnmatchcase(site.name, p)), None)
        if excluded:
            unshared.append(Unshared(site.name, f"excluded by {excluded!r}"))
        elif policy.include and not any(fnmatch.fnmatchcase(site.name, p) for p in policy.include):
            unshared.append(Unshared(site.name, "not matched by --include"))
        else:
            candidates.append(site)
    return candidates, unshared


def build_plan(inspection: Inspection, policy: Policy | str, source: str | None = None) -> SharingPlan:
    """Group the inspected sites under `policy`; every site not grouped gets a reason."""
    if isinstance(policy, str):
        policy = Policy.parse(policy)
    candidates, unshared = candidate_sites(inspection, policy)
    by_signature: dict[tuple[object, ...], list[ConvSite]] = {}
    for site in candidates:
        by_signature.setdefault(site.signature.key(policy.match), []).append(site)

    groups: list[list[ConvSite]] = []
    for members in by_signature.values():
        if len(members) == 1:
            unshared.append(Unshared(members[0].name, "alone in its signature"))
            continue
        scoped: dict[tuple[object, ...], list[ConvSite]] = {}
        for site in members:
            scope = (site.stage, site.resolution) if policy.scope == "stage" else ()
            scoped.setdefault(scope, []).append(site)
        for stage_members in scoped.values():
            if len(stage_members) == 1:
                unshared.append(Unshared(stage_members[0].name, "alone in its signature within its stage"))
                continue
            parts = _even_chunks(stage_members, policy.chunk) if policy.chunk else [stage_members]
            for part in parts:
                if len(part) < policy.min_size:
                    reason = f"its group of {len(part)} is below min_size {policy.min_size}"
                    unshared.extend(Unshared(site.name, reason) for site in part)
                else:
                    groups.append(part)

    groups.sort(key=lambda g: g[0].order)
    order = {s.name: s.order for s in inspection.sites}
    unshared.sort(key=lambda u: order.get(u.name, len(order)))
    notes = []
    if not groups:
        why = "every convolution is excluded" if not candidates else "see why each convolution is left unshared"
        notes.append(f"policy {policy.name!r} (match={policy.match}) forms no sharing group: {why}")
    return make_plan(
        inspection,
        groups,
        unshared,
        policy=policy.name,
        match=policy.match,
        share_bias=policy.share_bias,
        source=source,
        notes=notes,
    )
