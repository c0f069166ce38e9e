"""Positional planning: groups decided by where convolutions sit (`all`, `stage`, `chunk:K`).

Isomorphic candidates (same signature key under the config's `match`) form one group, or one
per stage under `stage`; `chunk` splits each into consecutive runs of at most K members.
"""

from __future__ import annotations

import math

from kshare.analysis.inspect import ConvSite, Inspection
from kshare.planning.config import PositionalConfig
from kshare.planning.plan import SharingPlan, Unshared, assemble_plan
from kshare.planning.select import candidate_sites, in_execution_order


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


def plan_positional(inspection: Inspection, config: PositionalConfig, source: str | None = None) -> SharingPlan:
    """Group the inspected sites by position; every site not grouped gets a reason."""
    candidates, unshared = candidate_sites(inspection, config)
    by_signature: dict[tuple[object, ...], list[ConvSite]] = {}
    for site in candidates:
        by_signature.setdefault(site.signature.key(config.match), []).append(site)

    groups: list[list[ConvSite]] = []
    for members in by_signature.values():
        if len(members) == 1:
            unshared.append(Unshared(members[0].name, "alone in its signature"))
            continue
        scoped: dict[tuple[object, ...], list[ConvSite]] = {}
        for site in members:
            scope = (site.stage, site.resolution) if config.scope == "stage" else ()
            scoped.setdefault(scope, []).append(site)
        for stage_members in scoped.values():
            if len(stage_members) == 1:
                unshared.append(Unshared(stage_members[0].name, "alone in its signature within its stage"))
                continue
            parts = _even_chunks(stage_members, config.chunk) if config.chunk else [stage_members]
            for part in parts:
                if len(part) < config.min_size:
                    reason = f"its group of {len(part)} is below min_size {config.min_size}"
                    unshared.extend(Unshared(site.name, reason) for site in part)
                else:
                    groups.append(part)

    groups.sort(key=lambda g: g[0].order)
    unshared = in_execution_order(inspection, unshared)
    notes = []
    if not groups:
        why = "every convolution is excluded" if not candidates else "see why each convolution is left unshared"
        notes.append(f"policy {config.name!r} (match={config.match}) forms no sharing group: {why}")
    return assemble_plan(
        inspection,
        groups,
        unshared,
        policy=config.name,
        match=config.match,
        share_bias=config.share_bias,
        source=source,
        notes=notes,
    )
