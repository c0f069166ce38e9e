"""Sharing configs: *what* to share, as typed data. One parser reads every string the CLI and
the Python API accept; `kshare.planning.planner.build_plan` decides *how*.

Every config holds the same selection part (which convolutions may share) and a relaxation;
each subclass adds what its planner needs:

- `PositionalConfig`: groups by position. `scope` is `all` (every set of isomorphic
  convolutions shares one kernel: the paper's extreme point) or `stage` (the same, but only
  within a run of sites with one output resolution; convs on globally pooled tensors, such as
  squeeze-excitation, stay in their stage but group only among themselves). `chunk` splits
  each group into consecutive runs of at most K members, as even as possible.
- `BudgetConfig`: keeps at most `fraction` of the conv parameters, grouping the kernels that
  are most alike.

Strings: `all`, `stage`, `chunk:K` (= `all+chunk:K`), `stage+chunk:K`, `budget:F`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from kshare.analysis.signature import MATCH_MODES
from kshare.errors import PolicyError
from kshare.planning.relaxation import Relaxation

SCOPES = ("all", "stage")
POLICY_HELP = "all, stage, chunk:K, a combination such as stage+chunk:4, or budget:F"
SELECTION_FIELDS = ("match", "include", "exclude", "min_size", "share_bias")


@dataclass(frozen=True, kw_only=True)
class SharingConfig:
    """The part every config shares: which convolutions may be grouped, and the relaxation.

    `match`: `strict` (all conv settings equal) or `shape` (weight shape only, the paper's
    notion); `include`/`exclude`: globs on module names; `min_size`: the smallest group worth
    forming; `share_bias`: share biases along with kernels; `relax`: per-member parameters on
    top of each shared kernel (a `Relaxation` or its string, e.g. `lora:4`).
    """

    match: str = "strict"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_size: int = 2
    share_bias: bool = True
    relax: Relaxation = Relaxation()  # noqa: RUF009 (frozen: one shared default is safe)

    def __post_init__(self) -> None:
        # accept lists and strings where tuples and a Relaxation are meant, as a user would pass them
        for name in ("include", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        object.__setattr__(self, "relax", Relaxation.parse(self.relax))  # type: ignore[arg-type]
        if self.match not in MATCH_MODES:
            raise PolicyError(f"unknown match mode {self.match!r}: expected one of {', '.join(MATCH_MODES)}")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 2:
            raise PolicyError(f"min_size must be at least 2 (a group of one shares nothing), got {self.min_size}")

    @property
    def name(self) -> str:
        """The policy string `parse_config` turns back into this config's grouping."""
        raise NotImplementedError

    def with_options(self, **options: object) -> SharingConfig:
        """A copy with the given fields replaced (None leaves a field as it is)."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise PolicyError(f"unknown sharing option(s) {', '.join(unknown)} for {type(self).__name__}: "
                              f"expected some of {', '.join(sorted(fields))}")
        return dataclasses.replace(self, **{k: v for k, v in options.items() if v is not None})

    @property
    def selection(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in SELECTION_FIELDS}


@dataclass(frozen=True, kw_only=True)
class PositionalConfig(SharingConfig):
    """Groups by position alone: `scope` `all` or `stage`, optionally split into chunks of `chunk`."""

    scope: str = "all"
    chunk: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in SCOPES:
            raise PolicyError(f"unknown policy scope {self.scope!r}: expected {POLICY_HELP}")
        if self.chunk is not None and (isinstance(self.chunk, bool) or not isinstance(self.chunk, int)
                                       or self.chunk < 2):
            raise PolicyError(f"chunk size must be at least 2 (a whole number), got {self.chunk!r}")

    @property
    def name(self) -> str:
        return self.scope + (f"+chunk:{self.chunk}" if self.chunk else "")


@dataclass(frozen=True, kw_only=True)
class BudgetConfig(SharingConfig):
    """Keep at most `fraction` of the conv parameters (0 < F <= 1), losing the least."""

    fraction: float

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                or not math.isfinite(self.fraction) or not 0.0 < self.fraction <= 1.0:
            raise PolicyError(f"budget must be in (0, 1], got {self.fraction!r}")

    @property
    def name(self) -> str:
        return f"budget:{self.fraction:g}"


Policy = PositionalConfig  # the name of kshare 0.1's positional config, kept for its users

_COUNT = re.compile(r"[0-9]+", flags=re.ASCII)
_FRACTION = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?", flags=re.ASCII)


def _tokens(spec: str) -> Iterable[str]:
    return (t.strip() for t in spec.split("+"))


def parse_config(spec: str | SharingConfig, **options: object) -> SharingConfig:
    """The config a policy string (see the module docstring) or a config names; keyword options
    (`match`, `include`, `exclude`, `min_size`, `share_bias`, `relax`) replace its fields."""
    if isinstance(spec, SharingConfig):
        return spec.with_options(**options)
    if not isinstance(spec, str):
        raise PolicyError(f"a policy is a string or a SharingConfig, not {type(spec).__name__}")
    scope, chunk, fraction = None, None, None
    for token in _tokens(spec):
        if token in SCOPES and scope is None and fraction is None:
            scope = token
        elif token.startswith("chunk:") and chunk is None and fraction is None:
            value = token.removeprefix("chunk:")
            if not _COUNT.fullmatch(value):
                raise PolicyError(f"bad chunk size in policy {spec!r}: expected chunk:K with an integer K >= 2")
            chunk = int(value)
        elif token.startswith("budget:") and fraction is None and scope is None and chunk is None:
            value = token.removeprefix("budget:")
            if not _FRACTION.fullmatch(value):
                raise PolicyError(f"bad budget in {spec!r}: expected budget:F with 0 < F <= 1")
            fraction = float(value)
        else:
            raise PolicyError(f"bad policy {spec!r}: expected {POLICY_HELP}")
    chosen = {k: v for k, v in options.items() if v is not None}
    if fraction is not None:
        return BudgetConfig(fraction=fraction).with_options(**chosen)
    return PositionalConfig(scope=scope or "all", chunk=chunk).with_options(**chosen)
