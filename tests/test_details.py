"""DETAILS.md names only what exists: every function in a row's `where` is in each script of the row, every test in
its `checked by` is a test function of that file, and every row has a break (tests/breaks.py) found once in each
script it is made in."""

import ast
import functools
import importlib
import os
import re

import pytest

from breaks import BREAKS
from details import ROOT, break_of, checks_of, modules, names, read_map, row_id
from mutations import break_files

SECTIONS = read_map()
ROWS = [row for rows in SECTIONS.values() for row in rows]
IDS = [row_id(row) for row in ROWS]


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
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_the_map_has_every_detail_of_huang_et_al_and_every_break_a_row():
    for heading, least in zip(SECTIONS, [13, 9, 9, 5]):
        assert len(SECTIONS[heading]) >= least, f"section '{heading}' has fewer rows than its {least} details"
    assert not set(BREAKS) - set(IDS), f"breaks of no row: {sorted(set(BREAKS) - set(IDS))}"


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_every_name_in_where_exists_in_its_scripts(row):
    assert names(row), f"row '{row['detail']}' names no function in `where`"
    missing = [f"{m}.{name}" for m in modules(row) for name in names(row) if not has(m, name)]
    assert not missing, f"row '{row['detail']}' names what does not exist: {', '.join(missing)}"


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_every_test_in_checked_by_exists(row):
    assert checks_of(row), f"row '{row['detail']}' names no test"
    for ref in checks_of(row):
        path, _, name = ref.partition("::")
        assert re.fullmatch(r"tests/test_\w+\.py", path) and name, f"{ref} is not of the form tests/<file>.py::<test>"
        assert os.path.isfile(os.path.join(ROOT, path)) and name in defined_tests(path), f"{ref} does not exist"


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_every_row_has_a_break_found_once_in_each_of_its_scripts(row):
    assert break_of(row) and break_of(row)["edits"], f"row '{row_id(row)}' has no break in tests/breaks.py"
    for path in break_files(row):
        with open(os.path.join(ROOT, path)) as f:
            text = f.read()
        for old, _ in break_of(row)["edits"]:
            assert text.count(old) == 1, f"row '{row_id(row)}': `{old}` is in {path} {text.count(old)} times, not once"
