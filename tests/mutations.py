"""Break each implementation detail of DETAILS.md on purpose, one at a time, and check that its tests fail.

    python tests/mutations.py                       # every row (about 10 minutes on 2 cores)
    python tests/mutations.py --only "value loss clipping" "GAE"
    python tests/mutations.py --list                # the rows and their breaks

Each row's `break` column is the smallest careless edit of that detail: `old` → `new`, made in each of
the row's scripts (or in the one script named first in the cell). For each row, the runner copies the
project to a temporary folder, makes that one break there, and runs the row's own tests (its `checked
by` column) on the copy. The break must make at least one of them fail; a break that survives means the
row needs a stronger test. Exit status 1 if any survived.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from details import ROOT, modules, read_map, replacements, row_id, tests_of  # noqa: E402

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


def make_break(row: dict, root: str) -> None:
    for path in break_files(row):
        full = os.path.join(root, path)
        with open(full) as f:
            text = f.read()
        for old, new in replacements(row):
            if text.count(old) != 1:
                raise ValueError(f"the break's `{old}` is in {path} {text.count(old)} times, not once: update the row")
            text = text.replace(old, new)
        with open(full, "w") as f:
            f.write(text)


def check(row: dict, timeout: float = 900) -> tuple[bool, float, str]:
    """(caught, seconds, the end of pytest's output) for one row's break."""
    start = time.time()
    with tempfile.TemporaryDirectory() as root:
        copy_project(root)
        make_break(row, root)
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests_of(row)]
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    if out.returncode not in (0, 1):  # 2-5: pytest itself failed (no tests collected, usage error)
        raise RuntimeError(f"pytest could not run the tests of '{row_id(row)}':\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    tail = "\n".join(line for line in out.stdout.splitlines() if line.startswith(("FAILED", "ERROR")))
    return out.returncode == 1, time.time() - start, tail or out.stdout.strip().splitlines()[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="rows whose detail starts with one of these")
    parser.add_argument("--list", action="store_true", help="list the rows and their breaks, run nothing")
    args = parser.parse_args(argv)
    rows = [r for r in all_rows() if args.only is None or any(r["detail"].startswith(o) for o in args.only)]
    if args.list:
        for row in rows:
            print(f"{row_id(row)}: {row['break']}")
        return 0
    survived = []
    for i, row in enumerate(rows, 1):
        caught, seconds, tail = check(row)
        print(f"[{i}/{len(rows)}] {'caught  ' if caught else 'SURVIVED'} {row_id(row)} ({seconds:.0f} s)"
              + (f"\n    {tail.splitlines()[0]}" if caught else ""), flush=True)
        if not caught:
            survived.append(row_id(row))
    print(f"{len(rows) - len(survived)} of {len(rows)} breaks caught" +
          (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
