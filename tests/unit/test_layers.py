"""The package's import graph: no cycles, every module in one layer, and no import that runs up the layers.

Read from the source (every ``import`` statement, including those inside functions and ``TYPE_CHECKING`` blocks),
so a lazy import that closes a circle is caught too. Importing ``a.b.c`` also runs ``a/__init__.py`` and
``a/b/__init__.py``: those packages count as imported, except the importer's own packages (already running).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ssl3d"
# The layers the code has, lowest first. A module may import its own layer and those below, never one above; every
# module and package of ssl3d belongs to exactly one layer (a new one must be placed here).
TIERS: tuple[tuple[str, ...], ...] = (
    # Foundations: settings, errors, files, the process's memory, logging, signals.
    (
        "ssl3d",
        "ssl3d.config",
        "ssl3d.errors",
        "ssl3d.fileio",
        "ssl3d.rss",
        "ssl3d.metadata",
        "ssl3d.logger",
        "ssl3d.fault_injection",
        "ssl3d.preemption",
        "ssl3d.optim",
        "ssl3d.allocator",
    ),
    # Single-device code: it never looks at how it is run, sharded, estimated or launched.
    ("ssl3d.model", "ssl3d.ssl", "ssl3d.data", "ssl3d.step"),
    # Memory tools: they model the strategies from their settings and ask the task object they are given.
    ("ssl3d.memory",),
    ("ssl3d.strategies",),
    ("ssl3d.checkpoint",),
    # The training tasks: what differs between pre-training, fine-tuning and probing.
    ("ssl3d.tasks",),
    # The one training loop, and turning a run's config into its inputs.
    ("ssl3d.trainer", "ssl3d.run_config"),
    # Commands.
    ("ssl3d.downstream", "ssl3d.cli", "ssl3d.reference"),
)


def tier_of(module: str) -> int | None:
    """The layer of ``module`` (its longest matching prefix), or None if it has none."""
    best = None
    for i, prefixes in enumerate(TIERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "ssl3d" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    return None if best is None else best[0]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that runs up the layers, as "module (layer) imports target (layer)"."""
    wrong = []
    for module, targets in graph.items():
        here = tier_of(module)
        for target in targets:
            there = tier_of(target)
            if here is not None and there is not None and there > here:
                wrong.append(f"{module} (layer {here}) imports {target} (layer {there})")
    return sorted(wrong)


def _modules(package: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules its import statements run."""
    modules = _modules(package)
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        here = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for full in names:
                parts = full.split(".")
                for i in range(1, len(parts) + 1):
                    target = ".".join(parts[:i])
                    own_package = name == target or name.startswith(target + ".")
                    if target in modules and not own_package:
                        targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 30 and "ssl3d.strategies.ds_config" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_module_and_package_has_a_layer() -> None:
    graph = import_graph()
    assert "ssl3d.tasks" in graph and "ssl3d.tasks.pretrain" in graph  # packages are nodes too
    assert [m for m in sorted(graph) if tier_of(m) is None] == []


def test_no_import_runs_up_the_layers() -> None:
    assert layer_violations(import_graph()) == []


def test_memory_tools_import_no_task_and_no_strategy() -> None:
    """The estimator, planner and profiler ask the task object they are given; they model the strategies from their
    settings. So no module of ssl3d.memory imports a task's module, the downstream commands or a strategy."""
    graph = import_graph()
    wrong = sorted(
        f"{m} imports {t}"
        for m, ts in graph.items()
        if m.startswith("ssl3d.memory")
        for t in ts
        if t.startswith(("ssl3d.tasks", "ssl3d.downstream", "ssl3d.strategies", "ssl3d.trainer"))
    )
    assert wrong == []


def test_the_layer_check_catches_memory_importing_a_task(tmp_path: Path) -> None:
    """The checker itself, on a copy of the package where the estimator imports the pre-training task lazily."""
    import shutil

    copy = tmp_path / "ssl3d"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    estimate = copy / "memory" / "estimate.py"
    estimate.write_text(estimate.read_text() + "\n\ndef _task():\n    from ssl3d.tasks.pretrain import PretrainTask\n")
    graph = import_graph(copy)
    assert "ssl3d.memory.estimate (layer 2) imports ssl3d.tasks.pretrain (layer 5)" in layer_violations(graph)


def test_the_walk_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The checker itself: a cycle closed by an import inside a function, and one through a package __init__."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (pkg / "b.py").write_text("from . import a\n")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.c import x\n")
    (pkg / "sub" / "c.py").write_text("x = 1\n")
    (pkg / "d.py").write_text("import pkg.sub.c\n")
    graph = import_graph(pkg)
    assert graph["pkg.d"] == {"pkg.sub", "pkg.sub.c"}
    assert graph["pkg.sub.c"] == set()  # its own package is already running
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


def test_estimator_auto_bucket_rule_matches_the_presets() -> None:
    """The estimator restates the presets' "auto" bucket rule (it sits below the strategy layer): same numbers."""
    from ssl3d.config import ModelConfig
    from ssl3d.memory.estimate import auto_bucket_size as estimator_rule
    from ssl3d.model.meta import count_parameters
    from ssl3d.strategies.ds_config import auto_bucket_size as preset_rule

    for n in (1, 4095, 4096, 4097, count_parameters(ModelConfig()), 10**9):
        assert estimator_rule(n) == preset_rule(n)
    assert preset_rule(count_parameters(ModelConfig())) == 19_099_648
