"""The direction of imports between loom's layers, and two code-shape limits, read from the sources (ast).

Every ``import`` and ``from ... import`` under src/loom counts: module level, inside functions, and
under ``if TYPE_CHECKING:`` (a type-only import still ties the two layers' code together). A layer is
the first package component under loom (``loom.engine.engine`` -> engine, ``loom.llm`` -> llm).

    layers   -> nothing from models, engine, serve, weights, llm, cli, or the lab
    models   -> nothing from engine, serve, llm, cli, or the lab
    native   -> nothing from loom but itself and the leaf helper loom.cache
    engine   -> nothing from serve, llm, cli, or the lab
    the serving core -> nothing from the lab (analysis, bench, compress, eval)
    analysis -> never bench (bench builds on analysis)
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from typing import Iterator

import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
PACKAGE = os.path.join(SRC, "loom")

LAB = {"analysis", "bench", "compress", "eval"}
CORE = {"config", "errors", "outputs", "sampling_params", "device", "default_model", "cache", "layers", "models",
        "weights", "tokenizer", "native", "engine", "serve"}
# layer -> the layers it must not import
FORBIDDEN = {
    "layers": {"models", "engine", "serve", "weights", "llm", "cli"} | LAB,
    "models": {"engine", "serve", "llm", "cli"} | LAB,
    "engine": {"serve", "llm", "cli"} | LAB,
    "core": LAB,
    "analysis": {"bench"},
}
NATIVE_MAY_IMPORT = {"native", "cache"}  # loom.native itself and the leaf helper loom.cache
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Import:
    path: str  # relative to the repository root
    line: int
    module: str  # the imported loom module, dotted (loom.engine.kv_cache)

    @property
    def target(self) -> str:
        """The imported module's layer ("" for the top-level package ``loom`` itself)."""
        parts = self.module.split(".")
        return parts[1] if len(parts) > 1 else ""

    def __str__(self) -> str:
        return f"{self.path}:{self.line} -> {self.module}"


def module_name(path: str) -> str:
    """src/loom/engine/engine.py -> loom.engine.engine; src/loom/engine/__init__.py -> loom.engine."""
    rel = os.path.relpath(path, SRC)[: -len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def is_module(dotted: str) -> bool:
    base = os.path.join(SRC, *dotted.split("."))
    return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py"))


def python_files(folder: str) -> list[str]:
    return sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files if f.endswith(".py"))


def reexports(package: str) -> dict[str, str]:
    """Names a loom package's __init__ imports from other loom modules: name -> that module."""
    init = os.path.join(SRC, *package.split("."), "__init__.py")
    if not os.path.isfile(init):
        return {}
    with open(init) as f:
        tree = ast.parse(f.read(), init)
    return {(a.asname or a.name): node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
            and node.module.split(".")[0] == "loom" for a in node.names}


def imports_in(source: str, path: str, module: str) -> Iterator[Import]:
    """The loom modules ``source`` (the module ``module``) imports, wherever the import statement is.

    ``from pkg import name`` resolves to the module pkg.name when there is one, else to the module
    the package's __init__ re-exports ``name`` from, else to pkg itself."""
    is_package = os.path.basename(path) == "__init__.py"
    rel = os.path.relpath(path, os.path.dirname(SRC))
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "loom":
                    yield Import(rel, node.lineno, a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package, up level - 1 more
                parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "loom":
                continue
            for a in node.names:
                if is_module(f"{base}.{a.name}"):
                    yield Import(rel, node.lineno, f"{base}.{a.name}")
                else:
                    yield Import(rel, node.lineno, reexports(base).get(a.name, base))


def all_imports() -> list[tuple[str, Import]]:
    """(importing layer, import) for every loom import under src/loom, once per (file, line, module)."""
    found: dict[Import, str] = {}
    for path in python_files(PACKAGE):
        module = module_name(path)
        layer = module.split(".")[1] if "." in module else ""
        with open(path) as f:
            source = f.read()
        found.update((imp, layer) for imp in imports_in(source, path, module))
    return [(layer, imp) for imp, layer in found.items()]


def violations(rule: str) -> list[str]:
    bad = []
    for layer, imp in all_imports():
        if rule == "native":
            if layer == "native" and imp.target not in NATIVE_MAY_IMPORT:
                bad.append(str(imp))
        elif rule == "core":
            if layer in CORE and imp.target in FORBIDDEN["core"]:
                bad.append(str(imp))
        elif layer == rule and imp.target in FORBIDDEN[rule]:
            bad.append(str(imp))
    return bad


def test_the_scanner_sees_every_kind_of_import(tmp_path):
    source = (
        "from __future__ import annotations\n"
        "import os\n"
        "import loom.engine.kv_cache\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from loom.engine.kv_cache import KVCache\n"
        "def f():\n"
        "    from loom import native, LLM\n"
        "    from ..bench import peers\n"
        "    from . import fused\n"
    )
    path = os.path.join(PACKAGE, "layers", "example.py")  # only named, never written
    got = [(i.line, i.module) for i in imports_in(source, path, "loom.layers.example")]
    assert got == [(3, "loom.engine.kv_cache"), (6, "loom.engine.kv_cache"), (8, "loom.native"), (8, "loom.llm"),
                   (9, "loom.bench.peers"), (10, "loom.layers.fused")]
    assert len(all_imports()) > 100  # the real tree is scanned


@pytest.mark.parametrize("rule", ["layers", "models", "native", "engine", "core", "analysis"])
def test_imports_point_down(rule):
    bad = violations(rule)
    assert not bad, f"{rule} imports what it must not:\n" + "\n".join(bad)


def functions(folder_or_file: str) -> Iterator[tuple[str, int, str, int]]:
    """(path, def line, name, lines from the def line to its last line) of every function and method."""
    paths = python_files(folder_or_file) if os.path.isdir(folder_or_file) else [folder_or_file]
    for path in paths:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield (os.path.relpath(path, os.path.dirname(SRC)), node.lineno, node.name,
                       node.end_lineno - node.lineno + 1)


def test_no_global_statement_in_models():
    found = []
    for path in python_files(os.path.join(PACKAGE, "models")):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        found += [f"{os.path.relpath(path, os.path.dirname(SRC))}:{n.lineno} global {', '.join(n.names)}"
                  for n in ast.walk(tree) if isinstance(n, ast.Global)]
    assert not found, "module state mutated from models/:\n" + "\n".join(found)


@pytest.mark.parametrize("part", ["serve", "cli"])
def test_functions_stay_short(part):
    where = os.path.join(PACKAGE, part)
    if part == "cli" and not os.path.isdir(where):
        where += ".py"  # while the CLI is still one file
    found = list(functions(where))
    assert found  # the scan sees the code
    long = [f"{path}:{line} {name}: {length} lines" for path, line, name, length in found
            if length >= MAX_FUNCTION_LINES]
    assert not long, f"functions of {MAX_FUNCTION_LINES} lines or more in {part}:\n" + "\n".join(long)
