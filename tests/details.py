"""DETAILS.md as data: its tables of implementation details, joined with the break of each row (tests/breaks.py).

A row has three columns: detail, where and checked by. `where` names the functions that hold the detail, in
backticks, after the scripts that have it when not all three do (`ppo_continuous.py`: `make_envs`); `checked by`
names tests as backticked tests/<file>.py::<test>. A `|` inside a cell is written `\\|`.
"""

import os
import re

from breaks import BREAKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["detail", "where", "checked by"]
SCRIPTS = ["ppo_discrete", "ppo_continuous", "ppo_atari"]
BACKTICKED = re.compile(r"`([^`]+)`")
TEST = re.compile(r"`(tests/[^`]+)`")
SCRIPT_NAMES = re.compile(r"^((?:\s*`ppo_\w+\.py`,?)+)\s*:")


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
            elif header == COLUMNS and not set(line.strip()) <= set("|-: "):  # a row, not the |---| line
                sections.setdefault(heading, []).append(dict(zip(COLUMNS, cells(line) + [""] * 3)))
    return sections


def row_id(row: dict) -> str:
    """The row's name in tests/breaks.py: the longest key its detail starts with (else the detail up to a colon)."""
    return next(
        (key for key in sorted(BREAKS, key=len, reverse=True) if row["detail"].startswith(key)),
        row["detail"].split(":")[0],
    )


def modules(row: dict) -> list[str]:
    """The scripts that have the detail: those named at the start of `where`, or all three."""
    named = SCRIPT_NAMES.match(row["where"])
    return [s.removesuffix(".py") for s in BACKTICKED.findall(named.group(1))] if named else list(SCRIPTS)


def names(row: dict) -> list[str]:
    """The functions (and classes, methods) `where` names, without the scripts."""
    named = SCRIPT_NAMES.match(row["where"])
    return BACKTICKED.findall(row["where"][named.end() if named else 0 :])


def checks_of(row: dict) -> list[str]:
    return TEST.findall(row["checked by"])


def break_of(row: dict) -> dict:
    """{"edits": [(old, new), ...], "only": a script the break is made in alone, or None}."""
    entry = BREAKS.get(row_id(row))
    return None if entry is None else {"edits": entry["edits"], "only": entry.get("only")}
