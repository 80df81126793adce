"""The import graph of ``source/`` and the top-level scripts: no cycles, imports run one way.

The graph is built with ``ast`` (nothing is imported), counting every ``import`` and ``from ...
import`` statement, also those inside functions: a function-local import only postpones a cycle
to the first call. Three rules:

- no cycle among the modules;
- no module of ``source/`` imports an entry script (they wire ``source/`` together, never the
  other way round);
- no private (underscore) name is imported from another module: what a module shares is public.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_SCRIPTS = ("ssl_pre-training.py", "bissl.py", "fine-tuning.py", "demo.py")
TOP_LEVEL_MODULES = (*ENTRY_SCRIPTS, "config_default.py")


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``root/source`` and the top-level modules."""
    files = {}
    for path in sorted((root / "source").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for name in TOP_LEVEL_MODULES:
        if (root / name).is_file():
            files[Path(name).stem] = root / name
    return files


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, target] if target else base)


def imports_of(module: str, path: Path, known: set[str]) -> tuple[set[str], list[str]]:
    """(the known modules ``module`` imports anywhere in its file, the private names it imports from them)."""
    edges: set[str] = set()
    private: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                target = _resolve_relative(module, path.name == "__init__.py", node.level, node.module)
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in known:  # `from package import module`
                    edges.add(submodule)
                elif target in known:
                    edges.add(target)
                    if alias.name.startswith("_"):
                        private.append(f"{module} imports the private name {alias.name} from {target}")
    edges.discard(module)
    return edges, private


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """The graph {module: modules it imports} and every private name imported across modules."""
    files = module_files(root)
    known = set(files)
    graph: dict[str, set[str]] = {}
    private: list[str] = []
    for module, path in files.items():
        graph[module], found = imports_of(module, path, known)
        private.extend(found)
    return graph, private


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == 1:
                return path[path.index(successor):] + [successor]
            if successor not in state and (cycle := visit(successor)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def entry_script_imports(graph: dict[str, set[str]]) -> list[str]:
    """``source`` modules that import an entry script."""
    scripts = {Path(name).stem for name in ENTRY_SCRIPTS}
    return sorted(f"{module} imports {target}" for module, targets in graph.items()
                  if module.split(".")[0] == "source" for target in targets & scripts)


# --------------------------------------------------------------------------------------------
# The project
# --------------------------------------------------------------------------------------------


def test_the_project_has_no_import_cycle():
    graph, _ = import_graph(ROOT)
    assert len(graph) > 30 and any(target.startswith("source.stages.") for target in graph["bissl"])  # edges were found
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_source_module_imports_an_entry_script():
    graph, _ = import_graph(ROOT)
    assert entry_script_imports(graph) == []


def test_no_private_name_is_imported_across_modules():
    _, private = import_graph(ROOT)
    assert private == []


# --------------------------------------------------------------------------------------------
# The checks can fail
# --------------------------------------------------------------------------------------------


def test_find_cycle_reports_a_synthetic_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond is no cycle


def _write(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_function_local_import_cycle_an_entry_script_import_and_a_private_import_are_found(tmp_path):
    _write(tmp_path, "source/__init__.py", "")
    _write(tmp_path, "source/run/__init__.py", "")
    _write(tmp_path, "source/run/checkpoint.py",
           "def load():\n    from source.tools.weights import normalize\n    return normalize\n")
    _write(tmp_path, "source/tools/__init__.py", "")
    _write(tmp_path, "source/tools/weights.py", "from ..run import checkpoint\nfrom source.run.checkpoint import _helper\n")
    _write(tmp_path, "source/tools/curvature.py", "def main():\n    import bissl\n")
    _write(tmp_path, "bissl.py", "from source.run import checkpoint\n")

    graph, private = import_graph(tmp_path)
    assert graph["source.tools.weights"] == {"source.run.checkpoint"}  # relative and absolute alike
    assert find_cycle(graph) == ["source.run.checkpoint", "source.tools.weights", "source.run.checkpoint"]
    assert entry_script_imports(graph) == ["source.tools.curvature imports bissl"]
    assert private == ["source.tools.weights imports the private name _helper from source.run.checkpoint"]
