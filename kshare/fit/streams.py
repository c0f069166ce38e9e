"""The sequential fit's two streams, the untied original and its partially tied copy, kept at
the cut before the unit being fitted, so that no pass starts from the input again.

A unit's statistics pass runs both networks from their activations at the last cut before the
unit's first member (`kshare.fit.segments`). Before the next unit, both streams are pushed once
through the segment between the two cuts, the copy with the unit just fitted: everything before
a cut is final by then, since units go in network order. The copy's BatchNorm layers normalise
by each batch's own statistics on that push, as they do in the statistics passes, so the cached
fit reads what the uncached one reads (to the last bit in float32; float16 caches round).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import fx, nn

from kshare.analysis.inspect import analysis_mode
from kshare.fit.batchnorm import batch_norms
from kshare.fit.cache import ActivationCache, CacheFolder, Storage, choose_storage
from kshare.fit.segments import Segments
from kshare.progress import ProgressFn, report

log = logging.getLogger(__name__)


class _Inputs:
    """The batches themselves: the streams at the input cut."""

    def __init__(self, batches: Sequence[torch.Tensor]) -> None:
        self.batches = batches

    def get(self, index: int) -> torch.Tensor:
        return self.batches[index]

    peek = pop = get  # the batches stay: they are the caller's

    def drop(self) -> None:
        pass


@contextmanager
def _streaming(nets: Sequence[nn.Module], batch_statistics: nn.Module | None) -> Iterator[None]:
    """`nets` in eval mode while a stream moves, the BatchNorm layers of `batch_statistics` (the
    copy, where asked) normalising by each batch's statistics; every train flag restored after."""
    modes = [(m, m.training) for net in nets for m in net.modules()]
    for net in nets:
        net.eval()
    if batch_statistics is not None:
        for norm in batch_norms(batch_statistics):
            norm.train()
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag


class PairedStreams:
    """Both streams at one cut; `forward` runs a batch from there (for `collect`), `reach`
    moves both to a later cut."""

    def __init__(self, source: nn.Module, work: nn.Module, batches: Sequence[torch.Tensor], segments: Segments,
                 folder: CacheFolder, progress: ProgressFn | None, follow_source: bool = True) -> None:
        self.source, self.work, self.batches, self.segments = source, work, batches, segments
        self.follow_source = follow_source  # False: the statistics read the source's outputs, read once
        self.folder, self.progress = folder, progress
        self.cut = segments.input_cut
        self.caches: dict[int, ActivationCache | _Inputs] = {id(source): _Inputs(batches), id(work): _Inputs(batches)}
        self.batch_statistics = False
        self.pending: tuple[int, ActivationCache | _Inputs] | None = None  # the copy, at a cut of its own

    def _restart_work(self) -> None:
        """From the first unit on, the copy's BatchNorm layers normalise by batch statistics, before
        the first cut too: its stream starts again from the input, once."""
        if self.cut > self.segments.input_cut:
            self.caches[id(self.work)].drop()
            self.pending = (self.segments.input_cut, _Inputs(self.batches))

    def forward(self, net: nn.Module, index: int) -> None:
        self.segments.run(net, self.cut, self.caches[id(net)].get(index), None)

    @torch.no_grad()
    def reach(self, names: Sequence[str], batch_statistics: bool, task: str) -> None:
        """Move both streams to the last cut before the first of the modules `names` runs; the
        copy's BatchNorm layers normalise by batch statistics on the way where `batch_statistics`."""
        cut = self.segments.cut_before(min(self.segments.position(n) for n in names))
        if batch_statistics and not self.batch_statistics:  # the copy's cache was made with running statistics
            self._restart_work()
        self.batch_statistics = batch_statistics
        if cut <= self.cut and not self.pending:
            return
        nets = (self.source, self.work) if self.follow_source else (self.work,)
        with _streaming(nets, self.work if batch_statistics else None):
            moved = {id(net): self.folder.cache() for net in nets}
            starts = {id(net): (self.cut, self.caches[id(net)]) for net in nets}
            if self.pending is not None:
                starts[id(self.work)] = self.pending
            for index in range(len(self.batches)):
                for net in nets:
                    begin, cache = starts[id(net)]
                    moved[id(net)].put(index, self.segments.run(net, begin, cache.get(index), cut))
                report(self.progress, task, index + 1, len(self.batches))
        for _, cache in starts.values():
            cache.drop()
        self.caches, self.cut, self.pending = dict(moved), cut, None


@contextmanager
def paired_streams(source: nn.Module, work: nn.Module, batches: Sequence[torch.Tensor], units: Sequence[Sequence[str]],
                   budget: int, progress: ProgressFn | None = None, follow_source: bool = True
                   ) -> Iterator[PairedStreams | None]:
    """Streams cached at the cuts before each of `units` (module names), within `budget` bytes,
    or None where `source` does not trace (each pass then starts from the input). Without
    `follow_source`, only the copy's stream moves (the statistics read the source's outputs)."""
    segments = Segments.trace(source, batches[0])
    if segments is None or any(n not in segments.positions for names in units for n in names):
        yield None
        return
    positions = [min(segments.position(n) for n in names) for names in units]
    storage = _storage(segments, source, batches, positions, budget)
    with CacheFolder(storage) as folder:
        yield PairedStreams(source, work, batches, segments, folder, progress, follow_source)


def _storage(segments: Segments, source: nn.Module, batches: Sequence[torch.Tensor], positions: Sequence[int],
             budget: int) -> Storage:
    """The storage of the largest cache the fit will keep, measured on one image; said in the log."""
    start = time.perf_counter()
    cuts = sorted({segments.cut_before(p) for p in positions} - {segments.input_cut})
    images = sum(len(b) for b in batches)
    largest = 0
    with analysis_mode(source):
        for cut in cuts:
            value = segments.run(source, segments.input_cut, batches[0][:1], cut)
            largest = max(largest, value.numel() * 4 * images)
    storage = choose_storage(largest, budget)
    log.info(f"sequential fit: activations kept at {len(cuts)} cuts, the largest {largest / 2**20:,.0f} MiB per "
             f"stream for {images:,} images in float32; kept {storage.describe()} (budget {budget / 2**30:.1f} GiB; "
             f"measured in {time.perf_counter() - start:.1f} s)")
    return storage


class SteppedStream:
    """The copy's stream standing at a node of its graph, every value live there kept per batch
    (not only at cuts): a member's statistics read its input where the stream stands, and the
    stream then moves on through that member with the kernel just fitted. So the progressive fit
    runs the copy through the network once (its untied targets read once beforehand), instead of
    re-running each block from its cut for every member inside it."""

    def __init__(self, work: nn.Module, batches: Sequence[torch.Tensor], segments: Segments, folder: CacheFolder,
                 progress: ProgressFn | None) -> None:
        self.work, self.batches, self.segments, self.folder, self.progress = work, batches, segments, folder, progress
        self.batch_statistics = False
        self._start()

    def _start(self) -> None:
        self.position = self.segments.input_cut
        self.states: dict[fx.Node, ActivationCache | _Inputs] = {
            self.segments.carried[self.position]: _Inputs(self.batches)}

    def input_of(self, name: str, index: int) -> torch.Tensor:
        """Batch `index` of the value module `name` reads, the stream standing just before it (read only)."""
        node = self.segments.nodes[self.segments.position(name)]
        return self.states[node.args[0]].peek(index)  # type: ignore[index]

    @torch.no_grad()
    def reach(self, name: str, batch_statistics: bool, task: str) -> None:
        """Move the stream to just before module `name` runs; the copy's BatchNorm layers
        normalise by batch statistics on the way where `batch_statistics` (switched on, the
        stream starts again from the input, as the copy's layers before here ran otherwise)."""
        if batch_statistics and not self.batch_statistics:
            for cache in self.states.values():
                cache.drop()
            self._start()
        self.batch_statistics = batch_statistics
        target = self.segments.position(name)
        if target <= self.position:
            return
        with _streaming((self.work,), self.work if batch_statistics else None):
            moved = {n: self.folder.cache() for n in self.segments.live_at(target)}
            for index in range(len(self.batches)):
                values = {n: cache.pop(index) for n, cache in self.states.items()}
                for n, value in self.segments.step(self.work, values, self.position, target).items():
                    moved[n].put(index, value, owned=True)
                report(self.progress, task, index + 1, len(self.batches))
        for cache in self.states.values():
            cache.drop()
        self.states, self.position = dict(moved), target


@contextmanager
def stepped_stream(work: nn.Module, batches: Sequence[torch.Tensor], steps: Sequence[str], budget: int,
                   progress: ProgressFn | None = None) -> Iterator[SteppedStream | None]:
    """The copy's `SteppedStream` for visiting the modules `steps` in order, within `budget` bytes;
    None where the network does not trace, a module runs at more than one node of its graph (a
    shared head), or the steps are not in the graph's order."""
    segments = Segments.trace(work, batches[0])
    if segments is None or any(n not in segments.positions for n in steps):
        yield None
        return
    calls = [str(n.target) for n in segments.nodes if n.op == "call_module"]
    places = [segments.position(n) for n in steps]
    if any(calls.count(n) > 1 for n in steps) or places != sorted(places) or \
            any(not isinstance(segments.nodes[p].args[0], fx.Node) for p in places):
        yield None
        return
    start = time.perf_counter()
    largest, state, position = 0, {segments.carried[segments.input_cut]: batches[0][:1]}, segments.input_cut
    with analysis_mode(work):  # eval mode: one image through BatchNorm in training mode is refused
        for place in places:  # the values live before each step, for one image
            state = segments.step(work, state, position, place) if place > position else state
            position = place
            largest = max(largest, sum(v.numel() * 4 for v in state.values() if isinstance(v, torch.Tensor)))
    images = sum(len(b) for b in batches)
    storage = choose_storage(largest * images, budget, live=2)
    log.info(f"progressive fit: the copy's stream moves through the network once, the values live before each "
             f"step kept, at most {largest * images / 2**20:,.0f} MiB for {images:,} images in float32; kept "
             f"{storage.describe()} (budget {budget / 2**30:.1f} GiB; measured in {time.perf_counter() - start:.1f} s)")
    with CacheFolder(storage) as folder:
        yield SteppedStream(work, batches, segments, folder, progress)
