"""Code shape rules of issue 18: no function in src/ longer than 60 lines, so each can be read at once."""

import ast
from pathlib import Path

MAX_LINES = 60
SRC = Path(__file__).resolve().parents[1] / "src" / "fastflow"  # this checkout's, whatever is installed


def _long_functions(root: Path, limit: int) -> list[str]:
    """``path:line name (N lines)`` for every function or method (nested ones too) of more than ``limit``
    lines, counted from its ``def`` (decorators excluded) to its last line, docstring included."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_the_checker_finds_a_long_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"        x{i} = {i}" for i in range(5))  # a method: def line + 5 lines
    (pkg / "m.py").write_text(f"def short():\n    return 1\n\n\nclass A:\n    def long(self):\n{body}\n")
    assert _long_functions(pkg, 5) == ["pkg/m.py:6 long (6 lines)"]
    assert _long_functions(pkg, 6) == []


def test_no_function_in_src_is_longer_than_60_lines():
    assert SRC.name == "fastflow" and (SRC / "__init__.py").is_file()
    offenders = _long_functions(SRC, MAX_LINES)
    assert not offenders, f"functions over {MAX_LINES} lines (split them into named steps):\n" + "\n".join(offenders)
