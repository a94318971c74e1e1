"""The package's layers (../shared/DESIGN.md, docs/architecture.md): every import points down, and
no imports form a loop. Read from the source with ``ast``: imports inside functions count."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dis_dist"

# Lowest first. A module may import from its own layer and those before it.
LAYERS = [
    {"errors", "utils"},
    {"ops", "diffusion"},
    {"models"},
    {"config", "plan"},
    {"distributed"},
    {"data"},
    {"sampling", "eval"},
    {"train"},
    {"launch", "sample"},  # entry points: the launcher and the sampling command line
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The dis_dist modules ``path`` imports, anywhere in it (relative imports resolved):
    ``from package import name`` imports the module ``package.name`` where there is one, else
    ``package`` itself (its ``__init__``)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(kept + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {name for name in found if name in modules}


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(paths)) - {name} for name, path in paths.items()}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else module
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} is in no layer: add {top!r} to LAYERS")


def test_every_import_points_down_the_layers():
    upward = [f"{m} -> {t}" for m, targets in sorted(_graph().items()) if m != "dis_dist"
              for t in sorted(targets) if t != "dis_dist" and _layer(t) > _layer(m)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_imports_form_a_loop():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    loops: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                loops.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not loops, "import loops:\n" + "\n".join(" -> ".join(loop) for loop in loops)


def test_the_checks_see_what_they_should():
    """The graph reads the imports of a module as they are written."""
    graph = _graph()
    assert "dis_dist.distributed.strategy" in graph["dis_dist.distributed.fsdp"]
    assert "dis_dist.train.export" in graph["dis_dist.sample"]  # imported inside a function
    assert _layer("dis_dist.train.trainer") > _layer("dis_dist.sampling") > _layer("dis_dist.data.shards")
