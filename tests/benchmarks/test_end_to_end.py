"""Whole runs as a user starts them: ``python -m harness.run GRID`` in a fresh process, from the
command to its exit (Ray's start and stop, the workers' imports, numba's start-up, writing and
compacting included), for the grids the speed goals name: grids/full.yaml (350 trials x 200
epochs, on the epoch clock and on the geometric clock with the gradient noise scale),
grids/smoke.yaml and the 16-trial, 20-epoch grid a Ray Tune user would run.

Each benchmark's ``extra_info`` splits its last run by the times its results carry, so the
shares are ratios from one run: when the first trial finished, the training window (the first
group's start to the last group's end) and what lies outside it. HARNESS_BENCH_QUICK=1 trains
full.yaml for 5 epochs instead of 200. Nothing here asserts a time.

    pytest tests/benchmarks/test_end_to_end.py --benchmark-only -p no:cacheprovider --benchmark-json=/tmp/e.json
    python tests/benchmarks/ratios.py /tmp/e.json
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.store import read_table

QUICK = os.environ.get("HARNESS_BENCH_QUICK") == "1"
REPO = Path(__file__).resolve().parents[2]
TUNE_GRID = {"name": "tune16", "train": {"epochs": 20, "engine": "fused"},
             "sweep": {"batch_size": [4, 16, 64, 256], "learning_rate": [0.01, 0.1], "seed": [0, 1]}}
RUNS = {  # name: (grid file, or None for TUNE_GRID; command-line overrides)
    "full": ("grids/full.yaml", ["train.epochs=5"] if QUICK else []),
    # The science's clock: points per octave of updates (4 by default) beside the epoch ends,
    # the gradient noise scale at each of them; what it costs over the epoch clock is budgeted here.
    "full-geometric": ("grids/full.yaml", ["train.eval_schedule=geometric", *(["train.epochs=5"] if QUICK else [])]),
    "smoke": ("grids/smoke.yaml", ["train.engine=fused"]),
    "tune16": (None, []),
}


def _run(grid: str, overrides: list[str], out: Path) -> float:
    """Runs the grid into ``out`` in a fresh process; returns the wall-clock time it started."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "harness.run", grid, *overrides, "--results", str(out), "--quiet"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return started


@pytest.mark.parametrize("name", RUNS)
def test_end_to_end(benchmark, tmp_path, name):
    grid, overrides = RUNS[name]
    label = grid or "the 16-trial grid (bs 4/16/64/256 x lr 0.01/0.1 x 2 seeds, 20 epochs)"
    if grid is None:
        grid = str(tmp_path / "tune16.yaml")
        Path(grid).write_text(yaml.safe_dump(TUNE_GRID))
    rounds = []

    def fresh():
        out = tmp_path / f"results-{len(rounds)}"
        rounds.append(out)
        return (grid, overrides, out), {}

    started = []
    benchmark.pedantic(lambda *args: started.append(_run(*args)), setup=fresh, rounds=1 if QUICK else 3,
                       iterations=1, warmup_rounds=0)
    trials = read_table(rounds[-1], "trials", ["started_at", "finished_at", "status"]).to_pandas()
    assert len(trials) and (trials["status"] != "failed").all()
    wall = benchmark.stats.stats.data[-1]
    first_start = trials["started_at"].min().timestamp() - started[-1]
    first_done = trials["finished_at"].min().timestamp() - started[-1]
    last_done = trials["finished_at"].max().timestamp() - started[-1]
    benchmark.extra_info.update(
        what=f"{label} {' '.join(overrides)}: python -m harness.run, end to end", trials=len(trials),
        first_trial_finished_s=first_done, training_window_s=last_done - first_start,
        outside_training_share=1 - (last_done - first_start) / wall)
