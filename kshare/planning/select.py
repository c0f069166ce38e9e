"""The selection part of every config: which inspected convolutions a planner may group, and
why each of the others is left alone."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from kshare.analysis.inspect import ConvSite, Inspection
from kshare.errors import PolicyError, param
from kshare.planning.config import SharingConfig
from kshare.planning.plan import Unshared


def _check_globs(option: str, patterns: Sequence[str], names: Sequence[str]) -> None:
    """A pattern that matches no conv is almost always a typo: say so rather than ignore it."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            example = f" (names look like {names[0]!r})" if names else ""
            raise PolicyError(f"{param(option)} {pattern!r} matches no convolution{example}")


def candidate_sites(inspection: Inspection, config: SharingConfig) -> tuple[list[ConvSite], list[Unshared]]:
    """The sites a config may group, and the others with the reason each is left alone."""
    all_names = [s.name for s in inspection.sites] + list(inspection.unused)
    _check_globs("include", config.include, all_names)
    _check_globs("exclude", config.exclude, all_names)

    unshared: list[Unshared] = [Unshared(n, "never called in the forward pass") for n in inspection.unused]
    candidates: list[ConvSite] = []
    for site in inspection.sites:
        excluded = next((p for p in config.exclude if fnmatch.fnmatchcase(site.name, p)), None)
        if excluded:
            unshared.append(Unshared(site.name, f"excluded by {excluded!r}"))
        elif config.include and not any(fnmatch.fnmatchcase(site.name, p) for p in config.include):
            unshared.append(Unshared(site.name, "not matched by the include globs"))
        else:
            candidates.append(site)
    return candidates, unshared


def in_execution_order(inspection: Inspection, unshared: list[Unshared]) -> list[Unshared]:
    """The unshared list sorted as the forward pass meets the sites (unused ones last)."""
    order = {s.name: s.order for s in inspection.sites}
    return sorted(unshared, key=lambda u: order.get(u.name, len(order)))
