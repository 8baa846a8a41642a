"""DETAILS.md as data: its tables of implementation details, joined with the break of each row (tests/breaks.py).

A table has three columns: detail, where and checked by. A detail of Huang et al. 2022 starts with its number in
the paper's list ("9. value function loss clipping: ..."). `where` names the functions that hold the detail, in
backticks, after the scripts that have it when not all three do (`ppo_continuous.py`: `make_envs`); `checked by`
names test functions in backticks, each defined in one of the test files that the line "Tests in ..." above the
table names. A `|` inside a cell is written `\\|`.
"""

import ast
import functools
import os
import re

from breaks import BREAKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["detail", "where", "checked by"]
SCRIPTS = ["ppo_discrete", "ppo_continuous", "ppo_atari"]
BACKTICKED = re.compile(r"`([^`]+)`")
TEST_FILE = re.compile(r"`(tests/test_\w+\.py)`")
SCRIPT_NAMES = re.compile(r"^((?:\s*`ppo_\w+\.py`,?)+)\s*:")
NUMBER = re.compile(r"^(\d+)\.\s+")


def cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def read_map(path: str = os.path.join(ROOT, "DETAILS.md")) -> dict[str, list[dict]]:
    """{section heading: its rows, each as {column: cell} and "files": the test files named above its table}."""
    sections = {}
    heading = header = None
    files = []
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                heading = line.strip("# \n")
                files = []
            if line.startswith("Tests in "):
                files = TEST_FILE.findall(line)
            if not line.startswith("|"):
                header = None
            elif header is None:
                header = cells(line)
            elif header == COLUMNS and not set(line.strip()) <= set("|-: "):  # a row, not the |---| line
                row = dict(zip(COLUMNS, cells(line) + [""] * 3))
                sections.setdefault(heading, []).append({**row, "files": files})
    return sections


def number(row: dict) -> int | None:
    """The detail's number in the paper's list, or None for the project's own."""
    numbered = NUMBER.match(row["detail"])
    return int(numbered.group(1)) if numbered else None


def title(row: dict) -> str:
    """The detail without its number."""
    return NUMBER.sub("", row["detail"])


def row_id(row: dict) -> str:
    """The row's name in tests/breaks.py: the longest key its detail starts with (else the detail up to a colon)."""
    return next(
        (key for key in sorted(BREAKS, key=len, reverse=True) if title(row).startswith(key)),
        title(row).split(":")[0],
    )


def modules(row: dict) -> list[str]:
    """The scripts that have the detail: those named at the start of `where`, or all three."""
    named = SCRIPT_NAMES.match(row["where"])
    return [s.removesuffix(".py") for s in BACKTICKED.findall(named.group(1))] if named else list(SCRIPTS)


def names(row: dict) -> list[str]:
    """The functions (and classes, methods) `where` names, without the scripts."""
    named = SCRIPT_NAMES.match(row["where"])
    return BACKTICKED.findall(row["where"][named.end() if named else 0 :])


@functools.cache
def defined_tests(path: str) -> frozenset[str]:
    """Names of the module-level test functions of a test file, read without importing it."""
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    return frozenset(n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_"))


def checked_tests(row: dict) -> list[str]:
    return BACKTICKED.findall(row["checked by"])


def files_of(row: dict, test: str) -> list[str]:
    """The files, of those named above the row's table, that define the test."""
    return [path for path in row["files"] if os.path.isfile(os.path.join(ROOT, path)) and test in defined_tests(path)]


def checks_of(row: dict) -> list[str]:
    """The row's tests as pytest names them, tests/<file>.py::<test>."""
    return [f"{path}::{test}" for test in checked_tests(row) for path in files_of(row, test)]


def break_of(row: dict) -> dict:
    """{"edits": [(old, new), ...], "only": a script the break is made in alone, or None}."""
    entry = BREAKS.get(row_id(row))
    return None if entry is None else {"edits": entry["edits"], "only": entry.get("only")}
