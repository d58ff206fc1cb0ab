"""The package's layering, read from the code's own imports (every import, including those inside
functions): the core imports no transport, no module imports a layer above its own, and no
modules import each other in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "semroute"

# Lowest first: a module may import its own layer and the layers before it, never one after.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("semroute._proto", "semroute._proto_gen", "semroute.config",
              "semroute.errors", "semroute.types", "semroute.logs", "semroute.metrics",
              "semroute.auth", "semroute.yamlfile")),
    # ``semroute`` itself is the core's public face (``from semroute import Router``).
    ("core", ("semroute", "semroute.exemplars", "semroute.encoder", "semroute.index", "semroute.decision",
              "semroute.router", "semroute.projection", "semroute.export", "semroute.tune",
              "semroute.abstain", "semroute.encoder_tune", "semroute.static_encoder",
              "semroute.two_stage")),
    ("dispatch", ("semroute.dispatch",)),
    ("loop", ("semroute.loop",)),
    ("grpc", ("semroute.grpc",)),
    ("http", ("semroute.http",)),
    ("quality", ("semroute.quality",)),
    ("serve", ("semroute.serve",)),
    ("testing", ("semroute.testing",)),
    ("cli", ("semroute.cli",)),
)
CORE_FORBIDDEN = ("grpc", "grpc_health", "grpc_reflection", "httpx", "starlette", "uvicorn")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(p): p for p in PACKAGE.rglob("*.py") if "_proto" not in p.parts[-4:-1]
    }


def _imports(path: Path, name: str, known: frozenset[str] = frozenset()) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved). ``from a
    import b`` counts as importing ``a.b`` when that is one of the ``known`` modules, else
    ``a``."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return found


def _layer(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, layer index)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = frozenset(modules)
    return {
        name: {m for m in _imports(path, name, known) if m in modules and m != name}
        for name, path in modules.items()
    }


def test_every_module_has_a_layer() -> None:
    """A new module must be placed in LAYERS, so the rule below covers it."""
    unplaced = sorted(m for m in _modules() if _layer(m) is None)
    assert unplaced == []


def test_core_imports_no_transport() -> None:
    """The core (and the base it stands on) never imports grpc, httpx, starlette or uvicorn."""
    bad = []
    core = {i for i, (n, _) in enumerate(LAYERS) if n in ("base", "core")}
    for name, path in _modules().items():
        if _layer(name) in core and name not in ("semroute._proto_gen",):
            for imported in _imports(path, name):
                if imported.split(".")[0] in CORE_FORBIDDEN:
                    bad.append(f"{name} imports {imported}")
    assert bad == []


def test_no_module_imports_a_layer_above_its_own() -> None:
    """Each import points down (or sideways within a layer), never up."""
    bad = []
    for name, imported in _graph().items():
        own = _layer(name)
        assert own is not None
        for other in imported:
            theirs = _layer(other)
            if theirs is not None and theirs > own:
                bad.append(f"{name} ({LAYERS[own][0]}) imports {other} ({LAYERS[theirs][0]})")
    assert sorted(bad) == []


def test_no_import_cycles() -> None:
    """No module reaches itself through its imports (package __init__ re-exports excluded)."""
    graph = {
        name: {m for m in deps if not _is_parent(m, name)} for name, deps in _graph().items()
    }
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []


def _is_parent(candidate: str, module: str) -> bool:
    return module.startswith(candidate + ".")


@pytest.mark.parametrize("name", ["semroute.grpc.errors", "semroute.dispatch.dispatcher"])
def test_the_rule_sees_imports(name: str) -> None:
    """Guard against a rule that passes because it reads nothing: known imports are found."""
    graph = _graph()
    assert "semroute.errors" in graph[name]
