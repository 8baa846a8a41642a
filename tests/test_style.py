"""The code is formatted by ruff and passes its checks (ruff.toml), so a hand-packed line cannot come back."""

import subprocess
import sys

from helpers import ROOT


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_the_code_is_formatted_by_ruff():
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, f"run `ruff format .`:\n{result.stdout}{result.stderr}"


def test_ruff_check_passes():
    result = ruff("check", ".")
    assert result.returncode == 0, f"ruff check found:\n{result.stdout}{result.stderr}"
