"""The package's import picture: layers that import only downward, and no cycle.

Every import counts, those inside functions and under ``TYPE_CHECKING`` included; the one
exception is the package's lazy ``flipctr.load`` (the root imports the run folders' inference
when it is called)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# lowest first; a module may import its own layer and those below
LAYERS = (
    ("flipctr._version", "flipctr.config", "flipctr.utils", "flipctr.paper", "flipctr.profiles"),
    ("flipctr.runtime",),
    ("flipctr.data",),
    ("flipctr.models",),
    ("flipctr.training",),
    ("flipctr.runs",),
    ("flipctr.cli",),
)
LAZY_LOAD = ("flipctr", "flipctr.runs.inference")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str) -> str | None:
    """The module ``name`` is, or lives in (``flipctr.x.y.Name`` -> ``flipctr.x.y``)."""
    while name:
        as_path = SRC / name.replace(".", "/")
        if as_path.with_suffix(".py").exists() or (as_path / "__init__.py").exists():
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted((SRC / "flipctr").rglob("*.py")):
        module, package = _module_name(path), path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = module.split(".") if package else module.split(".")[:-1]
                    here = here[:len(here) - node.level + 1]
                    base = ".".join(here + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            edges |= {target for name in names if name.startswith("flipctr")
                      for target in [_resolve(name)] if target and target != module}
        graph[module] = edges
    return graph


def _layer(module: str) -> int:
    if module == "flipctr":  # the package's own API (flipctr.load) sits with the command line
        return len(LAYERS) - 1
    for index, layer in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in layer):
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: place it")


def test_every_import_points_down_the_layers():
    upward = [f"{a} -> {b}" for a, edges in import_graph().items() if a != "flipctr"
              for b in edges if _layer(b) > _layer(a)]
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)
    assert import_graph()["flipctr"] <= {"flipctr._version", LAZY_LOAD[1]}


def test_the_imports_have_no_cycle():
    graph = import_graph()
    graph["flipctr"] -= {LAZY_LOAD[1]}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(target):] + [module, target]))
            if target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_layout_check_sees_a_planted_upward_import(tmp_path, monkeypatch):
    """The check above reads the files it claims to: an upward import planted in a copy is found."""
    import shutil
    import sys

    copy = tmp_path / "src"
    shutil.copytree(SRC / "flipctr", copy / "flipctr", ignore=shutil.ignore_patterns("__pycache__"))
    planted = copy / "flipctr" / "data" / "masking.py"
    planted.write_text(planted.read_text() + "\n\ndef _planted():\n    from ..runs import flip  # noqa: F401\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", copy)
    with pytest.raises(AssertionError, match="flipctr.data.masking -> flipctr.runs.flip"):
        test_every_import_points_down_the_layers()
