"""DETAILS.md names only what exists: every function in a row's `where` column is in each script the row
applies to, and every test in its `checked by` column is a test function of that file."""

import ast
import functools
import importlib
import os
import re

import pytest

from details import BACKTICKED, ROOT, modules, read_map, replacements, row_id

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


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_every_break_is_found_exactly_once_in_each_of_its_scripts(row):
    from mutations import break_files

    pairs = replacements(row)
    assert pairs, f"row '{row['detail']}': `break` names no `old` → `new` replacement"
    for path in break_files(row):
        with open(os.path.join(ROOT, path)) as f:
            text = f.read()
        for old, _ in pairs:
            assert text.count(old) == 1, f"row '{row['detail']}': the break's `{old}` is in {path} {text.count(old)} times, not once"
