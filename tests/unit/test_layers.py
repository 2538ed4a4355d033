"""The package's import graph: no cycles, and the lower layers never import the upper ones.

Read from the source (every ``import`` statement, including those inside functions and ``TYPE_CHECKING`` blocks),
so a lazy import that closes a circle is caught too. Importing ``a.b.c`` also runs ``a/__init__.py`` and
``a/b/__init__.py``: those packages count as imported, except the importer's own packages (already running).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ssl3d"
# Single-device code: it never looks at how it is run, sharded, estimated or launched.
LOWER = ("ssl3d.model", "ssl3d.ssl", "ssl3d.data")
UPPER = (
    "ssl3d.strategies",
    "ssl3d.memory",
    "ssl3d.trainer",
    "ssl3d.cli",
    "ssl3d.run_config",
    "ssl3d.checkpoint",
    "ssl3d.downstream",
)


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


def test_lower_layers_do_not_import_upper_layers() -> None:
    graph = import_graph()
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if module.startswith(LOWER)
        for target in targets
        if target.startswith(UPPER)
    )
    assert wrong == []


def test_memory_tools_do_not_import_the_strategy_layer() -> None:
    """The estimator models the strategies from their settings; it must not need them to be importable."""
    graph = import_graph()
    wrong = sorted(f"{m} imports {t}" for m, ts in graph.items() if m.startswith("ssl3d.memory") for t in ts)
    wrong = [w for w in wrong if " imports ssl3d.strategies" in w or " imports ssl3d.trainer" in w]
    assert wrong == []


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
