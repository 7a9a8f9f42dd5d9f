"""The project's shape: no import cycles among its modules, each class name defined once,
and nothing that reads outside the repository.

Imports are read with ``ast`` from the source, wherever they stand: at module level, inside
a function (a lazy import) or under ``TYPE_CHECKING``; each is a tie between two designs.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("talan_serve", "server", "training", "patches", "evaluation")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *(node.module.split(".") if node.module else [])])


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from pkg import sub`` counts ``sub``)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(name, path.name == "__init__.py", node)
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    targets.add(submodule if submodule in modules else source)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50  # the walk found the project
    assert not cycles(graph), cycles(graph)


def test_the_cycle_check_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_each_class_name_is_defined_once():
    defined: dict[str, list[str]] = defaultdict(list)
    for name, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                defined[node.name].append(name)
    twice = {cls: where for cls, where in defined.items() if len(where) > 1}
    assert not twice, twice


def test_engines_are_imported_only_through_their_compat_modules():
    """Engine-internal names live in one ``_compat.py`` per plugin; the rest of the plugin
    reaches the engine through it (the front end's backends use public engine APIs)."""
    engines = {"vllm": "talan_serve/plugins/vllm", "sglang": "talan_serve/plugins/sglang"}
    for engine, folder in engines.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name == "_compat.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom)
                         and not node.level else [])
                for module in names:
                    assert module.split(".")[0] != engine, f"{path}: imports {module}"


def test_nothing_reads_outside_the_repository():
    """No module climbs above the repository's root from its own file (``parents[N]`` past
    the root) or by a relative ``../`` path."""
    found = []
    for path in sorted(REPO.rglob("*.py")):
        relative = path.relative_to(REPO)
        if relative.parts[0].startswith("."):
            continue  # virtual environments, caches
        deepest = len(relative.parts) - 1  # parents[deepest] of this file is the root
        for number, line in enumerate(path.read_text().splitlines(), 1):
            climbs = [int(n) for n in re.findall(r"__file__.*parents\[(\d+)\]", line)]
            if any(n > deepest for n in climbs) or re.search(r"[\"']\.\./", line):
                found.append(f"{relative}:{number}: {line.strip()}")
    assert not found, found
