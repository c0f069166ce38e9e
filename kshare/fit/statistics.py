"""Calibration statistics: what each convolution sees on real inputs, as streamed sums.

For a member conv, `X` holds its input patches (one column per output position sampled): the
unfolded window of its input, per conv group (a depthwise conv's "patch" is one channel's
window). A pass over calibration images accumulates, per member, H = Σ x xᵀ (G × F × F), the
patch sum Σ x and the row count; with a paired pass of a second network on the same images and
positions (the untied original next to the partially tied copy), also the pull P = W Σ x x̃ᵀ
(G × O × F: the original member's outputs against the inputs it now sees, all a least-squares fit
reads of the cross sums) and the energy ‖W X‖² of the original's outputs. P is summed as
(W x) x̃ᵀ where a conv has fewer outputs than inputs (3x3 convs: a ninth of the multiply-adds of
Σ x x̃ᵀ), else as Σ x x̃ᵀ and multiplied by W once at the end. Memory stays bounded: at most
`positions` output positions per image and layer are sampled, and only the sums are kept
(float32 like GPTQ's, with the patch sums and energies in float64).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kshare.data import Adapter, ImageData
from kshare.errors import DataError
from kshare.fit.batchnorm import batch_norms
from kshare.kernels import blocks
from kshare.progress import ProgressFn, report

log = logging.getLogger(__name__)


def supports(layer: nn.Module) -> bool:
    """Whether a data fit can read this layer's inputs: 1-D and 2-D convolutions (not transposed),
    and linear layers (a conv whose patch is the feature vector)."""
    return isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)) and \
        not isinstance(layer, nn.modules.conv._ConvTransposeNd)


def _pairs(value: Any) -> tuple[int, int]:
    return (1, int(value[0])) if len(value) == 1 else (int(value[0]), int(value[1]))


def _padding(conv: nn.Module) -> tuple[int, int, int, int]:
    """How the conv pads its input: (left, right, top, bottom); `same` worked out."""
    kh, kw = _pairs(conv.kernel_size)
    dh, dw = _pairs(conv.dilation)
    if conv.padding == "same":
        total = (dh * (kh - 1), dw * (kw - 1))
        return total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2
    if conv.padding == "valid":
        return 0, 0, 0, 0
    ph, pw = (0, int(conv.padding[0])) if len(conv.padding) == 1 else _pairs(conv.padding)
    return pw, pw, ph, ph


def _padded(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input padded as the conv pads it (zeros, or its padding mode)."""
    pad = _padding(conv)
    if not any(pad):
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pad, mode=mode)


def patches(conv: nn.Module, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The input windows `conv` reads, as (G, F, N·P) float32: group, fan-in, one column per
    image and sampled output position (`positions`: flat output indices; None: all of them).
    Gathered at the sampled positions only, so a large feature map is never unfolded (nor, with
    zero padding, padded) whole: the window elements are picked by flat index, those in the
    padding masked to zero; from a channels-last map a pick is one contiguous row of channels.
    A linear layer's patches are its input vectors."""
    if isinstance(conv, nn.Linear):
        rows = x.reshape(-1, x.shape[-1]).float()
        return (rows if positions is None else rows[positions]).T[None]
    if x.ndim == 3:  # Conv1d: a 2-D input of height 1
        x = x.unsqueeze(2)
    x = x.float()
    if conv.padding_mode == "zeros":
        left, right, top, bottom = _padding(conv)
    else:
        x, left, right, top, bottom = _padded(conv, x), 0, 0, 0, 0
    n, c, h, w = x.shape
    kh, kw = _pairs(conv.kernel_size)
    sh, sw = _pairs(conv.stride)
    dh, dw = _pairs(conv.dilation)
    out_h = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    if positions is None:
        positions = torch.arange(out_h * out_w, device=x.device)
    p = len(positions)
    oy, ox = positions // out_w, positions % out_w
    ys = (oy[:, None, None] * sh + torch.arange(kh, device=x.device)[None, :, None] * dh - top).expand(p, kh, kw)
    xs = (ox[:, None, None] * sw + torch.arange(kw, device=x.device)[None, None, :] * dw - left).expand(p, kh, kw)
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    flat = (ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1)).reshape(-1)
    g = conv.groups
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() and g == 1:
        picked = x.permute(0, 2, 3, 1).reshape(n, h * w, c).index_select(1, flat).reshape(n, p, kh, kw, c)
        if not bool(inside.all()):
            picked = picked * inside[None, ..., None]
        return picked.reshape(n, p, kh, kw, g, c // g).permute(4, 5, 2, 3, 0, 1).reshape(g, (c // g) * kh * kw, -1)
    picked = x.reshape(n, c, h * w).index_select(2, flat).reshape(n, c, p, kh, kw)
    if not bool(inside.all()):
        picked = picked * inside[None, None]
    return picked.permute(1, 3, 4, 0, 2).reshape(g, (c // g) * kh * kw, -1)


def output_positions(conv: nn.Module, x: torch.Tensor) -> int:
    """How many output positions `conv` computes per image on input `x` (a linear layer: in all)."""
    if isinstance(conv, nn.Linear):
        return x.numel() // x.shape[-1]
    size = x.shape[2:] if x.ndim == 4 else (1, x.shape[-1])
    h, w = _padded(conv, torch.empty(1, 1, *size, device="meta")).shape[2:]
    kh, kw = _pairs(conv.kernel_size)
    sh, sw = _pairs(conv.stride)
    dh, dw = _pairs(conv.dilation)
    return ((h - dh * (kh - 1) - 1) // sh + 1) * ((w - dw * (kw - 1) - 1) // sw + 1)


GRAM_BLOCK = 512  # rows per block of a large Gram: skips most of its lower half, still fast GEMMs


def add_gram(gram: torch.Tensor, p: torch.Tensor) -> None:
    """gram += p pᵀ per conv group (G, F, R). A Gram is symmetric, so a large one is computed by
    blocks of rows on and above the diagonal and mirrored: about 0.56 of the multiply-adds at
    F = 4,608 (resnet50's 3x3 convs of 512 channels), where the sums cost as much as the forward."""
    f = p.shape[1]
    if f < 2 * GRAM_BLOCK:
        gram.baddbmm_(p, p.transpose(1, 2))
        return
    for i in range(0, f, GRAM_BLOCK):
        gram[:, i : i + GRAM_BLOCK, i:].baddbmm_(p[:, i : i + GRAM_BLOCK], p[:, i:].transpose(1, 2))
    for i in range(GRAM_BLOCK, f, GRAM_BLOCK):  # the lower blocks from the upper ones
        gram[:, i : i + GRAM_BLOCK, :i] = gram[:, :i, i : i + GRAM_BLOCK].transpose(1, 2)


@dataclass
class Moments:
    """Sums over a member's calibration patches (see the module docstring)."""

    gram: torch.Tensor  # Σ x̃ x̃ᵀ: (G, F, F), the inputs the member sees in the network being fitted
    total: torch.Tensor  # Σ x̃: (G, F)
    rows: int = 0
    pull: torch.Tensor | None = None  # W Σ x x̃ᵀ: (G, O, F), the original outputs against those inputs
    energy: float = 0.0  # ‖W_i X‖²: the original member's output energy on its own inputs
    energy_total: torch.Tensor | None = None  # Σ W_i x (per output row), to centre the energy and the pull
    cross: torch.Tensor | None = None  # Σ x x̃ᵀ while it is summed (wide convs), until `finish` makes it the pull

    def finish(self, weight: torch.Tensor) -> None:
        """The pull from the cross sums (or, with no second network, from the Gram), by the
        original member's `weight` blocks (G, O, F)."""
        if self.pull is None:
            self.pull = weight @ (self.gram if self.cross is None else self.cross)
        self.cross = None

    def centred(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(gram, pull, energy) about the means: what a following BatchNorm, which removes each
        channel's mean, lets matter."""
        mean = (self.total / max(self.rows, 1)).float()
        gram = self.gram - self.rows * mean[:, :, None] * mean[:, None, :]
        assert self.pull is not None and self.energy_total is not None, "moments read before they were finished"
        outputs = self.energy_total.reshape(self.pull.shape[:2]).float()  # Σ W x, per output row
        pull = self.pull - outputs[:, :, None] * mean[:, None, :]
        energy = self.energy - float(self.energy_total.square().sum()) / max(self.rows, 1)
        return gram, pull, energy

    def raw(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        assert self.pull is not None, "moments read before they were finished"
        return self.gram, self.pull, self.energy


@dataclass
class _Collector:
    """Hooks that sample each watched conv's input patches on every batch."""

    names: dict[nn.Module, str]
    positions: int
    seed: int
    batch: int = 0
    seen: dict[str, torch.Tensor] = field(default_factory=dict)  # patches of the batch, by member
    stop_after: set[str] = field(default_factory=set)
    done: set[str] = field(default_factory=set)

    def start(self, index: int) -> None:
        """Begin batch `index`: its positions drawn by that index, no watched conv seen yet."""
        self.batch, self.done = index, set()

    @contextmanager
    def watching(self, model: nn.Module, keep: Any) -> Iterator[None]:
        """While the block runs, `keep(name, conv, patches)` hears of every watched conv's input."""
        modules = {m: n for n, m in model.named_modules() if n in set(self.names.values())}

        def hook(conv: nn.Module, inputs: tuple[Any, ...]) -> None:
            name = modules[conv]
            keep(name, conv, self.sample_named(conv, name, inputs[0]))
            self.done.add(name)
            if self.stop_after and self.stop_after <= self.done:
                raise _Enough

        handles = [m.register_forward_pre_hook(hook) for m in modules]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def sample_named(self, conv: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
        count = output_positions(conv, x)
        chosen = None
        if count > self.positions * (x.shape[0] if isinstance(conv, nn.Linear) else 1):
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + _stable(name) * 97 + self.batch) % (2**63))
            keep = self.positions * (x.shape[0] if isinstance(conv, nn.Linear) else 1)
            chosen = torch.randperm(count, generator=gen)[:keep].to(x.device)
        return patches(conv, x, chosen)


class _Enough(Exception):
    """Raised by a hook once every watched conv has seen the batch: the rest of the forward is skipped."""


def _stable(name: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(name))


def fit_batches(data: ImageData, images: int, batch_size: int, adapter: Adapter, device: torch.device,
                        seed: int = 0) -> list[torch.Tensor]:
    """The fit images as adapted batches on `device`: a seeded sample of `images` (class-
    balanced when labelled). Asking for more images than the data holds is an error, not a shrug."""
    if images > len(data.labels):
        raise DataError(f"{data.name} holds {len(data.labels):,} images; {images:,} fit images asked for")
    sample = data.subset(images, seed=seed) if images < len(data.labels) else data
    return [_fast_layout(adapter(sample.images[i : i + batch_size].to(device)))
            for i in range(0, len(sample.labels), batch_size)]


def _fast_layout(x: torch.Tensor) -> torch.Tensor:
    """Image batches channels-last on the CPU: its convolutions run 1.07x (ConvMixer) to 1.4x
    (MobileNet, EfficientNet) faster so, and a resnet50 fit 1.15x; the model is left as it is.
    (On a GPU the layout stays until it is measured there.)"""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 and x.device.type == "cpu" else x


@torch.no_grad()
def collect(model: nn.Module, members: Sequence[str], batches: Sequence[torch.Tensor], *,
            source: nn.Module | None = None, positions: int = 64, seed: int = 0, recalibrate: bool = False,
            progress: ProgressFn | None = None, task: str = "statistics",
            forward: Callable[[nn.Module, int], None] | None = None,
            given: SourceOutputs | None = None) -> dict[str, Moments]:
    """Moments of `members`' inputs in `model` over `batches` (eval mode, no gradient).

    With `source` (the untied original), each batch also runs through it first, at the same
    sampled positions, for the cross sums and the original outputs' energy. The forward stops
    once every member has seen the batch. `recalibrate`: the same pass re-estimates `model`'s
    BatchNorm statistics up to the members (their layers normalise each batch by its own
    statistics meanwhile, which at calibration batch sizes match what they accumulate).
    `forward(net, index)` runs batch `index` through `net` (default: `batches[index]` from the
    input; the cached sequential fit runs it from its activations at a cut instead). `given`: the
    source's outputs at these batches and positions, read once (`source_outputs`): then `source`
    is not run, only its weights read."""
    def run(net: nn.Module, index: int) -> None:
        try:
            if forward is not None:
                forward(net, index)
            else:
                net(batches[index])
        except _Enough:  # every member has seen the batch
            pass

    convs = dict(model.named_modules())
    originals = dict(source.named_modules()) if source is not None else convs
    found: dict[str, Moments] = {}
    collector = _Collector({convs[n]: n for n in members}, positions, seed, stop_after=set(members))
    source_collector = _Collector({originals[n]: n for n in members}, positions, seed, stop_after=set(members)) \
        if source is not None and given is None else None  # given: the source's outputs were read once
    nets = [net for net in (model, source) if net is not None]
    modes = [(m, m.training) for net in nets for m in net.modules()]
    for net in nets:
        net.eval()
    norms = [(m, m.momentum) for m in batch_norms(model)] if recalibrate else []
    for norm, _ in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
        norm.train()
    try:
        for index in range(len(batches)):
            collector.start(index)
            # each call's patches (a conv may run several times per forward: a detector's head, once per
            # feature level), so that the tied model's k-th call pairs with the original's k-th
            held: dict[str, list[torch.Tensor]] = {}
            calls: dict[str, int] = {}
            if source_collector is not None:
                source_collector.start(index)
                with source_collector.watching(
                        source, lambda name, conv, p, held=held: held.setdefault(name, []).append(p)):
                    run(source, index)

            def keep(name: str, conv: nn.Module, p: torch.Tensor, held: dict[str, list[torch.Tensor]] = held,
                     calls: dict[str, int] = calls, index: int = index) -> None:
                call = calls[name] = calls.get(name, -1) + 1
                _add_patches(found, name, p, blocks(originals[name].weight, p.shape[0]), source is not None,
                             held[name][call] if name in held else None,
                             given.outputs[name][index][call] if given is not None else None)

            with collector.watching(model, keep):
                run(model, index)
            report(progress, task, index + 1, len(batches))
    finally:
        for m, flag in modes:
            m.training = flag
        for norm, momentum in norms:
            norm.momentum = momentum
    missing = [n for n in members if n not in found]
    if missing:
        raise DataError(f"the forward pass never reached {missing[0]!r}: it cannot be fitted to data")
    for name, m in found.items():
        m.finish(blocks(originals[name].weight, m.gram.shape[0]))
    return found


def _add_patches(found: dict[str, Moments], name: str, p: torch.Tensor, weight: torch.Tensor, paired: bool,
                 original: torch.Tensor | None, outputs: torch.Tensor | None) -> None:
    """Add one call's sampled patches `p` (G, F, R) of `name` into its moments in `found`: the
    original member's `weight` blocks; `paired`: a second network gives the targets, its patches
    `original` at the same positions, or its outputs there, read once (`outputs`); neither: `p`."""
    m = found.get(name)
    if m is None:
        m = found[name] = Moments(torch.zeros(p.shape[0], p.shape[1], p.shape[1], device=p.device),
                                  torch.zeros(p.shape[:2], dtype=torch.float64, device=p.device))
    add_gram(m.gram, p)
    m.total += p.sum(-1).double()
    m.rows += p.shape[-1]
    if outputs is None:
        original = p if original is None else original
        outputs = weight @ original  # (G, O, R): W_i X
    m.energy += float(outputs.square().sum(dtype=torch.float64))
    row_sums = outputs.sum(-1).double()
    m.energy_total = row_sums if m.energy_total is None else m.energy_total + row_sums
    if not paired:
        return
    if original is None or weight.shape[1] < weight.shape[2]:  # W X X̃ᵀ directly
        m.pull = torch.zeros(weight.shape, device=p.device) if m.pull is None else m.pull
        m.pull.baddbmm_(outputs, p.transpose(1, 2))
    else:  # more outputs than inputs: X X̃ᵀ, times W at the end
        m.cross = torch.zeros_like(m.gram) if m.cross is None else m.cross
        m.cross.baddbmm_(original, p.transpose(1, 2))


@torch.no_grad()
def moments_of_inputs(conv: nn.Module, name: str, original: nn.Module, inputs: Callable[[int], torch.Tensor],
                      batches: int, given: SourceOutputs, *, positions: int, seed: int) -> Moments:
    """The moments `collect` gives of member `name` (`conv` in the copy, `original` in the untied
    network), from its input on each batch as `inputs(index)` hands it, against the untied outputs
    read once (`given`): no forward runs here, the caller's stream stands at the member."""
    collector = _Collector({conv: name}, positions, seed)
    found: dict[str, Moments] = {}
    weight = blocks(original.weight, getattr(conv, "groups", 1))
    for index in range(batches):
        collector.batch = index
        _add_patches(found, name, collector.sample_named(conv, name, inputs(index)), weight, True, None,
                     given.outputs[name][index][0])
    found[name].finish(weight)
    return found[name]


@dataclass
class SourceOutputs:
    """The untied network's outputs W x at every fitted layer's sampled positions, by layer, batch
    and call: all the statistics need of its stream, which does not change while the copy is
    fitted. Read in one pass, they spare a sequential fit the untied stream's pass per unit."""

    outputs: dict[str, list[list[torch.Tensor]]]
    nbytes: int


@torch.no_grad()
def source_outputs(source: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor], *, positions: int,
                   seed: int, budget: int, progress: ProgressFn | None = None) -> SourceOutputs | None:
    """`SourceOutputs` of `names` over `batches` (as `collect` samples them), or None where they
    would take more than `budget` bytes (judged on the first batch): the fit then runs the untied
    stream beside the copy."""
    modules = dict(source.named_modules())
    outputs: dict[str, list[list[torch.Tensor]]] = {n: [] for n in names}
    collector = _Collector({modules[n]: n for n in names}, positions, seed, stop_after=set(names))
    modes = [(m, m.training) for m in source.modules()]
    source.eval()
    size = 0

    def keep(name: str, conv: nn.Module, p: torch.Tensor) -> None:
        nonlocal size
        found = blocks(conv.weight, p.shape[0]) @ p
        outputs[name][-1].append(found)
        size += found.numel() * found.element_size()

    try:
        for index, batch in enumerate(batches):
            collector.start(index)
            for name in names:
                outputs[name].append([])
            with collector.watching(source, keep):
                try:
                    source(batch)
                except _Enough:
                    pass
            if index == 0 and size * len(batches) > budget:
                need = size * len(batches) / 2**20
                log.info(f"the untied network's outputs at the fitted layers would take {need:,.0f} MiB "
                         f"(budget {budget / 2**20:,.0f} MiB): its stream runs beside the copy's")
                return None
            report(progress, "the untied network's outputs", index + 1, len(batches))
    finally:
        for m, flag in modes:
            m.training = flag
    log.info(f"the untied network's outputs at {len(names)} fitted layers read once: {size / 2**20:,.0f} MiB")
    return SourceOutputs(outputs, size)
