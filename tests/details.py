"""DETAILS.md as data: its tables of implementation details, each row with the break that must be caught.

A row has five columns: detail, scripts (all, or some of discrete, continuous, atari), where (backticked
names of the scripts), checked by (backticked tests/<file>.py::<test>), and break: the smallest careless
edit of that detail, as one or more `old` → `new` replacements made in each of the row's scripts. A `|`
inside a cell is written `\\|`.
"""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["detail", "scripts", "where", "checked by", "break"]
MODULES = {"discrete": "ppo_discrete", "continuous": "ppo_continuous", "atari": "ppo_atari"}
BACKTICKED = re.compile(r"`([^`]+)`")
TEST_WITH_NOTE = re.compile(r"`(tests/[^`]+)`(?:\s*\(([^)]*)\))?")
REPLACEMENT = re.compile(r"`([^`]+)` → `([^`]*)`")


def cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def read_map(path: str = os.path.join(ROOT, "DETAILS.md")) -> dict[str, list[dict[str, str]]]:
    """{section heading: its rows, each as {column: cell}}, from every table with the detail columns."""
    sections, heading, header = {}, None, None
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                heading = line.strip("# \n")
            if not line.startswith("|"):
                header = None
            elif header is None:
                header = cells(line)
            elif header[:4] == COLUMNS[:4] and not set(line.strip()) <= set("|-: "):  # a row, not the |---| line
                row = cells(line) + [""] * len(COLUMNS)  # a missing cell reads as empty
                sections.setdefault(heading, []).append(dict(zip(COLUMNS, row)))
    return sections


def row_id(row: dict) -> str:
    return row["detail"].split(":")[0]


def modules(row: dict) -> list[str]:
    names = row["scripts"].replace("`", "")
    scripts = list(MODULES) if names == "all" else [s.strip() for s in names.split(",")]
    unknown = [s for s in scripts if s not in MODULES]
    assert not unknown, f"row '{row['detail']}': unknown script(s) {unknown} in `scripts` (use all, or {', '.join(MODULES)})"
    return [MODULES[s] for s in scripts]


def tests_of(row: dict, module: str = None) -> list[str]:
    """The pytest node ids of the row's `checked by` column; with module, only the tests that cover that
    script (a test followed by a bracket that starts with a script's name covers that script alone)."""
    tests = []
    for test, note in TEST_WITH_NOTE.findall(row["checked by"]):
        only = re.match(r"(discrete|continuous|atari)\b", note)
        if module is None or only is None or MODULES[only.group(1)] == module:
            tests.append(test)
    return tests


def replacements(row: dict) -> list[tuple[str, str]]:
    return REPLACEMENT.findall(row["break"])
