"""Installs carry every package and resolve statically: pyproject.toml lists the packages by
hand (passes/ and schedules/ are dwsep_compiler's through links), and the editable install of
tests/run.sh is one that static tools read."""

from __future__ import annotations

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_package_in_the_tree_is_installed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        tool = tomllib.load(f)["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = set()
    base = os.path.join(ROOT, "dwsep_compiler")
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        if "__init__.py" in filenames:
            rel = os.path.relpath(dirpath, base)
            found.add("dwsep_compiler" if rel == "." else "dwsep_compiler." + rel.replace(os.sep, "."))
    assert {"dwsep_compiler.passes.lowering", "dwsep_compiler.schedules.cpu"} <= found
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert listed - found == set(), f"listed packages not in the tree: {sorted(listed - found)}"


def test_passes_and_schedules_are_the_package_through_links():
    """The top-level folders users asked for are the package's own (no remapping): a link each."""
    for name in ("passes", "schedules"):
        link = os.path.join(ROOT, "dwsep_compiler", name)
        assert os.path.islink(link) and os.readlink(link) == os.path.join("..", name)


def test_static_tools_resolve_every_module_of_the_editable_install():
    """tests/run.sh installs in setuptools' strict editable mode: a tree of links under build/
    put on sys.path by a .pth file. Static tools (pyright, jedi, an IDE) read sys.path and the
    folders, not import hooks; so every module must be found by the plain path finder,
    without the repository on the path and without the lenient mode's meta-path finder."""
    script = r"""
import ast, importlib.machinery, os, sys
root = sys.argv[1]
path = [p for p in sys.path if p and os.path.abspath(p) != root]
def find(name):
    head, _, tail = name.rpartition(".")
    where = path if not head else find(head).submodule_search_locations
    spec = importlib.machinery.PathFinder.find_spec(name, where)
    if spec is None:
        raise SystemExit(f"not found by the path finder: {name} (a module added since the "
                     "install? strict mode links files at install: rerun tests/run.sh's pip line)")
    return spec
for name in sys.argv[2:]:
    find(name)
print("ok")
"""
    import subprocess
    import sys

    modules = []
    for folder, package in (("dwsep_compiler", "dwsep_compiler"), ("passes", "dwsep_compiler.passes"),
                            ("schedules", "dwsep_compiler.schedules")):
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            modules += [prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"
                        for f in filenames if f.endswith(".py")]
    out = subprocess.run([sys.executable, "-c", script, ROOT, *sorted(modules)], cwd="/",
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.stdout + out.stderr)[-2000:]
