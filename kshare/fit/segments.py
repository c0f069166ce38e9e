"""A network cut where one tensor carries everything: run it from a cut to a later one.

The sequential fit visits groups in network order, and each visit needs the inputs of the
partially tied network at that group. Run from the input each time, the fit costs one pass per
group. GPTQ never re-runs the network from the input: it keeps the inputs of the block it works
on. Here the same is done for any network `torch.fx` can trace: a *cut* is a point of its graph
(in execution order) across which exactly one value lives, so the activations of a batch at a cut
are all that the rest of the network needs. Convolutions, linear layers and BatchNorm stay leaf
modules (their own forward runs, with its hooks, so the fit's statistics are gathered as before;
timm's dynamically padded convs are traced no further). A network that does not trace, or whose
traced graph does not reproduce its output, gets `None` and is fitted the old way.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from kshare.analysis.inspect import analysis_mode

log = logging.getLogger(__name__)

_LEAVES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, module_qualified_name)


class Segments:
    """A traced network's nodes in execution order and its cuts (`cuts[i]`: how many nodes have
    run at that cut; the first cut is the input). `run` executes one network's copy of the graph
    (the untied original or the partially tied one: same structure, own weights) between cuts."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self.nodes = list(graph.nodes)
        self.index = index = {n: i for i, n in enumerate(self.nodes)}
        self.static = self._static(index)
        self.last_use = [max((index[u] for u in n.users), default=i) for i, n in enumerate(self.nodes)]
        first_input = next(i for i, n in enumerate(self.nodes) if n.op == "placeholder")
        self.cuts: list[int] = []
        self.carried: dict[int, fx.Node] = {}  # cut → the one node whose value crosses it
        for cut in range(first_input + 1, len(self.nodes)):
            live = [i for i in range(cut) if i not in self.static and self.last_use[i] >= cut]
            if len(live) == 1:
                self.cuts.append(cut)
                self.carried[cut] = self.nodes[live[0]]
        self.input_cut = self.cuts[0]
        self.positions: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            if n.op == "call_module":
                self.positions.setdefault(str(n.target), i)
        self._interpreters: dict[int, tuple[nn.Module, fx.Interpreter]] = {}

    def _static(self, index: dict[fx.Node, int]) -> set[int]:
        """Nodes that no input reaches (parameters, constants): evaluated wherever they are needed."""
        reached: set[int] = set()
        for i, n in enumerate(self.nodes):
            if n.op == "placeholder" or any(index[a] in reached for a in n.all_input_nodes):
                reached.add(i)
        return {i for i in range(len(self.nodes)) if i not in reached and self.nodes[i].op != "output"}

    @classmethod
    def trace(cls, model: nn.Module, example: torch.Tensor) -> Segments | None:
        """The cuts of `model`, or None (said in the log) where it does not trace or its graph,
        run on two images of `example`, does not give the model's own output."""
        try:
            parameters = list(inspect.signature(model.forward).parameters.values())
            fixed = {p.name: p.default for p in parameters[1:] if p.default is not inspect.Parameter.empty}
            if len(fixed) < len(parameters) - 1:
                raise TypeError("its forward takes more than one input")
            with analysis_mode(model):
                graph = _LeafTracer().trace(model, concrete_args=fixed or None)
                segments = cls(graph)
                with torch.no_grad():
                    x = example[:2]
                    expected = _first_tensor(model(x))
                    got = segments.run(model, segments.input_cut, x, None)
            if not isinstance(got, torch.Tensor) or got.shape != expected.shape or \
                    not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
                log.info("the traced graph does not reproduce the network's output: the sequential fit runs "
                         "each pass from the input")
                return None
        except Exception as error:  # any tracing failure means: fit the old way
            log.info(f"the network does not trace ({type(error).__name__}: {str(error).splitlines()[0][:120]}): "
                     "the sequential fit runs each pass from the input")
            return None
        return segments

    def position(self, module: str) -> int:
        """Where the named module runs (its first call), as a node index."""
        return self.positions[module]

    def cut_before(self, position: int) -> int:
        """The last cut at or before node `position`."""
        return max(c for c in self.cuts if c <= position)

    def live_at(self, position: int) -> list[fx.Node]:
        """The values the rest of the graph still reads when `position` nodes have run (at a cut, one)."""
        return [self.nodes[i] for i in range(position) if i not in self.static and self.last_use[i] >= position]

    def run(self, model: nn.Module, start: int, value: torch.Tensor, stop: int | None) -> Any:
        """Run `model`'s copy of the graph from cut `start`, where the carried value is `value`, up
        to cut `stop` (its carried value is returned) or to the end (the network's output)."""
        found = self._execute(model, {self.carried[start]: value}, start, stop)
        return found if stop is None else found[self.carried[stop]]

    def step(self, model: nn.Module, values: dict[fx.Node, torch.Tensor], start: int, stop: int
             ) -> dict[fx.Node, torch.Tensor]:
        """Run `model`'s copy of the graph from node `start`, where the values live are `values`
        (`live_at(start)`), to node `stop`: the values live there. Any two positions, not only cuts."""
        return self._execute(model, values, start, stop)

    def _execute(self, model: nn.Module, values: dict[fx.Node, Any], start: int, stop: int | None) -> Any:
        interpreter = self._interpreter(model)
        env: dict[fx.Node, Any] = {}
        interpreter.env = env
        end = len(self.nodes) if stop is None else stop
        for i in sorted(self.static):
            if i < end and self.nodes[i].op != "placeholder":
                env[self.nodes[i]] = interpreter.run_node(self.nodes[i])
        env.update(values)
        for i in range(start, end):
            node = self.nodes[i]
            if node.op == "placeholder" or i in self.static:
                continue
            if node.op == "output":
                return _first_tensor(interpreter.run_node(node))
            env[node] = interpreter.run_node(node)
            for arg in node.all_input_nodes:  # free what no later node reads
                if self.last_use[self.index[arg]] <= i:
                    env.pop(arg, None)
        return {n: env[n] for n in self.live_at(end)}

    def _interpreter(self, model: nn.Module) -> fx.Interpreter:
        """An interpreter over `model`'s own submodules (shared, not copied: hooks and assigned
        weights apply), made once per model."""
        found = self._interpreters.get(id(model))
        if found is None or found[0] is not model:
            found = self._interpreters[id(model)] = (model, fx.Interpreter(fx.GraphModule(model, self.graph),
                                                                            garbage_collect_values=False))
        return found[1]


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    items: Sequence[Any] = list(out.values()) if isinstance(out, dict) else \
        out if isinstance(out, (tuple, list)) else ()
    for item in items:
        if isinstance(item, torch.Tensor):
            return item
    raise TypeError(f"the network returns {type(out).__name__}")
