"""Initial weights drawn once, cached, and sent with fused tasks (harness.initial)."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness import initial
from harness.config import ModelConfig, ProblemConfig, TrainConfig
from harness.grid import TrialSpec
from harness.problem import initial_weights

REPO = Path(__file__).parent.parent


def spec(seed: int, engine: str = "fused", **model) -> TrialSpec:
    return TrialSpec(ProblemConfig(), ModelConfig(**model), TrainConfig(epochs=2, engine=engine), 50, 0.01, seed)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    initial._folder.cache_clear()
    monkeypatch.setattr(initial, "_memo", {})
    yield tmp_path / "cache" / "harness-weights"
    initial._folder.cache_clear()


def test_prepare_draws_what_keras_draws_then_reads_the_cache(empty_cache, monkeypatch):
    specs = [spec(0), spec(1), spec(1, engine="keras"), spec(0, depth=2)]
    table = initial.prepare(specs)
    assert len(table) == 3  # seed 0, seed 1, seed 0 at depth 2; Keras trials draw their own
    for s in (specs[0], specs[1], specs[3]):
        expected = np.concatenate([w.ravel() for w in initial_weights(s.model, s.problem, s.seed)])
        np.testing.assert_array_equal(table[initial.key_of(s)], expected)
    assert len(list(empty_cache.glob("*/*.npy"))) == 3

    def no_child(*args, **kwargs):
        raise AssertionError("a cached key was drawn again")

    monkeypatch.setattr(initial.subprocess, "run", no_child)
    again = initial.prepare(specs)
    assert all(np.array_equal(again[k], table[k]) for k in table)


def test_a_damaged_cache_file_is_drawn_again(empty_cache):
    first = initial.prepare([spec(0)])
    (kept,) = empty_cache.glob("*/*.npy")
    for damage in (b"", kept.read_bytes()[:40]):  # empty (EOFError), truncated (ValueError)
        kept.write_bytes(damage)
        again = initial.prepare([spec(0)])
        np.testing.assert_array_equal(next(iter(again.values())), next(iter(first.values())))


def test_a_failed_draw_is_one_line(empty_cache, monkeypatch):
    monkeypatch.setattr(initial.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, b"", b"Traceback (most recent call last):\n  ...\nImportError: no tensorflow here\n"))
    with pytest.raises(initial.DrawError, match=r"^drawing initial weights failed: ImportError: no tensorflow here$"):
        initial.prepare([spec(5)])


def test_attach_sends_each_fused_task_only_its_own_keys(empty_cache):
    tasks = [(spec(0), spec(1)), (spec(2),), (spec(0, engine="keras"),)]
    table = initial.prepare([s for task in tasks for s in task])
    units = initial.attach(tasks, table)
    assert set(units[0].initial) == {initial.key_of(spec(0)), initial.key_of(spec(1))}
    assert set(units[1].initial) == {initial.key_of(spec(2))}
    assert not hasattr(units[2], "initial") and units[2] == tasks[2]
    assert tuple(units[0]) == tasks[0]


def test_a_fused_task_with_its_weights_trains_without_tensorflow(empty_cache, tmp_path):
    """In a fresh process, as a Ray worker is: the sent weights train the group, TensorFlow is
    never imported, and the result equals a group that drew its own."""
    from harness.engines import fused

    specs = (spec(0), spec(3))
    unit = initial.attach([specs], initial.prepare(specs))[0]
    (tmp_path / "unit.pkl").write_bytes(pickle.dumps(unit))
    code = ("import json, pickle, sys; from harness.engines import run_group; "
            f"r = run_group(pickle.load(open({str(tmp_path / 'unit.pkl')!r}, 'rb'))); "
            "print(json.dumps(['tensorflow' in sys.modules, [x.status for x in r], [x.test_accuracy for x in r]]))")
    # The child's cache folder is empty: only the sent weights can serve it without a draw.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(tmp_path / "child-cache"),
                              "HARNESS_FUSED_KERNEL": "numpy"})
    imported, statuses, accuracy = json.loads(out.stdout.strip().splitlines()[-1])
    assert imported is False and statuses == ["ok", "ok"]
    assert accuracy == [r.test_accuracy for r in fused.run_group(list(specs))]
