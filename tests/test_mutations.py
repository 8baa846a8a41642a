"""Every implementation detail of DETAILS.md is shown to catch the break it claims to catch: its break,
made alone in a copy of the project, makes at least one of its tests fail (tests/mutations.py). Each
script's break is made alone and checked against the tests that cover that script (--each-script), two
breaks at a time: one script's tests cannot stand in for another's."""

import pytest

from mutations import all_rows, case_id, cases, check_all

CASES = cases(all_rows(), each_script=True)
IDS = [case_id(*case) for case in CASES]


@pytest.fixture(scope="module")
def outcomes(request) -> dict:
    """The result of every selected case, checked two at a time (the cases' work is in subprocesses)."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_the_break_of_every_detail_is_caught_by_its_tests"]
    return {case_id(*case): result for case, result in check_all(selected, jobs=2)}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_break_of_every_detail_is_caught_by_its_tests(case, outcomes):
    row, script = case
    caught, _, tail = outcomes[case_id(row, script)]
    where = f" made in {script} alone" if script else ""
    assert caught, f"the break of '{case_id(row, script)}' ({row['break']}){where} survived its tests ({tail}): strengthen them"
