"""The layout rules the house keeps: no import cycles (imports inside functions count), small files
and functions, and exporters/ independent of compressor/ except for the error classes and the staged
write (compressor/fileio.py)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("compressor", "exporters")
SIZED = (*PACKAGES, "benchmarks")  # the scripts keep the package's size rules too
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 100
STANDALONE = {"exporters/trt_build.py"}  # the TensorRT build script runs on the device, on its own


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources(packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    return {module_name(p): p for package in packages for p in sorted((ROOT / package).rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules a file imports, anywhere in it (`from a.b import c` is a.b.c if that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known}
    return found - {name}


def graph() -> dict[str, set[str]]:
    files = sources()
    return {name: imported(path, name, set(files)) for name, path in files.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_exporters_import_only_the_errors_and_the_staged_write_of_compressor():
    for name, targets in graph().items():
        if name.startswith("exporters"):
            allowed = {"compressor.errors", "compressor.fileio"}
            assert {t for t in targets if t.startswith("compressor")} <= allowed, name


def test_files_and_functions_are_small():
    checked = sources(SIZED)
    assert any(name.startswith("benchmarks.") for name in checked)
    for path in checked.values():
        relative = str(path.relative_to(ROOT))
        if relative in STANDALONE:
            continue
        text = path.read_text()
        assert len(text.splitlines()) <= MAX_FILE_LINES, f"{relative}: {len(text.splitlines())} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= MAX_FUNCTION_LINES, f"{relative}:{node.lineno} {node.name}: {length} lines"


def test_every_package_is_installed():
    """pyproject's explicit package list names every folder of compressor/ and exporters/ (a missing one
    would work in this checkout and fail when installed)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {module_name(p) for package in PACKAGES for p in (ROOT / package).rglob("__init__.py")}
    assert folders <= listed, folders - listed
