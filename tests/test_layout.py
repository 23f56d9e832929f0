"""The code's layout rules, checked on the source (no imports, no builds): imports inside the
package are absolute, no module reaches for another module's private names, and the modules'
imports form no cycle (a stage imports the stages before it, never after)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed package name of each source folder (pyproject's package-dir).
FOLDERS = {"dwsep_compiler": "dwsep_compiler", "passes": "dwsep_compiler.passes",
           "schedules": "dwsep_compiler.schedules"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _imports(tree: ast.AST):
    """``(module, name or None, node)`` for every import in ``tree`` (function bodies too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                yield ("." * node.level) + (node.module or ""), alias.name, node


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _ours(module: str) -> str | None:
    """The module of ours that ``module`` names (or its closest package), else None."""
    while module:
        if module in MODULES:
            return module
        module = module.rpartition(".")[0]
    return None


def test_the_source_folders_are_found():
    assert "dwsep_compiler.compile.cpu" in MODULES
    assert "dwsep_compiler.passes.lowering.fuse_dwpw" in MODULES
    assert "dwsep_compiler.schedules.analysis" in MODULES


# Tests and benchmarks import the package (and the tests' shared modules) like any user.
SCRIPTS = {str(path.relative_to(ROOT)): path for folder in ("tests", "bench", "examples")
           for path in sorted((ROOT / folder).rglob("*.py"))}
SHARED_TEST_MODULES = {path.stem for path in SCRIPTS.values() if not path.stem.startswith("test_")}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_tests_and_benchmarks_use_public_names_only(name):
    tree = ast.parse(SCRIPTS[name].read_text())
    for target, imported, node in _imports(tree):
        ours = _ours(target) or target in SHARED_TEST_MODULES or target.startswith("test_")
        assert not (target.startswith("test_") and imported), \
            f"{name}:{node.lineno}: imports from another test module ({target})"
        if ours and imported is not None:
            assert not _private(imported), f"{name}:{node.lineno}: imports {target}.{imported}"
    _check_private_attributes(name, tree)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_are_absolute_and_public(module):
    tree = ast.parse(MODULES[module].read_text())
    for target, name, node in _imports(tree):
        assert not target.startswith("."), f"{module}:{node.lineno}: relative import"
        if _ours(target) and name is not None:
            assert not _private(name), f"{module}:{node.lineno}: imports {target}.{name}"
    _check_private_attributes(module, tree)


def _check_private_attributes(where: str, tree: ast.AST) -> None:
    """No ``module._private`` through a module of ours imported by name."""
    aliases = {alias.asname or alias.name.split(".")[0]
               for target, _, node in _imports(tree) if _ours(target) for alias in node.names}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr)
                and isinstance(node.value, ast.Name) and node.value.id in aliases):
            raise AssertionError(f"{where}:{node.lineno}: {node.value.id}.{node.attr}")
        # monkeypatch.setattr(module, "_private", ...) / setattr(module, "_private", ...)
        if (isinstance(node, ast.Call) and len(node.args) >= 2
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "setattr"
                and isinstance(node.args[0], ast.Name) and node.args[0].id in aliases
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
                and _private(node.args[1].value)):
            raise AssertionError(f"{where}:{node.lineno}: setattr of "
                                 f"{node.args[0].id}.{node.args[1].value}")


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        edges = set()
        for target, name, _ in _imports(ast.parse(path.read_text())):
            for candidate in ([f"{target}.{name}"] if name else []) + [target]:
                found = _ours(candidate)
                if found and found != module:
                    edges.add(found)
                    break
        # a package's __init__ is imported with any of its modules, but it is not a stage
        graph[module] = {e for e in edges if not module.startswith(e + ".")}
    return graph


def test_no_import_cycle():
    graph, state, stack = _graph(), {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_importing_the_package_and_the_cli_does_not_import_tvm():
    """The CLI's --help, the device runner and the emulator stay light: TVM is imported by the
    stages that use it, on first use."""
    import subprocess
    import sys

    code = "import sys, dwsep_compiler, dwsep_compiler.cli; print('tvm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
