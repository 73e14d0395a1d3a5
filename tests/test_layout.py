"""The house rules of the layout: no import cycles, every package installed, the README's names exist."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    if path.is_relative_to(ROOT / "kernels"):
        parts = ("llama_ref", "kernels") + path.relative_to(ROOT / "kernels").with_suffix("").parts
    else:
        parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    files = list((ROOT / "llama_ref").rglob("*.py")) + list((ROOT / "kernels").glob("*.py"))
    return {_module_name(p): p for p in files}


def _top_level_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The llama_ref modules `name` imports when it is imported (statements at module level only:
    an import inside a function runs when it is called, and a TYPE_CHECKING block never runs)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _top_level_imports(name, path, modules) for name, path in modules.items()}
    assert _cycles(graph) == []


def test_the_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_every_package_is_installed():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {_module_name(p) for p in (ROOT / "llama_ref").rglob("__init__.py")} | {"llama_ref.kernels"}
    assert packages == listed


def test_every_module_imports():
    for name in sorted(_modules()):
        if name.startswith("llama_ref.server") or name.endswith("__main__"):
            continue  # the server needs the [server] extra (tests/test_server.py); __main__ runs the CLI
        importlib.import_module(name)


def test_names_the_readme_uses_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    names = set(re.findall(r"\bllama_ref(?:\.\w+)+", readme))
    assert len(names) > 5
    for dotted in sorted(names):
        parts = dotted.split(".")
        obj = importlib.import_module(parts[0])
        for i, attr in enumerate(parts[1:], start=1):
            if not hasattr(obj, attr):
                obj = importlib.import_module(".".join(parts[: i + 1]))
            else:
                obj = getattr(obj, attr)
