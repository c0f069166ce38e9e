"""Budget-driven plans: keep at most a fraction of the conv parameters, losing the least.

`all`, `stage` and `chunk:K` decide the groups by position alone. For a trained model the
kernels themselves say which layers can share with the least damage. `budget_plan` clusters
each set of isomorphic kernels bottom-up (Ward's criterion: the merge that adds the least
squared reconstruction error per parameter saved goes first, across all sets) until the
model's conv parameters fit the budget. Each group's shared kernel is the members' mean,
the centre that minimises that error, and the plan records each group's relative error.
Data-free: only the weights are read.

With `lora:auto` the budget is split between shared kernels and per-member low-rank deltas:
for each way of spending it on kernels, what is left buys delta ranks greedily (the singular
value that removes the most squared error per parameter first), and the split that leaves
the least total error wins. Members whose residuals hold more error get higher ranks; one
its group's kernel fits closely may get none.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Mapping

import torch
from torch import nn

from kshare.analysis.inspect import ConvSite, Inspection
from kshare.errors import PlanError
from kshare.kernels import fit_residual, whitened_spectrum
from kshare.planning.config import BudgetConfig, PositionalConfig, SharingConfig
from kshare.planning.kernel_error import kernel_norm, kernel_vector, output_vectors, with_errors
from kshare.planning.plan import Group, SharingPlan, Unshared, assemble_plan, with_relaxation
from kshare.planning.positional import plan_positional
from kshare.planning.relaxation import Relaxation
from kshare.planning.select import candidate_sites, in_execution_order

Partition = dict[tuple[object, ...], list[int]]  # signature key → a cluster label per site of that class


def _merge_cost(total_a: torch.Tensor, n_a: int, total_b: torch.Tensor, n_b: int, size: int) -> float:
    """Ward's criterion: the squared error merging two clusters adds, per parameter it saves."""
    diff = total_a / n_a - total_b / n_b
    return n_a * n_b / (n_a + n_b) * float(diff.square().sum()) / size


def _pair_heap(classes: dict[tuple[object, ...], torch.Tensor], sizes: dict[tuple[object, ...], int]
               ) -> list[tuple[float, tuple[object, ...], tuple[object, ...]]]:
    """Every first merge, cheapest on top: the same for every budget, so a search computes it once."""
    heap = [(_merge_cost(x[i], 1, x[j], 1, sizes[k]), (k, i), (k, j)) for k, x in classes.items()
            for i in range(len(x)) for j in range(i + 1, len(x))]
    heapq.heapify(heap)
    return heap


def _ward(classes: dict[tuple[object, ...], torch.Tensor], sizes: dict[tuple[object, ...], int], excess: float,
          first: list[tuple[float, tuple[object, ...], tuple[object, ...]]] | None = None) -> Partition:
    """Agglomerate greedily (least added squared error per parameter saved, across classes)
    until `excess` parameters are saved or nothing is left to merge. `first`: `_pair_heap`'s
    result, when the caller keeps it."""
    labels = {key: list(range(len(x))) for key, x in classes.items()}
    members = {(key, i): [i] for key, x in classes.items() for i in range(len(x))}
    totals = {(key, i): x[i] for key, x in classes.items() for i in range(len(x))}  # never written in place
    heap = list(first) if first is not None else _pair_heap(classes, sizes)
    fresh = {k: len(x) for k, x in classes.items()}
    while excess > 0 and heap:
        _, a, b = heapq.heappop(heap)
        if a not in members or b not in members:
            continue  # stale: one side was merged already
        key = a[0]
        new = (key, fresh[key])
        fresh[key] += 1
        members[new], totals[new] = members.pop(a) + members.pop(b), totals.pop(a) + totals.pop(b)
        excess -= sizes[key]
        for other in [c for c in members if c[0] == key and c != new]:
            cost = _merge_cost(totals[new], len(members[new]), totals[other], len(members[other]), sizes[key])
            heapq.heappush(heap, (cost, new, other))
    for (key, _), idx in members.items():
        for i in idx:
            labels[key][i] = idx[0]
    return labels


def _lloyd(x: torch.Tensor, labels: list[int], rounds: int = 50) -> list[int]:
    """k-means refinement with the number of clusters fixed: never raises the squared error."""
    ids = sorted(set(labels))
    current = torch.tensor([ids.index(label) for label in labels])
    for _ in range(rounds):
        centres = torch.stack([_members(x, current, c).mean(0) for c in range(len(ids))])
        proposed = torch.cdist(x, centres).argmin(1)
        if torch.equal(proposed, current) or len(set(proposed.tolist())) < len(ids):
            break  # converged, or a cluster would empty (its count is what the budget paid for)
        current = proposed
    return current.tolist()


def _members(x: torch.Tensor, labels: torch.Tensor, cluster: int) -> torch.Tensor:
    """The rows of one cluster; a lone member is sliced, not masked (most clusters of a plan are
    lone kernels, and masking copies a pass over every row)."""
    index = (labels == cluster).nonzero().flatten()
    return x[int(index[0])].unsqueeze(0) if len(index) == 1 else x[index]


def _sse(x: torch.Tensor, labels: list[int]) -> float:
    lab = torch.tensor(labels)
    lowest = min(labels)  # partitions label lone kernels with negative numbers
    sizes = torch.bincount(lab - lowest).tolist()
    total = 0.0
    for c in set(labels):
        if sizes[c - lowest] > 1:  # a lone member is its own centre: no error
            members = _members(x, lab, c)
            total += float((members - members.mean(0)).square().sum())
    return total


Metric = Mapping[str, tuple[torch.Tensor, float]]  # site → (its inputs' Gram H, G × F × F; its output energy)


def plan_budget(model: nn.Module, inspection: Inspection, config: BudgetConfig, source: str | None = None,
                metric: Metric | None = None) -> SharingPlan:
    """The planner of `BudgetConfig`: `budget_plan` at the config's fraction and relaxation."""
    return budget_plan(model, inspection, config.fraction, config, source=source, relaxation=config.relax,
                       metric=metric)


def budget_plan(model: nn.Module, inspection: Inspection, fraction: float, policy: SharingConfig,
                source: str | None = None, relaxation: Relaxation | None = None,
                metric: Metric | None = None) -> SharingPlan:
    """Group isomorphic kernels by similarity until conv parameters are at most `fraction` of now.

    `policy` gives the selection (match, include/exclude, bias sharing; its own relaxation is
    ignored: `relaxation` is the one counted). A relaxation's per-member parameters count
    against the budget too: the kernel budget is searched (bisection) for the plan that,
    relaxed, stores the most without exceeding it.
    """
    relaxation = relaxation or Relaxation()
    search = _KernelSearch(model, inspection, policy, metric)
    if not relaxation.active:
        return search.plan(fraction, source)
    if relaxation.auto:
        return _RankAllocation(search, relaxation).plan(fraction, source)
    conv = inspection.stats.conv_params
    target = fraction * conv * (1 + 1e-9)
    lo, hi, best = 0.0, fraction, None  # relaxing only adds: the kernels alone get at most `fraction`
    while (hi - lo) * conv >= 0.5:
        mid = (lo + hi) / 2
        try:
            plan = with_relaxation(search.plan(max(mid, 1e-9), source, errors=False), relaxation)
        except PlanError:  # below the floor: no plan shares that much
            lo = mid
            continue
        if plan.totals.conv_params_after <= target:
            best, lo = plan, mid
        else:
            hi = mid
    if best is None:
        raise PlanError(f"budget {fraction:g} is out of reach with relaxation {relaxation.name}: even sharing every "
                        "isomorphic kernel, the per-member parameters exceed it")
    return with_errors(model, dataclasses.replace(best, policy=f"budget:{fraction:g}"))


class _KernelSearch:
    """The plan whose shared kernels (no relaxation) fit a fraction of the conv parameters.

    Candidates: the greedy Ward clustering, and every positional plan (`all`, `stage`,
    `chunk:K`, `stage+chunk:K`) that fits the budget; each is refined by k-means with its
    cluster counts fixed, and the one with the least squared error wins. So the result never
    reconstructs worse than a positional policy of the same size. Everything but the Ward
    clustering is the same for every budget: computed once, so a bisection over budgets
    repeats only the clustering.
    """

    def __init__(self, model: nn.Module, inspection: Inspection, policy: SharingConfig,
                 metric: Metric | None = None) -> None:
        self.model, self.inspection, self.policy, self.metric = model, inspection, policy, metric
        modules = dict(model.named_modules())
        self.candidates, self.unshared = candidate_sites(inspection, policy)
        if len({s.weight_param for s in self.candidates}) != len(self.candidates):
            raise PlanError("a budget plan needs every convolution to hold its own kernel, and this model already "
                            "shares some: plan it untied (kshare.untie) or use a positional policy")
        self.sites: dict[tuple[object, ...], list[ConvSite]] = {}
        for site in self.candidates:
            self.sites.setdefault(site.signature.key(policy.match), []).append(site)
        self.classes = {k: torch.stack([kernel_vector(modules[s.name], policy.share_bias) for s in v])
                        for k, v in self.sites.items()}
        self.sizes = {k: int(x.shape[1]) for k, x in self.classes.items()}  # parameters per member
        if metric is not None:  # cluster by output error: kernels seen through their inputs
            missing = [s.name for s in self.candidates if s.name not in metric]
            if missing:
                raise PlanError(f"output statistics lack {missing[0]!r}: collect them for every candidate")
            self.classes = {k: output_vectors([modules[s.name].weight for s in v], [metric[s.name] for s in v])
                            for k, v in self.sites.items()}
        self.before = inspection.stats.conv_params
        self.in_classes = sum(len(x) * self.sizes[k] for k, x in self.classes.items())
        self._first_merges = _pair_heap(self.classes, self.sizes)
        self._positional: list[Partition] | None = None
        self._refinements: dict[int, tuple[Partition, float]] = {}  # by index into the positional partitions

    def params(self, p: Partition) -> int:
        return self.before - self.in_classes + sum(len(set(p[k])) * self.sizes[k] for k in p)

    def _refined(self, p: Partition) -> tuple[Partition, float]:
        """Its k-means refinement, and that refinement's squared error."""
        refined = {k: _lloyd(self.classes[k], p[k]) for k in p}
        return refined, sum(_sse(self.classes[k], refined[k]) for k in refined)

    def positional(self) -> list[Partition]:
        if self._positional is None:
            selection = self.policy.selection | {"min_size": 2}
            self._positional = [
                _partition(plan_positional(self.inspection, PositionalConfig(scope=scope, chunk=chunk, **selection)),
                           self.sites)
                for scope in ("all", "stage")
                for chunk in (None, *range(2, max(len(v) for v in self.sites.values()) if self.sites else 2))]
        return self._positional

    def _positional_refined(self, index: int) -> tuple[Partition, float]:
        if index not in self._refinements:
            self._refinements[index] = self._refined(self.positional()[index])
        return self._refinements[index]

    def plan(self, fraction: float, source: str | None, errors: bool = True) -> SharingPlan:
        """`errors`: fill in each group's reconstruction error (a bisection needs only the sizes)."""
        target = fraction * self.before * (1 + 1e-9)  # a fraction printed from a count must admit that count
        ward = _ward(self.classes, self.sizes, self.before - target, self._first_merges)
        options = [ward, *self.positional()]
        feasible = [i for i, p in enumerate(options) if self.params(p) <= target]
        if not feasible:
            smallest = min(self.params(p) for p in options)
            raise PlanError(f"budget {fraction:g} is out of reach: sharing every isomorphic kernel keeps "
                            f"{smallest / self.before:.3f} of the conv parameters")
        feasible_refined = [self._refined(ward) if i == 0 else self._positional_refined(i - 1) for i in feasible]
        best = min(feasible_refined, key=lambda r: r[1])[0]
        groups = []
        for key, labels in best.items():
            for label in sorted(set(labels)):
                members = [s for s, lab in zip(self.sites[key], labels, strict=True) if lab == label]
                if len(members) > 1:
                    groups.append(sorted(members, key=lambda s: s.order))
        groups.sort(key=lambda g: g[0].order)
        grouped = {s.name for g in groups for s in g}
        unshared = self.unshared + [Unshared(s.name, "kept on its own: the budget is met without it")
                                    for s in self.candidates if s.name not in grouped]
        unshared = in_execution_order(self.inspection, unshared)
        plan = assemble_plan(self.inspection, groups, unshared, policy=f"budget:{fraction:g}", match=self.policy.match,
                         share_bias=self.policy.share_bias, source=source)
        plan = dataclasses.replace(plan, groups=tuple(dataclasses.replace(g, init="mean") for g in plan.groups))
        return with_errors(self.model, plan) if errors else plan


@dataclasses.dataclass(frozen=True)
class _Spectrum:
    """What a member's delta can buy: the squared singular values of its residual, and their price."""

    cost: int  # parameters per unit of rank: out + fan-in
    gains: tuple[float, ...]  # squared error each further rank removes, largest first
    residual: float  # squared error with no delta (bias residual included)


class _RankAllocation:
    """A budget plan under `lora:auto`: kernel groups and per-member delta ranks, least error."""

    def __init__(self, search: _KernelSearch, relaxation: Relaxation, steps: int = 24) -> None:
        self.search, self.relaxation, self.steps = search, relaxation, steps
        self.modules = dict(search.model.named_modules())
        self.norm = kernel_norm(self.modules, search.inspection, search.policy.share_bias) if search.metric is None \
            else float(sum(x.square().sum() for x in search.classes.values()))
        self._spectra: dict[tuple[str, ...], list[_Spectrum]] = {}

    def spectra(self, group: Group) -> list[_Spectrum]:
        if group.members not in self._spectra:
            convs = [self.modules[m] for m in group.members]
            shared = torch.stack([c.weight.detach().double() for c in convs]).mean(0)
            biases = [c.bias.detach().double() for c in convs if c.bias is not None]
            bias_mean = torch.stack(biases).mean(0) if self.search.policy.share_bias and len(biases) == len(convs) \
                else None
            found = []
            metric = self.search.metric
            for name, conv in zip(group.members, convs, strict=True):
                _, residual = fit_residual(shared, conv.weight, self.relaxation.scale)
                if metric is not None and conv.groups == 1:  # what each further rank removes of the output error
                    gram, energy = metric[name]
                    gains = whitened_spectrum(residual[None], gram / max(energy, 1e-30)).tolist()
                    found.append(_Spectrum(sum(residual.shape), tuple(gains), sum(gains)))
                    continue
                bias_sse = float((conv.bias.detach().double() - bias_mean).square().sum()) \
                    if bias_mean is not None and metric is None else 0.0
                gains = torch.linalg.svdvals(residual).square().tolist()
                found.append(_Spectrum(sum(residual.shape), tuple(gains),
                                       float(residual.square().sum()) + bias_sse))
            self._spectra[group.members] = found
        return self._spectra[group.members]

    def allocate(self, plan: SharingPlan, room: float) -> tuple[SharingPlan, float]:
        """Spend `room` parameters on ranks, most error removed per parameter first; the plan with
        each group's ranks, and the squared error left."""
        members = [(gi, spec) for gi, g in enumerate(plan.groups) for spec in self.spectra(g)]
        ranks = [0] * len(members)
        left = sum(spec.residual for _, spec in members)
        heap = [(-spec.gains[0] / spec.cost, i) for i, (_, spec) in enumerate(members) if spec.gains]
        heapq.heapify(heap)
        while heap:
            _, i = heapq.heappop(heap)
            spec = members[i][1]
            if spec.cost > room:
                continue  # every further rank of this member costs the same: none fits
            left -= spec.gains[ranks[i]]
            ranks[i] += 1
            room -= spec.cost
            if ranks[i] < len(spec.gains):
                heapq.heappush(heap, (-spec.gains[ranks[i]] / spec.cost, i))
        per_group: list[list[int]] = [[] for _ in plan.groups]
        for (gi, _), rank in zip(members, ranks, strict=True):
            per_group[gi].append(rank)
        groups = tuple(dataclasses.replace(g, ranks=tuple(r)) for g, r in zip(plan.groups, per_group, strict=True))
        return with_relaxation(dataclasses.replace(plan, groups=groups), self.relaxation), max(left, 0.0)

    def plan(self, fraction: float, source: str | None) -> SharingPlan:
        search = self.search
        target = fraction * search.before * (1 + 1e-9)
        floor = min(search.params(p) for p in search.positional()) / search.before
        best: tuple[float, SharingPlan] | None = None
        seen: set[tuple[tuple[str, ...], ...]] = set()
        for step in range(self.steps + 1):  # kernel budgets from the most sharing to `fraction`
            kernels = floor + (fraction - floor) * step / self.steps
            try:
                plan = search.plan(max(kernels, 1e-9), source, errors=False)
            except PlanError:
                continue
            key = tuple(g.members for g in plan.groups)
            if key in seen:
                continue
            seen.add(key)
            unranked = with_relaxation(plan, dataclasses.replace(self.relaxation, auto=False))  # scales only
            room = target - unranked.totals.conv_params_after
            if room < 0:
                continue
            relaxed, error = self.allocate(plan, room)
            if best is None or error < best[0]:
                best = (error, relaxed)
        if best is None:
            search.plan(fraction, source, errors=False)  # raises, saying how far, if the kernels alone cannot fit
            raise PlanError(f"budget {fraction:g} is out of reach with relaxation {self.relaxation.name}: even "
                            "sharing every isomorphic kernel, the per-member scales exceed it")
        error, plan = best
        given = [r for g in plan.groups for r in g.ranks if r]
        spent = (f"{len(given)} of {sum(len(g.members) for g in plan.groups)} members get a delta of rank "
                 f"{min(given)} to {max(given)}" if given else "no member gets a delta (kernels remove more error)")
        note = (f"{self.relaxation.name}: {spent}; relative reconstruction error after the deltas "
                f"{error / max(self.norm, 1e-30):.4f}")
        plan = dataclasses.replace(plan, policy=f"budget:{fraction:g}", notes=(*plan.notes, note))
        return with_errors(search.model, plan)


def _partition(plan: SharingPlan, sites: dict[tuple[object, ...], list[ConvSite]]) -> Partition:
    """A plan's groups as cluster labels per signature class (ungrouped sites: their own cluster)."""
    group_of = {m: i for i, g in enumerate(plan.groups) for m in g.members}
    return {k: [group_of.get(s.name, -1 - i) for i, s in enumerate(v)] for k, v in sites.items()}


