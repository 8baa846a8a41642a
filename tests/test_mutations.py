"""Every implementation detail of DETAILS.md is shown to catch the break it claims to catch: its break, made alone in
a copy of the project, in one script at a time, makes at least one of the row's tests of that script fail
(tests/mutations.py), two breaks at a time."""

import pytest

from mutations import all_rows, case_id, cases, check_all

CASES = cases(all_rows())
IDS = [case_id(*case) for case in CASES]


@pytest.fixture(scope="module")
def outcomes(request) -> dict:
    """The result of every selected case, checked two at a time (the cases' work is in processes of their own)."""
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_the_break_of_every_detail_is_caught_by_its_tests"
    ]
    return {case_id(*case): result for case, result in check_all(selected, jobs=2)}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_break_of_every_detail_is_caught_by_its_tests(case, outcomes):
    caught, _, tail = outcomes[case_id(*case)]
    assert caught, f"the break of '{case_id(*case)}' survived its tests ({tail}): strengthen them"
