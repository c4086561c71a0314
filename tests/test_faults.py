"""Faults with real processes and real signals: nothing finished is ever lost."""
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from harness import store
from harness.driver import run_study
from harness.grid import expand_grid
from harness.scheduler import RayBackend

from conftest import REPO, grid_file, tiny_grid
from fakes import die_on_seed_one, die_once_then_work
from test_cli import harness_run

SIX = """\
name: six
train: {epochs: 3}
sweep:
  batch_size: [25, 50, 100]
  learning_rate: [0.01]
  seed: [0, 1]
"""


def start_run(grid: Path, results: Path, *extra) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("RAY_ADDRESS", None)
    # --flush-seconds 0: every finished trial lands at once, so a test can kill between two of them.
    return subprocess.Popen([sys.executable, "-m", "harness.run", str(grid), "--results", str(results), "--quiet",
                             "--flush-seconds", "0", *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_parts(results: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parts = sorted((results / "trials").glob("part-*.parquet")) if (results / "trials").is_dir() else []
        if len(parts) >= n:
            return parts
        if proc.poll() is not None:
            pytest.fail(f"run ended before {n} trials landed: {proc.stderr.read()}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"fewer than {n} trials landed in {timeout} s")


@pytest.fixture
def six(tmp_path) -> Path:
    return grid_file(tmp_path, "six", SIX)


def test_sigkill_mid_run_then_rerun_finishes_exactly_once(six, tmp_path):
    results = tmp_path / "out"
    proc = start_run(six, results, "--backend", "serial")
    wait_for_parts(results, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    readable = pd.read_parquet(results / "trials")  # readable as it was left
    assert 2 <= len(readable) < 6
    before = store.read_table(results, store.TRIALS).to_pandas()
    rerun = harness_run(six, "--results", results, "--backend", "serial", "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    trials = pd.read_parquet(results / "trials")
    assert len(trials) == 6 and trials.trial_id.is_unique
    assert sorted(trials.trial_id) == sorted(s.trial_id for s in expand_grid(tiny_grid(
        epochs=3, batch_size=[25, 50, 100], learning_rate=[0.01], seed=[0, 1])))
    # Earlier results untouched: the same rows, value for value, now in the compacted part.
    again = trials.set_index("trial_id").loc[before["trial_id"]].reset_index()[before.columns]
    pd.testing.assert_frame_equal(again, before)
    assert len(list((results / "trials").glob("*.parquet"))) == 1  # compacted at the end of the rerun
    epochs = pd.read_parquet(results / "epochs")
    assert len(epochs) == 18 and not epochs.duplicated(["trial_id", "epoch"]).any()


# auto: a grid this small trains in the driver's process (the first Ctrl-C stops it between
# trials, TensorFlow cannot swallow it); ray: the tasks in flight are cancelled.
@pytest.mark.parametrize("backend", ["auto", "ray"])
def test_ctrl_c_stops_promptly_keeps_results_and_says_how_to_resume(six, tmp_path, backend):
    results = tmp_path / "out"
    proc = start_run(six, results, "--max-concurrent", "1", "--backend", backend)
    wait_for_parts(results, 1, proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    stopped_in = time.monotonic() - t0
    assert proc.returncode == 130, err
    assert "interrupted" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    assert stopped_in < 30
    kept = pd.read_parquet(results / "trials")
    assert 1 <= len(kept) < 6 and set(kept.status) == {"ok"}
    rerun = harness_run(six, "--results", results, "--backend", "serial", "--quiet")
    assert rerun.returncode == 0 and len(pd.read_parquet(results / "trials")) == 6


def test_two_runs_on_one_folder_the_second_refuses(six, tmp_path):
    results = tmp_path / "out"
    first = start_run(six, results, "--backend", "serial")
    wait_for_parts(results, 1, first)
    second = harness_run(six, "--results", results, "--backend", "serial", "--quiet")
    assert second.returncode == 2 and "in use by pid" in second.stderr and "Traceback" not in second.stderr
    assert first.wait(timeout=240) == 0
    trials = pd.read_parquet(results / "trials")
    assert len(trials) == 6 and trials.trial_id.is_unique


def test_worker_killed_while_training_is_retried(ray_local, tmp_path):
    grid = tiny_grid(epochs=1, batch_size=[10, 100], seed=[0, 1])
    backend = RayBackend(max_retries=2, work=functools.partial(die_once_then_work, str(tmp_path)))
    summary = run_study(grid, tmp_path / "out", backend, progress=False)
    assert summary.statuses == {"ok": 4} and summary.exit_code == 0
    assert len(list(tmp_path.glob("*"))) == 5  # each trial's worker died once (4 markers + out/)


def test_trial_that_always_kills_its_worker_is_a_failed_row_and_exit_1(ray_local, tmp_path):
    grid = tiny_grid(epochs=1, batch_size=[10, 100], seed=[0, 1])
    summary = run_study(grid, tmp_path, RayBackend(max_retries=1, work=die_on_seed_one), progress=False)
    assert summary.statuses == {"ok": 2, "failed": 2} and summary.exit_code == 1
    trials = pd.read_parquet(tmp_path / "trials")
    failed = trials[trials.status == "failed"]
    assert set(failed.seed) == {1} and failed.error.str.contains("ray task lost").all()


def test_dry_run_moves_nothing_and_says_what_a_run_would_set_aside(six, tmp_path):
    results = tmp_path / "out"
    assert harness_run(six, "--results", results, "--backend", "serial", "--quiet").returncode == 0
    foreign = results / "trials" / "part-zzz.parquet"
    foreign.write_bytes(b"not parquet at all")
    before = sorted(p.relative_to(results) for p in results.rglob("*") if p.name != ".lock")
    dry = harness_run(six, "--results", results, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"{foreign}: not a readable Parquet file" in dry.stderr and "a run would move it to" in dry.stderr
    assert foreign.read_bytes() == b"not parquet at all" and not (results / "set-aside").exists()
    assert sorted(p.relative_to(results) for p in results.rglob("*") if p.name != ".lock") == before


def test_foreign_file_in_results_is_set_aside_on_resume(six, tmp_path):
    results = tmp_path / "out"
    assert harness_run(six, "--results", results, "--backend", "serial", "--quiet").returncode == 0
    (results / "trials" / "part-zzz.parquet").write_bytes(b"not parquet at all")
    first_part = sorted((results / "trials").glob("part-*"))[0]
    first_part.write_bytes(first_part.read_bytes()[:200])  # truncated, as by a bad copy
    rerun = harness_run(six, "--results", results, "--backend", "serial", "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    for name in (first_part.name, "part-zzz.parquet"):  # each named on stderr, with where it went
        assert f"moved it to {results / 'set-aside' / ('trials-' + name)}" in rerun.stderr, rerun.stderr
    assert "2 file(s) set aside" in rerun.stdout
    assert sorted(p.name for p in (results / "set-aside").iterdir()) == sorted(
        [f"trials-{first_part.name}", "trials-part-zzz.parquet"])
    trials = pd.read_parquet(results / "trials")
    assert len(trials) == 6 and trials.trial_id.is_unique  # the truncated file's trial ran again


def test_older_schema_version_is_refused_in_one_line(six, tmp_path):
    results = tmp_path / "out"
    assert harness_run(six, "--results", results, "--backend", "serial", "--quiet").returncode == 0
    part = sorted((results / "trials").glob("part-*"))[0]
    table = pq.read_table(part)
    pq.write_table(table.replace_schema_metadata({b"harness.schema_version": b"0"}), part)
    before = part.read_bytes()
    proc = harness_run(six, "--results", results, "--backend", "serial", "--quiet")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "results schema version 0, this harness reads versions 1, 2" in proc.stderr
    assert part.read_bytes() == before
    with pytest.raises(store.StoreError, match="schema version 0"):
        store.read_trials(results)
