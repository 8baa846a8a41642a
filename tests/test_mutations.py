"""Every implementation detail of DETAILS.md is shown to catch the break it claims to catch: its break,
made alone in a copy of the project, makes at least one of its tests fail (tests/mutations.py)."""

import pytest

from details import row_id
from mutations import all_rows, check

ROWS = all_rows()


@pytest.mark.parametrize("row", ROWS, ids=[row_id(r) for r in ROWS])
def test_the_break_of_every_detail_is_caught_by_its_tests(row):
    caught, _, tail = check(row)
    assert caught, f"the break of '{row_id(row)}' ({row['break']}) survived its tests ({tail}): strengthen them"
