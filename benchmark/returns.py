"""Returns benchmark: every env of a suite over several seeds, runs in parallel, resumable; then the report.

    python benchmark/returns.py classic                  # CartPole, Acrobot, MountainCar, LunarLander: 3 seeds of 500k
    python benchmark/returns.py mujoco --envs Hopper-v5 Walker2d-v5 --seeds 5
    python benchmark/returns.py classic --total-timesteps 50000 --out /tmp/bench    # a quick look on a small machine
    python benchmark/returns.py classic --report-only    # rewrite the report from the runs already there

The report (results.md, results.csv, curves_*.png) goes to <out>/<suite>/, by default docs/results/<suite>/: the
published results. Each run is the script itself, started in <out>/<suite>/ with the run name <env_id>__<seed>:
the script makes its folder <out>/<suite>/runs/<env_id>__<seed>/ and refuses one that is there already, so the
run's log goes beside it, to <out>/<suite>/logs/<env_id>__<seed>.log. Ctrl-C stops the suite cleanly: every
run finishes its update and writes a checkpoint. The same command later skips the finished runs and
resumes the others from their checkpoints.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import tyro
from rich.console import Console
from rich.text import Text

from common import RESULTS, SUITES, python, run_name, script_path
from returns_report import write_report

STATUS_EVERY = 300.0  # seconds between status lines when the output is not a terminal


@dataclass
class Args:
    suite: tyro.conf.Positional[Literal["classic", "mujoco", "atari"]]
    """which suite: classic (ppo_discrete.py), mujoco (ppo_continuous.py) or atari (ppo_atari.py)"""
    seeds: int = 3
    """number of seeds per env: seeds 1 to n"""
    envs: tuple[str, ...] = ()
    """run only these envs of the suite (default: all of them)"""
    total_timesteps: Optional[int] = None
    """env steps per run (default: the suite's: 500,000 classic, 1,000,000 mujoco, 10,000,000 atari)"""
    jobs: Optional[int] = None
    """runs at the same time (default: CPU cores // threads per job, at least 1)"""
    threads_per_job: int = 1
    """torch threads per run, passed as --torch-threads"""
    out: str = RESULTS
    """results folder, by default the published one: the suite's runs, logs and report go to <out>/<suite>/"""
    report_only: bool = False
    """run nothing: only write the report from the runs already there"""


@dataclass
class Job:
    env_id: str
    seed: int
    name: str
    proc: Optional[subprocess.Popen] = None
    started: float = 0.0


def read_summary(run_dir: str) -> Optional[dict]:
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def is_finished(run_dir: str) -> bool:
    summary = read_summary(run_dir)
    return summary is not None and summary["finished"]


def latest_step(log_path: str) -> str:
    """The last progress line's "step N/M" in a run's log, read from its tail."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    steps = re.findall(r"step ([\d,]+/[\d,]+)", tail)
    return f"step {steps[-1]}" if steps else ""


def log_tail(log_path: str, lines: int = 15) -> str:
    try:
        with open(log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)\n"


def duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Runner:
    """Starts the runs, at most `jobs` at a time, and shows how far the suite is."""

    def __init__(self, args: Args, folder: str, total: int, jobs: list[Job], finished: int):
        self.args, self.folder, self.total = args, folder, total
        self.suite = SUITES[args.suite]
        self.pending, self.running, self.failed = list(jobs), [], []
        self.n_runs, self.done = len(jobs) + finished, finished
        self.console = Console()
        self.live = None
        self.last_status = time.time()

    def log_path(self, job: Job) -> str:
        """The run's log, outside its run folder: the script makes that folder itself and refuses one that exists."""
        return os.path.join(self.folder, "logs", job.name + ".log")

    def command(self, job: Job) -> list[str]:
        ckpt = os.path.join("runs", job.name, "checkpoint.pt")
        extra = ["--torch-threads", self.args.threads_per_job, "--checkpoint-every", self.suite.checkpoint_every]
        if os.path.exists(os.path.join(self.folder, ckpt)):
            # The checkpoint's options are the defaults: the run goes on exactly as it was started.
            return python(script_path(self.suite.script), "--resume", ckpt, *extra)
        return python(
            script_path(self.suite.script),
            "--env-id",
            job.env_id,
            "--seed",
            job.seed,
            "--total-timesteps",
            self.total,
            "--run-name",
            job.name,
            *extra,
        )

    def start(self, job: Job) -> None:
        run_dir = os.path.join(self.folder, "runs", job.name)
        cmd = self.command(job)
        resume = "--resume" in cmd
        if not resume and os.path.exists(run_dir):
            shutil.rmtree(run_dir)  # a run that neither finished nor left a checkpoint: start it afresh
        os.makedirs(os.path.dirname(self.log_path(job)), exist_ok=True)
        with open(self.log_path(job), "a" if resume else "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            # A session of its own: Ctrl-C reaches only the suite, which then stops each run exactly once.
            job.proc = subprocess.Popen(
                cmd,
                cwd=self.folder,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        job.started = time.time()
        self.running.append(job)
        self.event(f"start {job.name}" + (" (resuming from its checkpoint)" if resume else ""))

    def poll(self, stopping: bool = False) -> None:
        for job in [j for j in self.running if j.proc.poll() is not None]:
            self.running.remove(job)
            run_dir = os.path.join(self.folder, "runs", job.name)
            took = duration(time.time() - job.started)
            if is_finished(run_dir) and job.proc.returncode == 0:
                self.done += 1
                final = read_summary(run_dir)["final_return"]
                self.event(f"done  {job.name} in {took}: final return {'-' if final is None else format(final, '.2f')}")
            elif stopping and job.proc.returncode in (0, 130):
                self.event(f"stopped {job.name} after {took}; it resumes from its checkpoint next time")
            else:
                self.failed.append(job.name)
                log = self.log_path(job)
                self.event(f"FAILED {job.name} (exit status {job.proc.returncode}); the end of {log}:", style="red")
                self.console.print(Text(log_tail(log).rstrip()), soft_wrap=True)

    def event(self, message: str, style: str = "") -> None:
        prefix = f"[{self.done + len(self.failed)}/{self.n_runs}] "
        self.console.print(Text(prefix + message, style=style), soft_wrap=True)

    def view(self):
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        head = f"{self.args.suite}: {self.done}/{self.n_runs} runs done"
        head += f", {len(self.failed)} failed" if self.failed else ""
        top = Table.grid(padding=(0, 2))
        top.add_row(
            ProgressBar(total=self.n_runs, completed=self.done + len(self.failed), width=30),
            Text(f"{head}, {len(self.running)} running"),
        )
        runs = Table(box=None, show_header=False, padding=(0, 2))
        for job in self.running:
            runs.add_row(job.name, latest_step(self.log_path(job)), duration(time.time() - job.started))
        return Group(top, runs)

    def status_line(self) -> None:
        """Without a terminal, a line now and then says how far each running run is."""
        if self.live is None and time.time() - self.last_status >= STATUS_EVERY:
            self.last_status = time.time()
            running = ", ".join(f"{j.name} {latest_step(self.log_path(j))}".strip() for j in self.running)
            self.event(f"running: {running}")

    def run(self, jobs: int) -> bool:
        """Runs everything; returns False when stopped by Ctrl-C (or SIGTERM)."""
        from rich.live import Live

        if self.console.is_terminal:
            self.live = Live(console=self.console, get_renderable=self.view, refresh_per_second=2, transient=True)
            self.live.start()
        try:
            while self.pending or self.running:
                while self.pending and len(self.running) < jobs:
                    self.start(self.pending.pop(0))
                time.sleep(0.2)
                self.poll()
                self.status_line()
            return True
        except KeyboardInterrupt:
            self.event(
                "stopping: each run finishes its update and writes a checkpoint (Ctrl-C again stops them at once)"
            )
            self.signal_all()
            while self.running:
                try:
                    time.sleep(0.2)
                    self.poll(stopping=True)
                except KeyboardInterrupt:
                    self.signal_all()  # a second SIGINT makes the scripts quit without waiting
            return False
        finally:
            if self.live is not None:
                self.live.stop()

    def signal_all(self) -> None:
        for job in self.running:
            if job.proc.poll() is None:
                job.proc.send_signal(signal.SIGINT)


def error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: Optional[list[str]] = None) -> int:
    args = tyro.cli(Args, args=argv, description=__doc__.split("\n")[0])
    suite = SUITES[args.suite]
    folder = os.path.join(os.path.abspath(args.out), args.suite)
    total = args.total_timesteps or suite.total_timesteps
    for name in ("seeds", "threads_per_job", "jobs", "total_timesteps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return error(f"--{name.replace('_', '-')} is {getattr(args, name)}; it must be a positive integer")
    unknown = [e for e in args.envs if e not in suite.envs]
    if unknown:
        return error(f"--envs {' '.join(unknown)}: not in the {args.suite} suite ({', '.join(suite.envs)})")

    status = 0
    if not args.report_only:
        # Runs of another budget would mix into one report: the folder keeps the budget it was started with.
        manifest = os.path.join(folder, "suite.json")
        if os.path.exists(manifest):
            with open(manifest) as f:
                before = json.load(f)["total_timesteps"]
            if before != total:
                return error(
                    f"{folder} holds runs of {before:,} steps, not {total:,}; pass --total-timesteps {before} "
                    f"to go on with them, or another --out"
                )
        os.makedirs(os.path.join(folder, "runs"), exist_ok=True)
        with open(manifest, "w") as f:
            json.dump({"suite": args.suite, "script": suite.script, "total_timesteps": total}, f, indent=1)

        envs = args.envs or suite.envs
        jobs = [Job(env, seed, run_name(env, seed)) for seed in range(1, args.seeds + 1) for env in envs]
        todo = [j for j in jobs if not is_finished(os.path.join(folder, "runs", j.name))]
        n_jobs = args.jobs or max(1, (os.cpu_count() or 1) // args.threads_per_job)
        runner = Runner(args, folder, total, todo, finished=len(jobs) - len(todo))
        if len(todo) < len(jobs):
            runner.event(f"{len(jobs) - len(todo)} of the {len(jobs)} runs already finished; not running them again")
        if todo:
            runner.event(
                f"{len(todo)} run{'s' * (len(todo) > 1)} of {total:,} steps with {suite.script}.py, "
                f"{min(n_jobs, len(todo))} at a time, "
                f"in {folder}"
            )
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops cleanly too
        try:
            if not runner.run(n_jobs):
                print("stopped; run the same command again to go on", file=sys.stderr)
                return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
        if runner.failed:
            status = 1
            print(f"{len(runner.failed)} run(s) failed: {', '.join(runner.failed)}", file=sys.stderr)

    if not os.path.isdir(os.path.join(folder, "runs")):
        return error(f"{folder} holds no runs yet; run python benchmark/returns.py {args.suite} first")
    try:
        rows = write_report(folder)
    except ModuleNotFoundError as e:
        return error(f"the report needs {e.name}: pip install -r benchmark/requirements.txt")
    md = os.path.join(folder, "results.md")
    with open(md) as f:
        print("".join(line for line in f if line.startswith("|")), end="")
    print(f"report: {md} ({len(rows)} envs), plots beside it" if rows else f"report: {md} (no finished runs yet)")
    return status


if __name__ == "__main__":
    sys.exit(main())
