"""DETAILS.md names only what exists: every function in a row's `where` column is in each script the row
applies to, and every test in its `checked by` column is a test function of that file."""

import ast
import functools
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["detail", "scripts", "where", "checked by"]
MODULES = {"discrete": "ppo_discrete", "continuous": "ppo_continuous", "atari": "ppo_atari"}
BACKTICKED = re.compile(r"`([^`]+)`")


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def read_map() -> dict[str, list[dict[str, str]]]:
    """{section heading: its rows, each as {column: cell}}, from every table with the four columns."""
    sections, heading, header = {}, None, None
    with open(os.path.join(ROOT, "DETAILS.md")) as f:
        for line in f:
            if line.startswith("#"):
                heading = line.strip("# \n")
            if not line.startswith("|"):
                header = None
            elif header is None:
                header = cells(line)
            elif header == COLUMNS and not set(line.strip()) <= set("|-: "):  # a row, not the |---| line
                row = cells(line) + [""] * len(COLUMNS)  # a missing cell reads as empty
                sections.setdefault(heading, []).append(dict(zip(COLUMNS, row)))
    return sections


SECTIONS = read_map()
ROWS = [row for rows in SECTIONS.values() for row in rows]
IDS = [row["detail"].split(":")[0] for row in ROWS]


def modules(row: dict) -> list[str]:
    names = row["scripts"].replace("`", "")
    scripts = list(MODULES) if names == "all" else [s.strip() for s in names.split(",")]
    unknown = [s for s in scripts if s not in MODULES]
    assert not unknown, f"row '{row['detail']}': unknown script(s) {unknown} in `scripts` (use all, or {', '.join(MODULES)})"
    return [MODULES[s] for s in scripts]


def has(module: str, dotted: str) -> bool:
    obj = importlib.import_module(module)
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


@functools.cache
def defined_tests(path: str) -> set[str]:
    """Names of the module-level test functions of a test file, read without importing it."""
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    return {node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")}


def test_the_map_has_every_detail_of_huang_et_al():
    assert len(SECTIONS) >= 4, f"DETAILS.md has {len(SECTIONS)} sections with a detail table, not the 3 of Huang et al. + ours"
    for (heading, rows), least in zip(SECTIONS.items(), [13, 9, 9]):
        assert len(rows) >= least, f"section '{heading}' has {len(rows)} rows, fewer than its {least} details"


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_every_name_in_where_exists_in_its_scripts(row):
    names = BACKTICKED.findall(row["where"])
    assert names, f"row '{row['detail']}' has no backticked name in `where`"
    missing = [f"{module}.{name}" for module in modules(row) for name in names if not has(module, name)]
    assert not missing, f"row '{row['detail']}' names what does not exist: {', '.join(missing)}"


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_every_test_in_checked_by_exists(row):
    refs = BACKTICKED.findall(row["checked by"])
    if not refs:
        assert row["checked by"] == "none yet", f"row '{row['detail']}': `checked by` names no test; write none yet"
    for ref in refs:
        path, _, name = ref.partition("::")
        assert re.fullmatch(r"tests/test_\w+\.py", path) and name, \
            f"row '{row['detail']}': {ref} is not of the form tests/<file>.py::<test_name>"
        assert os.path.isfile(os.path.join(ROOT, path)), f"row '{row['detail']}': {path} does not exist"
        assert name in defined_tests(path), f"row '{row['detail']}': {path} has no test function {name}"
