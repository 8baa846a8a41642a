"""The code is formatted by ruff and passes its checks (ruff.toml), so a hand-packed line cannot come back."""

import ast
import os
import subprocess
import sys

from helpers import ROOT, SCRIPTS


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_the_code_is_formatted_by_ruff():
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, f"run `ruff format .`:\n{result.stdout}{result.stderr}"


def test_ruff_check_passes():
    result = ruff("check", ".")
    assert result.returncode == 0, f"ruff check found:\n{result.stdout}{result.stderr}"


def test_one_idea_per_statement_in_the_scripts():
    # No parallel assignment of three or more values, and no conditional expression inside another.
    for script in SCRIPTS:
        tree = ast.parse(open(os.path.join(ROOT, f"{script}.py")).read())
        packed = [
            node.lineno
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Tuple)
            and isinstance(node.value, ast.Tuple)
            and len(node.value.elts) >= 3
        ]
        nested = [
            node.lineno
            for node in ast.walk(tree)
            if isinstance(node, ast.IfExp) and any(isinstance(n, ast.IfExp) for n in ast.walk(node) if n is not node)
        ]
        assert not packed and not nested, (
            f"{script}.py: packed assignments at {packed}, nested conditionals at {nested}"
        )
