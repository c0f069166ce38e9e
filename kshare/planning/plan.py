"""`SharingPlan`: which convolutions will share one kernel, and what that saves.

Pure data with a JSON round trip, so a plan can be reviewed, edited, stored next to a
checkpoint and applied later. Savings are computed from the parameters as they are now:
layers that already alias one tensor (a model tied before, or built shared) save nothing more.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from kshare._checks import Reader, is_int, items
from kshare.analysis.inspect import ConvSite, Inspection
from kshare.analysis.signature import MATCH_MODES, Signature, is_conv
from kshare.errors import PlanError
from kshare.kernels import FITTED, INITS, fan_in
from kshare.planning.relaxation import Relaxation

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
    output_error: float | None = None  # relative error of the members' outputs on calibration data (a data fit)

    def ranks_under(self, relaxation: Relaxation) -> tuple[int, ...]:
        """Each member's LoRA rank under `relaxation` (a budget plan's own under `lora:auto`)."""
        return relaxation.member_ranks(self.signature.weight_shape, len(self.members), self.ranks, self.name)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["signature"] = self.signature.to_dict()
        if not self.ranks:
            del data["ranks"]  # plans without per-member ranks keep their old form
        if self.output_error is None:
            del data["output_error"]  # so do plans not fitted to data
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan group") -> Group:
        """Read a group from JSON, every field checked (see `SharingPlan.from_dict`)."""
        r = Reader(data, where, PlanError)
        where = f"plan group {r.str('name')}"
        r.where = where
        signature = Signature.from_dict(r.data.get("signature"), f"{where}: signature", PlanError)
        members = tuple(r.list("members", items("a module name", lambda v: isinstance(v, str) and v != "",
                                                 PlanError), low=2))
        if len(set(members)) != len(members):
            raise PlanError(f"{where} names a member twice")
        width = min(signature.weight_shape[0], fan_in(signature.weight_shape))
        ranks = tuple(r.list("ranks", items(f"a rank from 0 to {width}", lambda v: is_int(v) and 0 <= v <= width,
                                            PlanError), default=[]))
        if ranks and len(ranks) != len(members):
            raise PlanError(f"{where} records {len(ranks)} delta ranks for {len(members)} members")
        return cls(
            name=r.str("name"),
            signature=signature,
            members=members,
            stages=tuple(r.list("stages", items("a stage number", lambda v: is_int(v) and v >= 0, PlanError),
                                default=[])),
            params_saved=r.int("params_saved", 0),
            bytes_saved=r.int("bytes_saved", 0),
            init=r.str("init", "first", choices=(*INITS, FITTED)),
            output_error=r.float("output_error", None, low=0.0),
            error=r.float("error", None, low=0.0),
            ranks=ranks,
        )


@dataclass(frozen=True)
class Unshared:
    """A convolution the plan leaves alone, and why."""

    name: str
    reason: str


def _unshared(data: Any, where: str) -> Unshared:
    r = Reader(data, where, PlanError)
    return Unshared(r.str("name"), r.str("reason"))


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
    def from_dict(cls, data: Any) -> SharingPlan:
        """Read a plan from JSON and check all of it: every field's kind and range, each group
        (at least two members, a member in one group only and not also left unshared, ranks
        that fit the kernel), and the relaxation. What only a model can say (do the members
        exist, with the group's signature?) is `validate(model)`'s job."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a kshare plan: expected a JSON object with format {PLAN_FORMAT!r}")
        r = Reader(data, "malformed kshare plan", PlanError)
        groups = tuple(r.list("groups", Group.from_dict))
        unshared = tuple(r.list("unshared", _unshared))
        seen: dict[str, str] = {}
        for group in groups:
            for member in group.members:
                if member in seen:
                    raise PlanError(f"{member!r} is in both plan groups {seen[member]} and {group.name}")
                seen[member] = group.name
        if len({g.name for g in groups}) != len(groups):
            raise PlanError("malformed kshare plan: two groups have one name")
        if both := [u.name for u in unshared if u.name in seen]:
            raise PlanError(f"malformed kshare plan: {both[0]!r} is both in a group and left unshared")
        t = r.mapping("totals")
        totals = Totals(**{k: t.int(k) for k in Totals.__dataclass_fields__})
        try:
            relax = Relaxation.parse(r.str("relax", "none")).name
        except PlanError as exc:
            raise PlanError(f"malformed kshare plan: {exc}") from None
        return cls(
            policy=r.str("policy"),
            match=r.str("match", choices=MATCH_MODES),
            share_bias=r.bool("share_bias"),
            groups=groups,
            unshared=unshared,
            totals=totals,
            source=r.str("source", None),
            input_size=tuple(r.list("input_size", items("a positive size", lambda v: is_int(v) and v > 0, PlanError),
                                    default=[], high=4)),
            method=r.str("method", ""),
            notes=tuple(r.list("notes", items("a string", lambda v: isinstance(v, str), PlanError), default=[])),
            relax=relax,
            relax_params=r.int("relax_params", 0),
        )

    @classmethod
    def from_json(cls, text: str) -> SharingPlan:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise PlanError(f"plan is not valid JSON: {first[:200]}") from None
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


def with_relaxation(plan: SharingPlan, relaxation: Relaxation) -> SharingPlan:
    """`plan` counting `relaxation` (and no other) in its totals: the one place these figures move.

    Per-member ranks stay in the groups only under `lora:auto`, the relaxation they were chosen for."""
    extra = sum(relaxation.params_per_member(g.signature.weight_shape, rank)
                for g in plan.groups for rank in g.ranks_under(relaxation))
    groups = plan.groups if relaxation.auto else tuple(dataclasses.replace(g, ranks=()) for g in plan.groups)
    change = extra - plan.relax_params
    if change == 0 and plan.relax == relaxation.name and groups == plan.groups:
        return plan
    itemsize = plan.groups[0].signature.itemsize if plan.groups else 0
    t = plan.totals
    totals = dataclasses.replace(
        t, params_after=t.params_after + change, param_bytes_after=t.param_bytes_after + change * itemsize,
        conv_params_after=t.conv_params_after + change)
    return dataclasses.replace(plan, relax=relaxation.name, relax_params=extra, groups=groups, totals=totals)


def without_groups(plan: SharingPlan, names: Iterable[str], reason: str = "left untied") -> SharingPlan:
    """`plan` with the groups `names` left untied: their members join `unshared` (with `reason`),
    and the totals give back what those groups saved and drop their relaxation's parameters.
    Groups are disjoint, so what one saved is its own `params_saved`."""
    drop = set(names)
    unknown = drop - {g.name for g in plan.groups}
    if unknown:
        raise PlanError(f"the plan has no group {sorted(unknown)[0]!r}")
    relaxation = Relaxation.parse(plan.relax)
    gone = [g for g in plan.groups if g.name in drop]
    params = sum(g.params_saved for g in gone)
    nbytes = sum(g.bytes_saved for g in gone)
    extra = sum(relaxation.params_per_member(g.signature.weight_shape, rank)
                for g in gone for rank in g.ranks_under(relaxation))
    itemsize = gone[0].signature.itemsize if gone else 0
    t = plan.totals
    totals = dataclasses.replace(
        t, params_after=t.params_after + params - extra, conv_params_after=t.conv_params_after + params - extra,
        param_bytes_after=t.param_bytes_after + nbytes - extra * itemsize)
    unshared = plan.unshared + tuple(Unshared(m, reason) for g in gone for m in g.members)
    return dataclasses.replace(plan, groups=tuple(g for g in plan.groups if g.name not in drop), unshared=unshared,
                               totals=totals, relax_params=plan.relax_params - extra)
