"""The package's shape: imports point one way (no cycles, leaves stay leaves) and files stay readable."""

import ast
from pathlib import Path

import pytest

import medseg

PACKAGE = Path(medseg.__file__).parent
# Over the size limit, each one cohesive class: the plugin (hooks, masters, the step; its layer casting lives in
# convert.py) and the precision callback (per-step telemetry with its two scratch dataclasses).
LONG_FILES = {"precision/plugin.py", "precision/monitor.py"}
MAX_LINES = 350
# Modules every other module may import: they import nothing from medseg themselves.
LEAVES = ["tracking.loggers", "tracking.offline", "tracking.tables", "tracking.display", "precision.scaler"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def medseg_imports(path: Path) -> set[str]:
    """The medseg modules a file imports anywhere in it (lazy imports inside functions too): `from a.b import c`
    counts as `a.b.c` when that is a module, else as `a.b`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "medseg")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "medseg":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").is_file()
                found.add(sub if is_module else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): medseg_imports(p) for p in PACKAGE.rglob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_long_files_exist():
    assert all((PACKAGE / name).is_file() for name in LONG_FILES)  # the exceptions list does not go stale


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


def test_no_import_cycle_in_medseg():
    graph = import_graph()
    assert len(graph) > 20 and "medseg.tracking.loggers" in graph["medseg.train"]  # the walk sees real imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_modules_import_nothing_from_medseg(leaf):
    assert medseg_imports((PACKAGE / Path(*leaf.split("."))).with_suffix(".py")) == set()


def test_report_reads_runs_without_the_training_side():
    """`medseg.report` reads finished runs; it must not pull in loggers, callbacks or the trainer."""
    imports = medseg_imports(PACKAGE / "report.py")
    training_side = {f"medseg.tracking.{m}" for m in ("loggers", "summary", "images", "sweep")}
    assert not imports & (training_side | {"medseg.train", "medseg.precision.monitor"}), imports


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_stay_short(path):
    lines = len(path.read_text().splitlines())
    if str(path.relative_to(PACKAGE)) in LONG_FILES:
        pytest.skip(f"{lines} lines, one cohesive class (LONG_FILES)")
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)}: {lines} lines; split it by concern"
