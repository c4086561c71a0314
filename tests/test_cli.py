"""The command line end to end, in subprocesses, as a user runs it."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, grid_file

TINY = """\
name: tiny
train: {epochs: 2}
sweep:
  batch_size: [50, 500]
  learning_rate: [0.01]
  seed: [0]
"""


def harness_run(*args, cwd=None, timeout=300):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "harness.run", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or REPO, env=env, timeout=timeout)


def assert_one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


@pytest.fixture
def tiny(tmp_path) -> Path:
    return grid_file(tmp_path, "tiny", TINY)


def test_run_with_ray_then_rerun_runs_nothing(tiny, tmp_path):
    out = tmp_path / "out"
    first = harness_run(tiny, "--results", out, "--backend", "ray")
    assert first.returncode == 0, first.stderr
    assert "2 trials run (2 ok, 0 diverged, 0 failed)" in first.stdout
    trials = pd.read_parquet(out / "trials")
    assert sorted(trials.batch_size) == [50, 500] and set(trials.status) == {"ok"}
    assert trials.node_id.str.len().min() > 10  # a real Ray node id, not 'local'
    assert len(pd.read_parquet(out / "epochs")) == 4
    second = harness_run(tiny, "--results", out, "--backend", "ray")
    assert second.returncode == 0 and "0 trials run" in second.stdout and "2 already finished" in second.stdout
    assert len(pd.read_parquet(out / "trials")) == 2


def test_serial_backend_default_results_folder_and_fresh(tiny, tmp_path):
    first = harness_run(tiny, "--backend", "serial", "--quiet", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert len(pd.read_parquet(tmp_path / "results" / "tiny" / "trials")) == 2
    fresh = harness_run(tiny, "--backend", "serial", "--quiet", "--fresh", cwd=tmp_path)
    assert fresh.returncode == 0 and "moved earlier results to" in fresh.stderr
    (old,) = [p for p in (tmp_path / "results").iterdir() if p.name.startswith("tiny.")]
    assert len(pd.read_parquet(old / "trials")) == 2  # kept, not destroyed


def test_dry_run_lists_trials_and_writes_nothing(tiny, tmp_path):
    proc = harness_run(tiny, "--dry-run", "--results", tmp_path / "out")
    assert proc.returncode == 0
    assert "2 trials; 0 already finished; 2 would run" in proc.stdout
    assert proc.stdout.count("batch_size=") == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, needle", [
    ("name: x\nsweep: {batch_size: [0], learning_rate: [0.1], seed: [0]}\n", "'batch_size' must be a whole number from 1 to 'problem.n_train'"),
    ("sweep: {batch_size: [1], learning_rate: [0.1], seed: [0]}\nextra: 1\n", "unknown key 'extra'"),
    ("sweep: [1, 2\n", "not valid YAML"),
    ("", "the file is empty"),
])
def test_bad_grid_is_one_line_exit_2_nothing_written(tmp_path, content, needle):
    grid = tmp_path / "bad.yaml"
    grid.write_text(content)
    assert_one_line_error(harness_run(grid, "--results", tmp_path / "out"), needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, needle", [
    (["--backend", "slurm"], "invalid choice: 'slurm'"),
    (["--max-concurrent", "0"], "must be at least 1"),
    (["--max-concurrent", "two"], "expected a whole number"),
    (["--engine", "torch"], "invalid choice: 'torch'"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_flags_are_one_line_exit_2(tiny, args, needle):
    assert_one_line_error(harness_run(tiny, *args), needle)


def test_missing_grid_and_bad_results_path(tmp_path, tiny):
    assert_one_line_error(harness_run(tmp_path / "nope.yaml"), "no such grid file")
    a_file = tmp_path / "file.txt"
    a_file.write_text("precious")
    assert_one_line_error(harness_run(tiny, "--results", a_file), "exists and is not a folder")
    assert a_file.read_text() == "precious"


def test_small_grid_runs_in_this_process_by_default_and_says_so(tiny, tmp_path):
    """--backend auto: two short trials cost less than starting Ray; the driver trains them."""
    out = tmp_path / "out"
    proc = harness_run(tiny, "--results", out)
    assert proc.returncode == 0, proc.stderr
    assert "a small grid: training in this process, without starting Ray" in proc.stderr
    assert "oneDNN" not in proc.stderr and "absl" not in proc.stderr  # TensorFlow's start-up lines stay quiet
    assert set(pd.read_parquet(out / "trials").node_id) == {"local"}
