"""Inference never imports training: neither at import time nor inside a function (a function-local import
hides the graph from a plain ``import`` check, so the source's import statements are walked too)."""

import ast
import os
import subprocess
import sys

import pytest

import fastflow

INFERENCE = ("predict", "export", "invert")
TRAINING = ("train", "distributed")
PACKAGE_DIR = os.path.dirname(fastflow.__file__)


def _module_file(name: str) -> str | None:
    path = os.path.join(PACKAGE_DIR, *name.split("."))
    for candidate in (path + ".py", os.path.join(path, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _imports(name: str) -> set[str]:
    """fastflow modules (names relative to the package) that module ``name`` imports anywhere in its source."""
    path = _module_file(name)
    found = set()
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from . import x
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                stem = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("fastflow"):
                stem = node.module.partition(".")[2]
            else:
                continue
            for alias in node.names:  # "from . import x" may name a submodule
                sub = f"{stem}.{alias.name}" if stem else alias.name
                found.add(sub if _module_file(sub) else stem)
        elif isinstance(node, ast.Import):
            found |= {a.name.partition(".")[2] for a in node.names if a.name.startswith("fastflow.")}
    return {m for m in found if m and _module_file(m)}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += _imports(name)
    return seen


@pytest.mark.parametrize("module", INFERENCE)
def test_no_import_statement_reachable_from_inference_leads_to_training(module):
    mods = reachable(module)
    assert not set(TRAINING) & mods, f"fastflow.{module} reaches {sorted(set(TRAINING) & mods)}"
    assert {"model", "flow"} <= mods  # sanity: the walk follows imports


def test_the_walk_finds_function_local_imports():
    assert "train" in reachable("demo")  # demo imports train inside run_demo: the walk must see it
    assert "train" in reachable("cli")


def test_importing_inference_modules_loads_no_training_code():
    code = ("import sys; import fastflow.predict, fastflow.export, fastflow.invert; "
            f"print(' '.join(m for m in {tuple('fastflow.' + t for t in TRAINING)!r} if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported {out.stdout.strip()}"
