"""The runner's layout stays navigable: imports flow one way between its folders, no folder
grows into a flat room, no module into a wall of text."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sparsify_exp

PACKAGE = Path(sparsify_exp.__file__).parent
RUNNER = PACKAGE / "runner"
MAX_MODULES_PER_FOLDER = 13
MAX_LINES = 520


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ``sparsify_exp`` module ``path`` imports, at module level or inside functions:
    ``from pkg import name`` counts as ``pkg.name`` when that is a module, else as ``pkg``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sparsify_exp")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sparsify_exp"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in ALL_MODULES else node.module)
    return found


ALL_MODULES = {_module_name(p) for p in PACKAGE.rglob("*.py")}


def _runner_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in RUNNER.rglob("*.py")}


def _unit(module: str) -> str | None:
    """The node a runner module belongs to: its subfolder (``tracking``, ``sweep``, ...), or
    itself for the job core that sits flat in ``runner/``."""
    if module == "sparsify_exp.runner":
        return "runner"
    if not module.startswith("sparsify_exp.runner."):
        return None
    rest = module.removeprefix("sparsify_exp.runner.").split(".")
    return rest[0] if (RUNNER / rest[0]).is_dir() else f"runner.{rest[0]}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _graph(unit_of) -> dict[str, set[str]]:
    modules = _runner_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        src = unit_of(name)
        for target in _imports(path) & modules.keys():
            if (dst := unit_of(target)) and dst != src:
                graph.setdefault(src, set()).add(dst)
    return graph


def test_no_import_cycle_between_the_runners_folders():
    graph = _graph(_unit)
    assert "tracking" in graph and "sweep" in graph, graph  # the reader sees the imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_import_cycle_between_runner_modules():
    graph = _graph(lambda m: m if m.startswith("sparsify_exp.runner") else None)
    graph = {k: {v for v in vs if not k.startswith(v + ".")} for k, vs in graph.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_the_library_does_not_import_the_runner():
    for path in PACKAGE.rglob("*.py"):
        if RUNNER in path.parents or path.name in ("__main__.py", "report.py", "sync.py"):
            continue
        runner = {m for m in _imports(path) if m.startswith("sparsify_exp.runner")}
        assert not runner, f"{path.relative_to(PACKAGE)} imports {sorted(runner)}"


@pytest.mark.parametrize(
    "folder", sorted({p.parent for p in RUNNER.rglob("*.py")}), ids=lambda p: p.name
)
def test_no_folder_is_a_flat_room(folder: Path):
    modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
    assert len(modules) <= MAX_MODULES_PER_FOLDER, sorted(p.name for p in modules)


def test_no_module_is_a_wall():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in RUNNER.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long
