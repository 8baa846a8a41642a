"""The returns benchmark and its report: the statistics, the report on fabricated runs, tiny suites end to end, and
where the benchmarks publish."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import common  # noqa: E402
import masking_ablation  # noqa: E402
import returns  # noqa: E402
import returns_report as report  # noqa: E402
import speed_modes  # noqa: E402

TINY = ["--envs", "CartPole-v1", "--total-timesteps", "1024", "--jobs", "1"]


def run_returns(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmark", "returns.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_csv(path: str) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["env_id"]: row for row in csv.DictReader(f)}


def is_png(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------
def test_t_interval_by_hand():
    # Three seeds: mean 480, s = 20, t(0.975, 2) = 4.303, so 480 +- 4.303 * 20 / sqrt(3).
    lo, hi = report.t_interval([480.0, 500.0, 460.0])
    half = 4.303 * 20 / math.sqrt(3)
    assert (lo, hi) == pytest.approx((480 - half, 480 + half))
    assert report.t_interval([490.04] * 3) == pytest.approx((490.04, 490.04))  # no spread, no width
    assert all(math.isnan(x) for x in report.t_interval([7.0]))  # one seed: no interval
    assert all(math.isnan(x) for x in report.t_interval([]))


@pytest.mark.parametrize("seeds", [2, 3, 5, 10])
def test_t_interval_covers_the_true_mean_95_percent_of_the_time(seeds):
    # 20,000 experiments of `seeds` normal results each: the share whose interval holds the true mean is 95%
    # within 4 standard errors (sqrt(0.95 * 0.05 / 20000) = 0.0015). The percentile bootstrap the report used
    # before covered about 75% with 3 seeds.
    rng = np.random.default_rng(0)
    results = rng.normal(100.0, 30.0, size=(20_000, seeds))
    covered = np.mean([lo <= 100.0 <= hi for lo, hi in map(report.t_interval, results)])
    assert abs(covered - 0.95) < 4 * math.sqrt(0.95 * 0.05 / 20_000), covered


def test_few_seeds_are_said_in_the_table():
    assert report.interval_note(1) == "one seed: no interval"
    assert report.interval_note(3) == "3 seeds: a rough guide"
    assert report.interval_note(5) == ""


def test_rolling_mean_averages_what_there_is_so_far():
    np.testing.assert_allclose(common.rolling_mean([2, 4, 6, 8], 2), [2, 3, 5, 7])
    np.testing.assert_allclose(common.rolling_mean([1, 2, 3], 100), [1, 1.5, 2])


# ----------------------------------------------------------------------------------------------------
# Report on fabricated runs
# ----------------------------------------------------------------------------------------------------
def fake_run(folder, name, env_id, seed, final, global_step=1000, total=1000, time_s=10.0, episodes=150):
    """A run whose last 100 episodes all return `final` (the first ones return 0)."""
    run_dir = os.path.join(folder, "runs", name)
    os.makedirs(run_dir)
    steps = np.linspace(10, global_step, episodes).astype(int)
    returns = [0.0] * (episodes - 100) + [final] * 100
    with open(os.path.join(run_dir, "episodes.csv"), "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["global_step", "time_s", "return", "length"])
        out.writerows((s, round(time_s * s / global_step, 3), r, 20) for s, r in zip(steps, returns))
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(
            {
                "script": "ppo_discrete",
                "env_id": env_id,
                "seed": seed,
                "global_step": global_step,
                "total_timesteps": total,
                "finished": global_step >= total,
                "time_s": time_s,
                "sps": global_step / time_s,
                "episodes": episodes,
                "final_return": final,
            },
            f,
        )


def test_report_on_fabricated_runs(tmp_path):
    folder = str(tmp_path / "classic")
    finals = {1: 480.0, 2: 500.0, 3: 460.0}
    for seed, final in finals.items():
        fake_run(folder, f"CartPole-v1__{seed}", "CartPole-v1", seed, final, time_s=10.0 * seed)
    fake_run(folder, "Acrobot-v1__1", "Acrobot-v1", 1, -90.0)
    fake_run(folder, "MountainCar-v0__1", "MountainCar-v0", 1, -200.0, global_step=500)  # stopped halfway
    os.makedirs(os.path.join(folder, "runs", "MountainCar-v0__2"))  # still running: no files yet

    report.write_report(folder)

    rows = read_csv(os.path.join(folder, "results.csv"))
    assert list(rows) == ["CartPole-v1", "Acrobot-v1"]  # the suite's order; unfinished runs left out
    cart = rows["CartPole-v1"]
    assert int(cart["seeds"]) == 3
    assert float(cart["final_return_mean"]) == pytest.approx(480.0)
    assert float(cart["final_return_std"]) == pytest.approx(np.std([480.0, 500.0, 460.0]), abs=1e-4)
    half = 4.303 * 20 / math.sqrt(3)  # Student's t over the 3 seeds
    assert (float(cart["ci95_low"]), float(cart["ci95_high"])) == pytest.approx((480 - half, 480 + half), abs=1e-3)
    assert float(cart["wall_time_s"]) == pytest.approx(20.0)
    assert float(cart["sps"]) == pytest.approx(np.mean([100.0, 50.0, 1000 / 30]), abs=1e-3)
    assert int(cart["total_steps"]) == 3000 and int(cart["steps_per_run"]) == 1000
    assert (cart["ref_env"], float(cart["ref_mean"]), float(cart["ref_std"])) == ("CartPole-v1", 490.04, 6.12)
    acro = rows["Acrobot-v1"]
    assert int(acro["seeds"]) == 1 and float(acro["final_return_mean"]) == -90.0
    assert float(acro["final_return_std"]) == 0.0 and acro["ci95_low"] == acro["ci95_high"] == ""  # one seed: none

    md = open(os.path.join(folder, "results.md")).read()
    assert "| CartPole-v1 | 3 | 480.00 ± 16.33 | [430.31, 529.69] (3 seeds: a rough guide) |" in md
    assert "| Acrobot-v1 | 1 | -90.00 ± 0.00 | - (one seed: no interval) |" in md
    assert "490.04 ± 6.12 (CartPole-v1)" in md and "-86.36 ± 1.32 (Acrobot-v1)" in md
    assert "MountainCar-v0__1: stopped at step 500 of 1,000" in md
    assert "MountainCar-v0__2: no summary.json" in md
    assert "https://docs.cleanrl.dev/rl-algorithms/ppo/" in md
    for name in ("curves_steps.png", "curves_time.png"):
        assert is_png(os.path.join(folder, name)) and f"({name})" in md


def test_report_without_finished_runs(tmp_path):
    folder = str(tmp_path / "classic")
    fake_run(folder, "CartPole-v1__1", "CartPole-v1", 1, 10.0, global_step=500)
    assert report.write_report(folder) == []
    assert read_csv(os.path.join(folder, "results.csv")) == {}
    assert "No finished runs yet." in open(os.path.join(folder, "results.md")).read()


# ----------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------
def test_every_env_of_every_suite_has_a_reference_entry():
    refs = report.load_references()
    envs = {env for s in common.SUITES.values() for env in s.envs}
    assert set(refs) == envs
    for env, ref in refs.items():
        assert {"reference_env", "mean", "std", "source", "url"} <= set(ref), env
        assert ref["mean"] is None or isinstance(ref["mean"], (int, float)), env
    # Our MuJoCo envs are -v5; the published figures are for -v4.
    assert refs["HalfCheetah-v5"]["reference_env"] == "HalfCheetah-v4"
    assert refs["BreakoutNoFrameskip-v4"]["mean"] == 414.66


def test_the_report_writes_the_published_files(tmp_path):
    # The report goes straight to docs/results/<suite>/: it must write the files published there, under their names.
    assert common.RESULTS == os.path.join(ROOT, "docs", "results")
    assert returns.Args("classic").out == common.RESULTS
    folder = str(tmp_path / "classic")
    fake_run(folder, "CartPole-v1__1", "CartPole-v1", 1, 480.0)
    report.write_report(folder)
    written = set(os.listdir(folder)) - {"runs"}
    assert written == {"results.md", "results.csv", "curves_steps.png", "curves_time.png"}
    for suite in common.SUITES:
        assert written <= set(os.listdir(os.path.join(common.RESULTS, suite))), suite
    masking = masking_ablation.Args().out
    assert masking == os.path.join(common.RESULTS, "masking")
    assert {"results.md", "results.json", "curves.png"} <= set(os.listdir(masking))


# ----------------------------------------------------------------------------------------------------
# The returns benchmark
# ----------------------------------------------------------------------------------------------------
def test_returns_benchmark_runs_then_reruns_nothing(tmp_path):
    out = str(tmp_path / "results")
    first = run_returns("classic", *TINY, "--seeds", "2", "--out", out)
    assert first.returncode == 0, first.stdout + first.stderr
    folder = os.path.join(out, "classic")
    summaries = [os.path.join(folder, "runs", f"CartPole-v1__{s}", "summary.json") for s in (1, 2)]
    for seed, path in zip((1, 2), summaries):
        assert json.load(open(path))["global_step"] == 1024
        # The log lies outside the run folder, which the script makes itself.
        log = os.path.join(folder, "logs", f"CartPole-v1__{seed}.log")
        assert f"--run-name CartPole-v1__{seed}" in open(log).readline()
        assert not os.path.exists(os.path.join(os.path.dirname(path), "output.log"))
    assert int(read_csv(os.path.join(folder, "results.csv"))["CartPole-v1"]["seeds"]) == 2
    assert is_png(os.path.join(folder, "curves_steps.png")) and is_png(os.path.join(folder, "curves_time.png"))

    stamps = [os.stat(p).st_mtime_ns for p in summaries]
    second = run_returns("classic", *TINY, "--seeds", "2", "--out", out)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "2 of the 2 runs already finished" in second.stdout and "start" not in second.stdout
    assert [os.stat(p).st_mtime_ns for p in summaries] == stamps


def test_returns_benchmark_resumes_restarts_or_reports_each_unfinished_run(tmp_path, monkeypatch):
    folder = tmp_path / "classic"
    folder.mkdir()
    monkeypatch.chdir(folder)
    # Seed 1: stopped halfway with a checkpoint, as Ctrl-C leaves it.
    ppo = common.load_script("ppo_discrete")
    ppo.train(
        ppo.Args(
            env_id="CartPole-v1",
            seed=1,
            total_timesteps=1024,
            run_name="CartPole-v1__1",
            checkpoint_every=1,
            progress=False,
        ),
        stop_at_step=512,
    )
    partial = report.read_episodes("runs/CartPole-v1__1/episodes.csv")
    # Seed 2: a checkpoint that cannot be read, so the run fails.
    os.makedirs("runs/CartPole-v1__2")
    open("runs/CartPole-v1__2/checkpoint.pt", "w").write("not a checkpoint")
    # Seed 3: killed before its first checkpoint; its folder must go, or the script refuses to start the run again.
    os.makedirs("runs/CartPole-v1__3")
    open("runs/CartPole-v1__3/episodes.csv", "w").write("global_step,time_s,return,length\n")

    result = run_returns("classic", *TINY, "--seeds", "3", "--out", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "start CartPole-v1__1 (resuming from its checkpoint)" in result.stdout
    assert "FAILED CartPole-v1__2" in result.stdout and "cannot be read" in result.stdout
    assert "1 run(s) failed: CartPole-v1__2" in result.stderr
    assert json.load(open("runs/CartPole-v1__1/summary.json"))["global_step"] == 1024
    assert "--resume" in open("logs/CartPole-v1__1.log").readline()
    assert "start CartPole-v1__3\n" in result.stdout and "--run-name" in open("logs/CartPole-v1__3.log").readline()
    assert json.load(open("runs/CartPole-v1__3/summary.json"))["global_step"] == 1024
    whole = report.read_episodes("runs/CartPole-v1__1/episodes.csv")
    n = len(partial["return"])
    np.testing.assert_array_equal(whole["return"][:n], partial["return"])  # the first half is kept, not re-run
    assert int(read_csv("results.csv")["CartPole-v1"]["seeds"]) == 2  # the report still comes out


def test_returns_benchmark_refuses_bad_input(tmp_path, capsys):
    def refused(argv, expected, out=str(tmp_path)):
        assert returns.main(argv + ["--out", out]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err, err

    refused(["classic", "--envs", "Hopper-v5"], "not in the classic suite")
    refused(["classic", "--seeds", "0"], "--seeds is 0")
    os.makedirs(tmp_path / "classic")
    json.dump({"total_timesteps": 1024}, open(tmp_path / "classic" / "suite.json", "w"))
    refused(["classic", "--total-timesteps", "2048"], "holds runs of 1,024 steps, not 2,048")
    refused(["classic", "--report-only"], "holds no runs yet", out=str(tmp_path / "empty"))


# ----------------------------------------------------------------------------------------------------
# The GPU speed table
# ----------------------------------------------------------------------------------------------------
def test_the_gpu_table_is_written_a_row_at_a_time_and_stops_starting_runs_at_its_time_limit(tmp_path, monkeypatch):
    # Each run is faked: the first measures, the second fails, the third uses up the time; what follows is not run.
    rows, clock, table = speed_modes.gpu_rows(), [0.0], tmp_path / "table.md"
    seen = []

    def measure(script, steps, flags, timeout=None):
        seen.append((flags, timeout, table.read_text().count("\n")))
        clock[0] += 30 if len(seen) < 3 else 1000
        return {"sps": 1234.5, "steady": None} if len(seen) != 2 else {"error": "error: it broke"}

    monkeypatch.setattr(speed_modes, "measure", measure)
    monkeypatch.setattr(speed_modes.time, "time", lambda: clock[0])
    assert speed_modes.main(speed_modes.Bench(cuda=True, minutes=4, out=str(tmp_path))) == 0
    assert len(seen) == 3 and seen[0][1] == 240 and seen[1][1] == 210  # each run stopped by the time left
    assert seen[1][2] == seen[0][2] + 1 and seen[2][2] == seen[1][2] + 1  # the row before each run is on disk
    lines = table.read_text().splitlines()
    assert lines[-len(rows) :][0] == "| BreakoutNoFrameskip-v4 | `--cuda --env-backend gymnasium` | 4,096 | 1,234 | - |"
    assert "| error: it broke | - |" in lines[-len(rows) + 1]
    assert all("not run (--minutes)" in line for line in lines[-len(rows) + 3 :])
    assert any("--compile" in flags for _, _, flags in rows) and any("--lstm" in flags for _, _, flags in rows)
    assert {env for env, _, _ in rows} == {"BreakoutNoFrameskip-v4", "CartPole-v1", "HalfCheetah-v5"}
