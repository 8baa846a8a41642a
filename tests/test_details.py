"""DETAILS.md names only what exists: part one holds the details of Huang et al. 2022, numbered as there; every
function in a row's `where` is in each script of the row, every test in its `checked by` is a test function of one
file named above its table, and every row has a break (tests/breaks.py) found once in each script it is made in."""

import importlib
import os

import pytest

from breaks import BREAKS
from details import ROOT, break_of, checked_tests, files_of, modules, names, number, read_map, row_id
from mutations import break_files

SECTIONS = read_map()
ROWS = [row for rows in SECTIONS.values() for row in rows]
IDS = [row_id(row) for row in ROWS]
# Huang et al. 2022's lists, in the paper's order: each a section of part one.
PAPER = {
    "13 core details": 13,
    "9 Atari details": 9,
    "9 continuous-control details": 9,
    "5 LSTM details (`--lstm`)": 5,
    "1 MultiDiscrete detail": 1,
}


def has(module: str, dotted: str) -> bool:
    obj = importlib.import_module(module)
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def test_part_one_holds_the_details_of_huang_et_al_numbered_as_there_and_every_break_has_a_row():
    assert list(SECTIONS)[: len(PAPER)] == list(PAPER), "part one's sections are the paper's lists, in its order"
    for heading, count in PAPER.items():
        numbers = [number(row) for row in SECTIONS[heading]]
        assert numbers == list(range(1, count + 1)), f"section '{heading}' is numbered {numbers}"
    for heading in list(SECTIONS)[len(PAPER) :]:
        numbered = [row["detail"] for row in SECTIONS[heading] if number(row) is not None]
        assert not numbered, f"part two's rows are not numbered: {numbered}"
    assert len(set(IDS)) == len(IDS), "two rows share a break"
    assert not set(BREAKS) - set(IDS), f"breaks of no row: {sorted(set(BREAKS) - set(IDS))}"


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_every_name_in_where_exists_in_its_scripts(row):
    assert names(row), f"row '{row['detail']}' names no function in `where`"
    missing = [f"{m}.{name}" for m in modules(row) for name in names(row) if not has(m, name)]
    assert not missing, f"row '{row['detail']}' names what does not exist: {', '.join(missing)}"


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_every_test_in_checked_by_exists_in_one_file_above_its_table(row):
    assert row["files"], f"row '{row['detail']}': no line 'Tests in `tests/<file>.py`' above its table"
    assert checked_tests(row), f"row '{row['detail']}' names no test"
    for test in checked_tests(row):
        found = files_of(row, test)
        assert len(found) == 1, f"row '{row_id(row)}': {test} is defined in {found or 'none'} of {row['files']}"


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_every_row_has_a_break_found_once_in_each_of_its_scripts(row):
    assert break_of(row) and break_of(row)["edits"], f"row '{row_id(row)}' has no break in tests/breaks.py"
    for path in break_files(row):
        with open(os.path.join(ROOT, path)) as f:
            text = f.read()
        for old, _ in break_of(row)["edits"]:
            assert text.count(old) == 1, f"row '{row_id(row)}': `{old}` is in {path} {text.count(old)} times, not once"
