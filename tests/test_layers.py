"""The package's shape, read from its own imports: layers that import only downward, no
cycles, no private names across modules, and no printing or CLI libraries below the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kshare"

# Bottom up; a module may import its own layer (without cycles) and any layer below.
LAYERS = (
    ("core", ("kshare._version", "kshare.errors", "kshare._checks", "kshare._files", "kshare.progress")),
    ("kernels", ("kshare.kernels",)),
    ("analysis", ("kshare.analysis",)),
    ("models", ("kshare.models",)),
    ("planning", ("kshare.planning",)),
    ("surgery", ("kshare.surgery",)),
    ("io", ("kshare.io",)),
    ("data", ("kshare.data",)),
    ("fit", ("kshare.fit",)),
    ("training", ("kshare.training",)),
    ("api", ("kshare.retrofit", "kshare.search", "kshare.quantize", "kshare.api", "kshare.sweep")),
    ("cli", ("kshare.cli",)),
)
# The surgery layer reads plans; it must not reach the planners.
PLAN_DATA = ("kshare.planning.plan", "kshare.planning.relaxation")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(imported kshare module, imported name or '', line) for every import in the file, lazy ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("kshare")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kshare"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, "", node.lineno) if sub in modules else (node.module, alias.name, node.lineno))
    return found


def _layer(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")
    return best[0]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {target for target, _, _ in _imports(path, modules) if target != name}
            for name, path in modules.items()}


def test_every_module_is_in_a_layer() -> None:
    for name in _modules():
        if name != "kshare":
            _layer(name)


def test_imports_point_down_the_layers() -> None:
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        if name == "kshare":
            continue  # the facade re-exports every layer
        for target, _, line in _imports(path, modules):
            if target == "kshare" or _layer(target) > _layer(name):
                wrong.append(f"{path.name}:{line} {name} ({LAYERS[_layer(name)][0]}) imports {target}")
            if LAYERS[_layer(name)][0] == "surgery" and _layer(target) == _layer("kshare.planning") \
                    and target not in PLAN_DATA:
                wrong.append(f"{path.name}:{line} surgery module {name} imports the planner module {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt):], nxt]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_cycle_check_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk above sees a cycle when there is one (here, a back-import added to the graph)."""
    graph = _graph()
    graph["kshare.kernels"] = graph["kshare.kernels"] | {"kshare.surgery.tie"}
    monkeypatch.setattr(__import__(__name__), "_graph", lambda: graph)
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles()


def test_no_private_name_crosses_a_module() -> None:
    modules = _modules()
    private = [f"{path.name}:{line} imports {name} from {target}" for path in modules.values()
               for target, name, line in _imports(path, modules)
               if name.startswith("_") and not name.startswith("__")]
    assert not private, "\n".join(private)


def test_only_the_cli_prints_or_imports_rich_and_typer() -> None:
    found = []
    for name, path in _modules().items():
        if name.startswith("kshare.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{name} imports {n}" for n in names if n.split(".")[0] in ("rich", "typer", "click")]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{name}:{node.lineno} prints")
    assert not found, "\n".join(found)
