"""The import graph of ``src/gam``: no cycles, and the command line imported by no library module.

Every import statement counts, the function-local ones too: an import hidden in a
function still ties the two modules together, it only fails later (at the call).
The graph is read from the source with ``ast``, nothing is imported. An edge goes
to the module named, not to its parent packages (``import gam.a.b`` runs
``gam/__init__.py`` first, but that file imports nothing that imports back).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
COMMAND_LINE = {"gam.cli", "gam.train_cli"}
# The command-line modules, the only ones that may import COMMAND_LINE.
COMMAND_LINE_IMPORTERS = {*COMMAND_LINE, "gam.cli_args", "gam.__main__"}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module under src/gam (a package is its __init__.py)."""
    files = {}
    for path in sorted((SRC / "gam").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``name`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package of this module, up level - 1
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            for alias in node.names:  # ``from gam import x``: the submodule x if there is one
                submodule = f"{module}.{alias.name}"
                found.add(submodule if submodule in known else module)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the DFS path, then "done"
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_function_local_and_package_imports():
    graph = import_graph()
    assert "gam.models.lm" in graph["gam"]                # the lazy loader's import inside __getattr__
    assert "gam.checkpoint" in graph["gam.train_cli"]     # an import inside cmd_eval
    assert "gam.ops.triton_memory_read" in graph["gam.ops.memory_read"]  # ``from gam.ops import x``
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def library_importers_of_the_command_line() -> list[str]:
    return sorted(f"{name} imports {target}" for name, targets in import_graph().items()
                  for target in targets & COMMAND_LINE if name not in COMMAND_LINE_IMPORTERS)


def test_no_library_module_imports_the_command_line():
    """The command line sits on top: nothing below it, the benchmarks included, imports it."""
    assert library_importers_of_the_command_line() == []


def test_no_benchmark_module_parses_options():
    """A benchmark is a config dataclass + run + write: its options are built by the command line."""
    graph_files = module_files()
    parsing = [name for name, path in graph_files.items()
               if name.startswith("gam.bench") and "argparse" in path.read_text()]
    assert parsing == []


def test_one_model_registry_and_one_optimizer_construction():
    """Every model list comes from gam.models.registry; AdamW is built in one place (make_optimizer)."""
    sources = {name: path.read_text() for name, path in module_files().items()}
    assert [n for n, text in sources.items() if "optim.AdamW(" in text] == ["gam.train"]
    assert sum(text.count("optim.AdamW(") for text in sources.values()) == 1
    assert [n for n, text in sources.items() if "class ModelSpec" in text] == ["gam.models.registry"]
