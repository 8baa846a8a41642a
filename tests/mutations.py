"""Break each implementation detail of DETAILS.md on purpose, one at a time, and check that its tests fail.

    python tests/mutations.py                       # every row (about 3 minutes on 2 cores)
    python tests/mutations.py --only "value loss clipping" "GAE"
    python tests/mutations.py --list                # the rows and their breaks
    python tests/mutations.py --each-script         # each script's break alone, against its own tests
    python tests/mutations.py --jobs 2              # two breaks at a time (a core each)

Each row's `break` column is the smallest careless edit of that detail: `old` → `new`, made in each of
the row's scripts (or in the one script named first in the cell). For each row, the runner copies the
project to a temporary folder, makes that one break there, and runs the row's own tests (its `checked
by` column) on the copy. The break must make at least one of them fail; a break that survives means the
row needs a stronger test. Exit status 1 if any survived.

With --each-script, a row of several scripts is checked once per script: the break is made in that script
alone, and only the row's tests that cover that script run (a test followed by a bracket naming one script
covers that script alone). So one script's tests cannot stand in for another's. A break in Part B is the
exception: Part B is the same text in every script (a test in tests/test_core.py keeps it so), so its break is
made in all of them at once, as without --each-script.
"""

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from details import ROOT, modules, read_map, replacements, row_id, tests_of  # noqa: E402

PART_B = "\n# Part B: running the experiment\n"
COPIED = ("ppo_discrete.py", "ppo_continuous.py", "ppo_atari.py", "README.md", "DETAILS.md", "tests", "benchmark")


def all_rows() -> list[dict]:
    return [row for rows in read_map().values() for row in rows]


def break_files(row: dict) -> list[str]:
    """The scripts the break is made in: the one named first in the cell, or every script of the row."""
    named = re.match(r"\s*`(ppo_\w+\.py)`:", row["break"])
    return [named.group(1)] if named else [f"{m}.py" for m in modules(row)]


def copy_project(dest: str) -> None:
    for name in COPIED:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name), ignore=shutil.ignore_patterns("__pycache__", "results"))
        else:
            shutil.copy(src, dest)


def make_break(row: dict, root: str, script: str = None) -> None:
    for path in [script] if script else break_files(row):
        full = os.path.join(root, path)
        with open(full) as f:
            text = f.read()
        for old, new in replacements(row):
            if text.count(old) != 1:
                raise ValueError(f"the break's `{old}` is in {path} {text.count(old)} times, not once: update the row")
            text = text.replace(old, new)
        with open(full, "w") as f:
            f.write(text)


def check(row: dict, script: str = None, timeout: float = 900) -> tuple[bool, float, str]:
    """(caught, seconds, the end of pytest's output) for one row's break: in all its scripts, or in script
    alone against the row's tests that cover it."""
    start = time.time()
    tests = tests_of(row, script and script.removesuffix(".py"))
    if not tests:
        return False, 0.0, f"no test of the row covers {script}"
    with tempfile.TemporaryDirectory() as root:
        copy_project(root)
        make_break(row, root, script)
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    if out.returncode not in (0, 1):  # 2-5: pytest itself failed (no tests collected, usage error)
        raise RuntimeError(f"pytest could not run the tests of '{row_id(row)}':\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    tail = "\n".join(line for line in out.stdout.splitlines() if line.startswith(("FAILED", "ERROR")))
    return out.returncode == 1, time.time() - start, tail or out.stdout.strip().splitlines()[-1]


def in_part_b(row: dict) -> bool:
    """Whether every text the row's break replaces lies below the Part B banner, in each of its scripts."""
    for path in break_files(row):
        with open(os.path.join(ROOT, path)) as f:
            text = f.read()
        if any(text.find(old) < text.index(PART_B) for old, _ in replacements(row)):
            return False
    return True


def cases(rows: list[dict], each_script: bool) -> list[tuple[dict, str]]:
    """(row, script) pairs to check; script None makes the break in all the row's scripts at once."""
    def split(row):
        return each_script and len(break_files(row)) > 1 and not in_part_b(row)

    return [(row, script) for row in rows for script in (break_files(row) if split(row) else [None])]


def case_id(row: dict, script: str = None) -> str:
    return row_id(row) + (f" [{script}]" if script else "")


def check_all(todo: list[tuple[dict, str]], jobs: int = 1):
    """check() each (row, script) case, `jobs` at a time; yields (case, its result) as each one ends. A case
    that cannot run (its break no longer applies, pytest cannot start, a timeout) counts as not caught,
    with the reason, and the others go on."""
    def safe_check(row, script):
        start = time.time()
        try:
            return check(row, script)
        except Exception as e:  # noqa: BLE001 -- reported as this case's result
            return False, time.time() - start, f"could not run: {type(e).__name__}: {str(e).splitlines()[0]}"

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:  # the work is in pytest subprocesses
        futures = {pool.submit(safe_check, row, script): (row, script) for row, script in todo}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="rows whose detail starts with one of these")
    parser.add_argument("--list", action="store_true", help="list the rows and their breaks, run nothing")
    parser.add_argument("--each-script", action="store_true", help="break each script of a row alone")
    parser.add_argument("--jobs", type=int, default=1, help="breaks checked at the same time")
    args = parser.parse_args(argv)
    rows = [r for r in all_rows() if args.only is None or any(r["detail"].startswith(o) for o in args.only)]
    if args.list:
        for row in rows:
            print(f"{row_id(row)}: {row['break']}")
        return 0
    survived, todo = [], cases(rows, args.each_script)
    for i, ((row, script), (caught, seconds, tail)) in enumerate(check_all(todo, args.jobs), 1):
        print(f"[{i}/{len(todo)}] {'caught  ' if caught else 'SURVIVED'} {case_id(row, script)} ({seconds:.0f} s)"
              + f"\n    {tail.splitlines()[0]}", flush=True)
        if not caught:
            survived.append(case_id(row, script))
    print(f"{len(todo) - len(survived)} of {len(todo)} breaks caught" +
          (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
