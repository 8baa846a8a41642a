"""Make the break of each row of DETAILS.md (tests/breaks.py) on purpose, one at a time, and check that its tests fail.

    python tests/mutations.py                       # every row, each script's break alone (about 3 minutes)
    python tests/mutations.py --only "value function loss clipping" "generalized"
    python tests/mutations.py --list                # the rows and their breaks
    python tests/mutations.py --jobs 2              # two breaks at a time (a core each)

For each row and each script it names, the runner copies the project to a temporary folder, makes the break in that
script alone, and runs the row's tests there, those of the other scripts left out: one script's tests cannot stand
in for another's. A break in Part B, the same text in every script, is made in all three at once. The break must
make at least one test fail; one that survives means the row needs a stronger test. Exit status 1 if any survived.

The tests run in a process forked from one that has imported torch, gymnasium and pytest already, which saves the
few seconds each fresh interpreter spends on its imports.
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from details import ROOT, SCRIPTS, break_of, checks_of, modules, read_map, row_id, title  # noqa: E402

PART_B = "\n# Part B: running the experiment\n"
COPIED = (
    "ppo_discrete.py",
    "ppo_continuous.py",
    "ppo_atari.py",
    "README.md",
    "DETAILS.md",
    "docs",
    "tests",
    "benchmark",
)


def all_rows() -> list[dict]:
    return [row for rows in read_map().values() for row in rows]


def break_files(row: dict) -> list[str]:
    """The scripts the break is made in: its "only" script, or every script of the row."""
    only = break_of(row)["only"]
    return [only] if only else [f"{m}.py" for m in modules(row)]


def in_part_b(row: dict) -> bool:
    """Whether every text the row's break replaces lies below the Part B banner, in each of its scripts."""
    for path in break_files(row):
        with open(os.path.join(ROOT, path)) as f:
            text = f.read()
        if any(text.find(old) < text.index(PART_B) for old, _ in break_of(row)["edits"]):
            return False
    return True


def cases(rows: list[dict]) -> list[tuple[dict, str]]:
    """(row, script) pairs to check; script None makes the break in all the row's scripts at once (Part B)."""
    return [
        (row, None if in_part_b(row) else script)
        for row in rows
        for script in (break_files(row)[:1] if in_part_b(row) else break_files(row))
    ]


def case_id(row: dict, script: str = None) -> str:
    return row_id(row) + (f" [{script}]" if script else "")


def copy_project(dest: str) -> None:
    for name in COPIED:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name), ignore=shutil.ignore_patterns("__pycache__", "runs", "logs"))
        elif os.path.exists(src):
            shutil.copy(src, dest)


def make_break(row: dict, root: str, script: str = None) -> None:
    for path in [script] if script else break_files(row):
        full = os.path.join(root, path)
        with open(full) as f:
            text = f.read()
        for old, new in break_of(row)["edits"]:
            if text.count(old) != 1:
                raise ValueError(f"the break's `{old}` is in {path} {text.count(old)} times, not once: update the row")
            text = text.replace(old, new)
        with open(full, "w") as f:
            f.write(text)


ZYGOTE = r"""
import json, os, sys
import gymnasium, numpy, pytest, torch, tyro  # imported once; every case forks from here
import torch.utils.tensorboard  # noqa: F401
for line in sys.stdin:
    case = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.chdir(case["root"])
        sys.path[:0] = [case["root"], os.path.join(case["root"], "tests")]
        with open(os.path.join(case["root"], "pytest.log"), "w") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            code = pytest.main(case["args"])
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(int(code))
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


class Zygote:
    """A process that has imported the heavy libraries, and forks a child to run each case's tests."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )

    def run(self, root: str, args: list[str]) -> int:
        self.proc.stdin.write(json.dumps({"root": root, "args": args}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def check(row: dict, script: str, zygote: Zygote) -> tuple[bool, float, str]:
    """(caught, seconds, the failed tests or pytest's last line) for one row's break: in all its scripts at once, or
    in `script` alone against the row's tests of that script."""
    start, others = time.time(), [s for s in SCRIPTS if script and s != script.removesuffix(".py")]
    with tempfile.TemporaryDirectory() as root:
        copy_project(root)
        make_break(row, root, script)
        args = ["-x", "-q", "-p", "no:cacheprovider", *checks_of(row)]
        if others:
            args += ["-k", " and ".join(f"not {s}" for s in others)]
        code = zygote.run(root, args)
        with open(os.path.join(root, "pytest.log")) as f:
            out = f.read()
    if code not in (0, 1):  # 2-5: pytest itself failed (usage error, no tests collected)
        raise RuntimeError(f"pytest could not run the tests of '{row_id(row)}' (exit {code}):\n{out[-2000:]}")
    failed = "\n".join(line for line in out.splitlines() if line.startswith(("FAILED", "ERROR")))
    return code == 1, time.time() - start, failed or (out.strip().splitlines() or ["(no output)"])[-1]


def check_all(todo: list[tuple[dict, str]], jobs: int = 1):
    """check() each (row, script) case, `jobs` at a time; yields (case, its result) as each one ends. A case that
    cannot run (its break no longer applies, pytest cannot start) counts as not caught, with the reason."""
    zygotes = [Zygote() for _ in range(jobs)]
    free = list(zygotes)

    def safe_check(row, script):
        zygote, start = free.pop(), time.time()
        try:
            return check(row, script, zygote)
        except Exception as e:  # noqa: BLE001 -- reported as this case's result
            return False, time.time() - start, f"could not run: {type(e).__name__}: {str(e).splitlines()[0]}"
        finally:
            free.append(zygote)

    try:
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:  # the work is in the forked processes
            futures = {pool.submit(safe_check, row, script): (row, script) for row, script in todo}
            for future in concurrent.futures.as_completed(futures):
                yield futures[future], future.result()
    finally:
        for zygote in zygotes:
            zygote.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="rows whose detail (without its number) starts so")
    parser.add_argument("--list", action="store_true", help="list the rows and their breaks, run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="breaks checked at the same time")
    args = parser.parse_args(argv)
    rows = [r for r in all_rows() if args.only is None or any(title(r).startswith(o) for o in args.only)]
    if args.list:
        for row in rows:
            print(f"{row_id(row)}: {break_of(row)}")
        return 0
    survived, todo = [], cases(rows)
    for i, ((row, script), (caught, seconds, tail)) in enumerate(check_all(todo, args.jobs), 1):
        print(
            f"[{i}/{len(todo)}] {'caught  ' if caught else 'SURVIVED'} {case_id(row, script)} ({seconds:.0f} s)\n"
            f"    {tail.splitlines()[0] if tail else ''}",
            flush=True,
        )
        if not caught:
            survived.append(case_id(row, script))
    print(
        f"{len(todo) - len(survived)} of {len(todo)} breaks caught"
        + (f"; survived: {', '.join(survived)}" if survived else "")
    )
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
