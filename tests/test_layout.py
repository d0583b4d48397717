"""The package's shape: packages in one declared order with imports pointing down it, heavy modules kept out of
light ones (checked over the whole import graph), no cycles, and files short enough to read."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import medseg

PACKAGE = Path(medseg.__file__).parent
MAX_LINES = 350
# The layers, bottom first: a module imports only from its own package or a lower layer; two units of one layer
# (inference and planning, two entry points) never import each other. The first layer is a list of modules (the
# leaves: small fact modules, whatever their folder), the others packages, the last the entry points.
LAYERS: list[list[str]] = [
    [
        "medseg",  # CONF_DIR, REPO_ROOT
        "medseg.config_check",
        "medseg.checkpoint",
        "medseg.precision.dtypes",
        "medseg.precision.state",
        "medseg.precision.view",  # how code outside precision/ finds the plugin
        "medseg.inference.postprocess",  # the postprocessing decision file, written by the test pass
    ],
    ["medseg.data"],
    ["medseg.reliability"],
    ["medseg.precision"],
    ["medseg.models"],
    ["medseg.inference", "medseg.planning"],
    ["medseg.deploy"],  # a model leaving medseg: built from checkpoints and inference/
    ["medseg.tracking"],
    [
        "medseg.train",
        "medseg.predict",
        "medseg.evaluate",
        "medseg.report",
        "medseg.plan",
        "medseg.dashboard",
        "medseg.export",
    ],
]
LEAVES = LAYERS[0]
ENTRY_POINTS = LAYERS[-1]
# Modules (or packages) that must not pull in a heavy module, directly or through anything they import: checkpoint
# reading and prediction run without a trainer; planning builds nets and losses, never a LightningModule.
HEAVY = "medseg.precision.plugin"
KEEP_OUT = [
    ("medseg.checkpoint", HEAVY),
    ("medseg.inference", HEAVY),
    ("medseg.planning", "medseg.models.module"),
]
# Modules with no medseg imports at all, so that any module of their package may use them.
SELF_CONTAINED = ["tracking.loggers", "tracking.offline", "tracking.tables", "tracking.display", "precision.scaler"]


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node of a module except what sits under `if TYPE_CHECKING:` (imported for type hints only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in ast.walk(child))
            continue
        yield node
        yield from _runtime_nodes(node)


def medseg_imports(path: Path, root: Path = PACKAGE) -> set[str]:
    """The medseg modules a file imports anywhere in it (lazy imports inside functions too, not those under
    `if TYPE_CHECKING:`): `from a.b import c` counts as `a.b.c` when that is a module, else as `a.b`."""
    found = set()
    top = root.name
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == top)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == top:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (root.parent / Path(*sub.split("."))).with_suffix(".py").is_file()
                found.add(sub if is_module else node.module)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    return {module_name(p, root): medseg_imports(p, root) for p in root.rglob("*.py")}


def unit_of(module: str) -> str | None:
    """The layer unit (a leaf module, a package or an entry point) a module belongs to; None when undeclared."""
    if module in LEAVES:
        return module
    units = [u for layer in LAYERS[1:] for u in layer if module == u or module.startswith(u + ".")]
    return max(units, key=len, default=None)


def layer_of(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that points up the layers or sideways between two units of one layer, and every module that
    belongs to no declared unit."""
    found = []
    for module, deps in sorted(graph.items()):
        unit = unit_of(module)
        if unit is None:
            found.append(f"{module}: in no layer of LAYERS")
            continue
        for dep in sorted(deps):
            dep_unit = unit_of(dep)
            if dep_unit is None or dep_unit == unit or (unit in LEAVES and dep_unit in LEAVES):
                continue
            if layer_of(dep_unit) >= layer_of(unit):
                found.append(f"{module} -> {dep} ({unit} may not import {dep_unit})")
    return found


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module `start` imports, directly or through others: module -> the module that imports it."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        node = todo.pop()
        for dep in graph.get(node, ()):
            if dep not in seen and dep != start:
                seen[dep] = node
                todo.append(dep)
    return seen


def import_chain(graph: dict[str, set[str]], start: str, target: str) -> list[str] | None:
    """`[start, ..., target]` along imports, or None when `start` never pulls `target` in."""
    via = reachable(graph, start)
    if target not in via:
        return None
    chain = [target]
    while chain[-1] != start:
        chain.append(via[chain[-1]])
    return chain[::-1]


def heavy_imports(graph: dict[str, set[str]]) -> list[str]:
    """Chains by which a module of KEEP_OUT pulls in its heavy module, or an entry point another entry point."""
    found = []
    for module in sorted(graph):
        for light, heavy in KEEP_OUT:
            if (module == light or module.startswith(light + ".")) and (chain := import_chain(graph, module, heavy)):
                found.append(" -> ".join(chain))
        if module in ENTRY_POINTS:
            found += [" -> ".join(c) for e in ENTRY_POINTS if e != module and (c := import_chain(graph, module, e))]
    return found


def command_line_modules(root: Path = PACKAGE) -> set[str]:
    """Modules run with `python -m` (they have a `__main__` block): the entry points and a few package CLIs."""
    return {module_name(p, root) for p in root.rglob("*.py") if 'if __name__ == "__main__":' in p.read_text()}


def command_line_imports(graph: dict[str, set[str]], clis: set[str]) -> list[str]:
    """Every import of a command-line module: shared code belongs in a package, not in another program."""
    return [f"{m} -> {d}" for m, deps in sorted(graph.items()) for d in sorted(deps & clis)]


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


def long_files(root: Path = PACKAGE) -> list[str]:
    return [
        f"{p.relative_to(root)}: {n} lines; split it by concern"
        for p in sorted(root.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    ]


# ---------------------------------------------------------------------------------------------- medseg itself
def test_the_graph_is_medseg_s_real_imports():
    graph = import_graph()
    assert len(graph) > 40 and "medseg.tracking.loggers" in graph["medseg.train"]
    assert set(LEAVES) <= set(graph) and set(ENTRY_POINTS) <= set(graph)


def test_packages_import_down_the_layers():
    assert layer_violations(import_graph()) == []


def test_leaves_import_only_leaves():
    graph = import_graph()
    assert {m: graph[m] - set(LEAVES) for m in LEAVES if graph[m] - set(LEAVES)} == {}


def test_light_modules_never_pull_in_heavy_ones_and_entry_points_never_import_each_other():
    assert heavy_imports(import_graph()) == []


def test_checkpoint_and_inference_load_without_the_plugin_module():
    """The graph's verdict, confirmed by importing them in a fresh interpreter."""
    modules = ["medseg.checkpoint"] + sorted(m for m in import_graph() if m.startswith("medseg.inference."))
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint({HEAVY!r} in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_nothing_imports_a_command_line_module():
    clis = command_line_modules()
    assert {"medseg.train", "medseg.precision.export", "medseg.data.check"} <= clis
    assert command_line_imports(import_graph(), clis) == []


def test_no_import_cycle_in_medseg():
    graph = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("module", SELF_CONTAINED)
def test_self_contained_modules_import_nothing_from_medseg(module):
    assert medseg_imports((PACKAGE / Path(*module.split("."))).with_suffix(".py")) == set()


def test_report_reads_runs_without_the_training_side():
    """`medseg.report` reads finished runs; it must not pull in loggers, callbacks or the trainer."""
    pulled = reachable(import_graph(), "medseg.report")
    training_side = {f"medseg.tracking.{m}" for m in ("loggers", "summary", "images", "sweep")}
    assert not set(pulled) & (training_side | {"medseg.train", "medseg.precision.monitor", HEAVY}), pulled


def test_no_file_over_the_line_limit():
    assert long_files() == []


# ---------------------------------------------------------------------------------------------- planted violations
def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


@pytest.mark.parametrize(
    "module, dep",
    [
        ("medseg.precision.monitor", "medseg.tracking.loggers"),  # up: precision below tracking
        ("medseg.planning.memory", "medseg.inference.cases"),  # sideways: one layer, two units
        ("medseg.report", "medseg.predict"),  # entry point to entry point
        ("medseg.checkpoint", "medseg.precision.export"),  # a leaf importing a package
        ("medseg.data.x", "medseg.models.module"),
    ],
)
def test_an_import_against_the_order_is_named(module, dep):
    graph = {module: {dep}, dep: set()}
    assert layer_violations(graph) == [f"{module} -> {dep} ({unit_of(module)} may not import {unit_of(dep)})"]


def test_imports_down_the_order_pass():
    graph = {"medseg.tracking.x": {"medseg.precision.monitor", "medseg.checkpoint"}, "medseg.report": {"medseg.data.x"}}
    assert layer_violations(graph) == []


def test_an_undeclared_package_is_named():
    assert layer_violations({"medseg.utils.misc": set()}) == ["medseg.utils.misc: in no layer of LAYERS"]


def test_a_plugin_pulled_in_two_imports_away_is_named():
    graph = {
        "medseg.inference.cases": {"medseg.reliability.atomic_io"},
        "medseg.reliability.atomic_io": {"medseg.precision.view"},
        "medseg.precision.view": {HEAVY},
        HEAVY: set(),
        "medseg.planning.memory": {"medseg.models.loss"},
        "medseg.models.loss": {"medseg.models.module"},
        "medseg.train": {"medseg.tracking.sweep"},
        "medseg.tracking.sweep": {"medseg.evaluate"},
        "medseg.evaluate": set(),
    }
    assert heavy_imports(graph) == [
        "medseg.inference.cases -> medseg.reliability.atomic_io -> medseg.precision.view -> medseg.precision.plugin",
        "medseg.planning.memory -> medseg.models.loss -> medseg.models.module",
        "medseg.train -> medseg.tracking.sweep -> medseg.evaluate",
    ]
    del graph["medseg.precision.view"], graph["medseg.models.loss"]
    graph["medseg.tracking.sweep"] = set()
    assert heavy_imports(graph) == []


def test_an_import_of_a_command_line_module_is_named():
    graph = {"medseg.checkpoint": {"medseg.precision.export"}, "medseg.precision.export": {"medseg.precision.state"}}
    clis = {"medseg.precision.export", "medseg.train"}
    assert command_line_imports(graph, clis) == ["medseg.checkpoint -> medseg.precision.export"]


def test_planted_files_are_read_as_their_imports_and_lengths(tmp_path):
    """The parser on real files: a lazy import inside a function of a planted package counts, one for type hints
    only does not; a planted long file is named."""
    root = tmp_path / "medseg"
    (root / "precision").mkdir(parents=True)
    (root / "inference").mkdir()
    for init in (root / "__init__.py", root / "precision" / "__init__.py", root / "inference" / "__init__.py"):
        init.write_text("")
    (root / "precision" / "plugin.py").write_text("import torch\n")
    (root / "precision" / "export.py").write_text('import torch\n\nif __name__ == "__main__":\n    pass\n')
    (root / "inference" / "cases.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import medseg.tracking.runs\n"
        "def read():\n    from medseg.precision.plugin import X\n"
    )
    (root / "precision" / "monitor.py").write_text("import medseg.inference.cases\n")
    (root / "inference" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    graph = import_graph(root)
    assert graph["medseg.inference.cases"] == {"medseg.precision.plugin"}
    assert heavy_imports(graph) == ["medseg.inference.cases -> medseg.precision.plugin"]
    assert layer_violations(graph) == [
        "medseg.precision.monitor -> medseg.inference.cases (medseg.precision may not import medseg.inference)"
    ]
    assert command_line_modules(root) == {"medseg.precision.export"}
    assert long_files(root) == [f"inference/long.py: {MAX_LINES + 1} lines; split it by concern"]
