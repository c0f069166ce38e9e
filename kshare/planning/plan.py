"""`SharingPlan`: which convolutions will share one kernel, and what that saves.

Pure data with a JSON round trip, so a plan can be reviewed, edited, stored next to a
checkpoint and applied later. Savings are computed from the parameters as they are now:
layers that already alias one tensor (a model tied before, or built shared) save nothing more.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from kshare.analysis.inspect import ConvSite, Inspection
from kshare.analysis.signature import MATCH_MODES, Signature, is_conv
from kshare.errors import PlanError

PLAN_FORMAT = "kshare.plan/1"


@dataclass(frozen=True)
class Group:
    """Members (module names, execution order) that will alias one kernel."""

    name: str
    signature: Signature
    members: tuple[str, ...]
    stages: tuple[int, ...]
    params_saved: int
    bytes_saved: int
    init: str = "first"
    error: float | None = None  # relative squared error of sharing the init kernel
    ranks: tuple[int, ...] = ()  # each member's LoRA rank, when a budget plan chose them (lora:auto)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["signature"] = self.signature.to_dict()
        if not self.ranks:
            del data["ranks"]  # plans without per-member ranks keep their old form
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Group:
        return cls(
            name=str(data["name"]),
            signature=Signature.from_dict(data["signature"]),
            members=tuple(data["members"]),
            stages=tuple(data.get("stages", ())),
            params_saved=int(data.get("params_saved", 0)),
            bytes_saved=int(data.get("bytes_saved", 0)),
            init=str(data.get("init", "first")),
            error=float(data["error"]) if data.get("error") is not None else None,
            ranks=tuple(int(r) for r in data.get("ranks", ())),
        )


@dataclass(frozen=True)
class Unshared:
    """A convolution the plan leaves alone, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class Totals:
    """Whole-model storage before and after the plan is applied."""

    params_before: int
    params_after: int
    param_bytes_before: int
    param_bytes_after: int
    conv_params_before: int
    conv_params_after: int
    buffer_bytes: int

    @property
    def ratio(self) -> float:
        """How many times fewer parameters the tied model stores."""
        return self.params_before / self.params_after if self.params_after else float("inf")

    @property
    def conv_ratio(self) -> float:
        return self.conv_params_before / self.conv_params_after if self.conv_params_after else float("inf")

    @property
    def state_bytes_before(self) -> int:
        return self.param_bytes_before + self.buffer_bytes

    @property
    def state_bytes_after(self) -> int:
        return self.param_bytes_after + self.buffer_bytes


@dataclass(frozen=True)
class SharingPlan:
    """The output of a policy: groups, the layers left alone, and the savings."""

    policy: str
    match: str
    share_bias: bool
    groups: tuple[Group, ...]
    unshared: tuple[Unshared, ...]
    totals: Totals
    source: str | None = None
    input_size: tuple[int, ...] = ()
    method: str = ""
    notes: tuple[str, ...] = field(default=())
    relax: str = "none"  # per-member relaxation on top of each shared kernel (kshare.planning.relaxation)
    relax_params: int = 0  # parameters the relaxation adds (already in `totals`)

    @property
    def is_empty(self) -> bool:
        return not self.groups

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "source": self.source,
            "policy": self.policy,
            "match": self.match,
            "share_bias": self.share_bias,
            "input_size": list(self.input_size),
            "method": self.method,
            "groups": [g.to_dict() for g in self.groups],
            "unshared": [asdict(u) for u in self.unshared],
            "totals": asdict(self.totals) | {"ratio": self.totals.ratio},
            "notes": list(self.notes),
            "relax": self.relax,
            "relax_params": self.relax_params,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SharingPlan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a kshare plan: expected a JSON object with format {PLAN_FORMAT!r}")
        try:
            totals = {k: int(v) for k, v in data["totals"].items() if k in Totals.__dataclass_fields__}
            return cls(
                policy=str(data["policy"]),
                match=str(data["match"]),
                share_bias=bool(data["share_bias"]),
                groups=tuple(Group.from_dict(g) for g in data["groups"]),
                unshared=tuple(Unshared(str(u["name"]), str(u["reason"])) for u in data["unshared"]),
                totals=Totals(**totals),
                source=data.get("source"),
                input_size=tuple(data.get("input_size", ())),
                method=str(data.get("method", "")),
                notes=tuple(data.get("notes", ())),
                relax=str(data.get("relax", "none")),
                relax_params=int(data.get("relax_params", 0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"malformed kshare plan: {type(exc).__name__} {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> SharingPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def validate(self, model: nn.Module) -> None:
        """Raise `PlanError` unless every member exists in `model` with the group's signature."""
        if self.match not in MATCH_MODES:
            raise PlanError(f"plan has unknown match mode {self.match!r}")
        modules = dict(model.named_modules())
        seen: dict[str, str] = {}
        for group in self.groups:
            want = group.signature.key(self.match)
            for member in group.members:
                module = modules.get(member)
                if module is None or not is_conv(module):
                    raise PlanError(f"plan group {group.name}: the model has no convolution named {member!r}")
                got = Signature.from_conv(module)
                if got.key(self.match) != want:
                    raise PlanError(
                        f"plan group {group.name}: {member} is {got.describe()}, "
                        f"the group expects {group.signature.describe()}"
                    )
                if member in seen:
                    raise PlanError(f"{member!r} is in both plan groups {seen[member]} and {group.name}")
                seen[member] = group.name


class _Components:
    """Union-find over parameter names: which tensors become one after tying."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, names: Iterable[str]) -> None:
        names = list(names)
        for other in names[1:]:
            self.parent[self.find(other)] = self.find(names[0])


def _tied_params(members: Sequence[ConvSite], share_bias: bool) -> list[list[str]]:
    """The parameter names that become one tensor: all weights, and all biases if shared."""
    sets = [[s.weight_param for s in members]]
    if share_bias and members[0].bias_param is not None:
        sets.append([s.bias_param for s in members if s.bias_param is not None])
    return sets


def _saved(sets: Iterable[Sequence[str]], sizes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """Elements and bytes freed when each set of parameter names collapses to one tensor."""
    params = nbytes = 0
    for names in sets:
        distinct = sorted(set(names))
        numel, itemsize = sizes[distinct[0]]
        params += (len(distinct) - 1) * numel
        nbytes += (len(distinct) - 1) * numel * itemsize
    return params, nbytes


def assemble_plan(
    inspection: Inspection,
    groups: Sequence[Sequence[ConvSite]],
    unshared: Sequence[Unshared],
    *,
    policy: str,
    match: str,
    share_bias: bool,
    source: str | None = None,
    notes: Sequence[str] = (),
) -> SharingPlan:
    """Compute per-group and total savings and assemble the plan."""
    sizes: dict[str, tuple[int, int]] = {}
    for site in inspection.sites:
        sig = site.signature
        sizes[site.weight_param] = (sig.weight_numel, sig.itemsize)
        if site.bias_param is not None:
            sizes[site.bias_param] = (sig.bias_numel, sig.itemsize)

    built: list[Group] = []
    components = _Components()
    for index, members in enumerate(groups):
        sets = _tied_params(members, share_bias)
        for names in sets:
            components.union(names)
        params, nbytes = _saved(sets, sizes)
        built.append(
            Group(
                name=f"g{index}",
                signature=members[0].signature,
                members=tuple(s.name for s in members),
                stages=tuple(sorted({s.stage for s in members})),
                params_saved=params,
                bytes_saved=nbytes,
            )
        )
    by_root: dict[str, list[str]] = {}
    for name in components.parent:
        by_root.setdefault(components.find(name), []).append(name)
    saved, saved_bytes = _saved(by_root.values(), sizes)
    stats = inspection.stats
    totals = Totals(
        params_before=stats.params,
        params_after=stats.params - saved,
        param_bytes_before=stats.param_bytes,
        param_bytes_after=stats.param_bytes - saved_bytes,
        conv_params_before=stats.conv_params,
        conv_params_after=stats.conv_params - saved,  # only conv tensors are tied
        buffer_bytes=stats.buffer_bytes,
    )
    return SharingPlan(
        policy=policy,
        match=match,
        share_bias=share_bias,
        groups=tuple(built),
        unshared=tuple(unshared),
        totals=totals,
        source=source,
        input_size=inspection.input_size,
        method=inspection.method,
        notes=tuple(notes),
    )
