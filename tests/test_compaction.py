"""Buffered writes and compaction: few files, and every trial read exactly once at every moment."""
from __future__ import annotations

import subprocess
import sys
import time

import pandas as pd
import pytest

from harness import compaction, store
from harness.driver import BufferedWriter, run_study
from harness.grid import expand_grid
from harness.scheduler import SerialBackend

from conftest import REPO, tiny_grid
from fakes import instant_work

GRID = tiny_grid(epochs=2, batch_size=[10, 20, 50, 100, 500], seed=[0, 1, 2])


def _flushed_apart(results, n_parts=15):
    """Every trial of GRID in a part of its own, as many small flushes leave them."""
    for seq, spec in enumerate(expand_grid(GRID)[:n_parts]):
        store.write_results(results, instant_work([spec]), "r", seq)


def _read_once(results):
    trials, epochs, points = (store.read_table(results, kind).to_pandas()
                              for kind in (store.TRIALS, store.EPOCHS, store.POINTS))
    assert trials["trial_id"].is_unique
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert set(epochs["trial_id"]) <= set(trials["trial_id"])
    return trials, epochs


def test_compaction_leaves_one_part_per_table_with_the_same_rows(tmp_path):
    _flushed_apart(tmp_path)
    before_trials, before_epochs = _read_once(tmp_path)
    done = compaction.compact(tmp_path)
    assert (done.files_before, done.files_after, done.trials) == (45, 3, 15)
    for kind in (store.TRIALS, store.EPOCHS, store.POINTS):
        assert len(list((tmp_path / kind).glob("*.parquet"))) == 1
    after_trials, after_epochs = _read_once(tmp_path)
    key = ["trial_id"]
    pd.testing.assert_frame_equal(after_trials.sort_values(key).reset_index(drop=True),
                                  before_trials.sort_values(key).reset_index(drop=True))
    assert len(after_epochs) == len(before_epochs) == 30
    assert len(pd.read_parquet(tmp_path / "trials")) == 15  # plain pandas reads the folder whole


def test_a_compaction_killed_before_its_trials_part_changes_nothing_anyone_reads(tmp_path, monkeypatch):
    _flushed_apart(tmp_path)
    real_merge = compaction._merge

    def die_at_trials(results, kind, *args):
        if kind == store.TRIALS:
            raise KeyboardInterrupt  # killed after the curve parts, before the commit point
        return real_merge(results, kind, *args)

    monkeypatch.setattr(compaction, "_merge", die_at_trials)
    with pytest.raises(KeyboardInterrupt):
        compaction.compact(tmp_path)
    assert any(p.name.startswith(store.COMPACTED) for p in (tmp_path / "epochs").iterdir())
    trials, epochs = _read_once(tmp_path)
    assert len(trials) == 15 and len(epochs) == 30
    monkeypatch.setattr(compaction, "_merge", real_merge)
    compaction.compact(tmp_path)  # the next compaction cleans up and finishes the job
    trials, epochs = _read_once(tmp_path)
    assert len(trials) == 15 and len(epochs) == 30
    assert len(list((tmp_path / "epochs").glob("*.parquet"))) == 1


def test_a_compaction_killed_before_deleting_what_it_replaced_reads_each_trial_once(tmp_path, monkeypatch):
    _flushed_apart(tmp_path)
    cleanups = []
    real_drop = store.drop_orphan_epochs
    monkeypatch.setattr(store, "drop_orphan_epochs", lambda r: cleanups.append(r) or ([] if len(cleanups) > 1
                                                                                      else real_drop(r)))
    compaction.compact(tmp_path)  # the second clean-up (the deletion of replaced parts) "never ran"
    assert len(list((tmp_path / "trials").glob("*.parquet"))) == 16
    trials, epochs = _read_once(tmp_path)
    assert len(trials) == 15 and len(epochs) == 30
    monkeypatch.setattr(store, "drop_orphan_epochs", real_drop)
    assert len(store.drop_orphan_epochs(tmp_path)) == 45  # a resume removes the replaced parts
    assert len(_read_once(tmp_path)[0]) == 15


def test_buffered_writer_flushes_by_count_and_by_age(tmp_path):
    specs = expand_grid(GRID)
    writer = BufferedWriter(tmp_path, "r", max_trials=4, max_age_s=0.3)
    try:
        writer.add(instant_work(specs[:3]))
        assert not (tmp_path / "trials").exists()  # three waiting, under both limits
        writer.add(instant_work(specs[3:5]))
        assert len(list((tmp_path / "trials").iterdir())) == 1  # five >= four: flushed at once
        writer.add(instant_work(specs[5:6]))
        deadline = time.monotonic() + 5
        while len(list((tmp_path / "trials").iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list((tmp_path / "trials").iterdir())) == 2  # the timer wrote the lone trial
    finally:
        writer.close()
    assert len(store.read_trials(tmp_path)) == 6


def test_buffered_writer_flushes_by_curve_rows(tmp_path):
    """Trials with long curves flush before max_trials: the buffer is bounded in rows, so the
    driver's memory does not grow with the epochs per trial."""
    specs = expand_grid(GRID)
    results = instant_work(specs[:3])
    rows = [len(r.epochs) + len(r.points) for r in results]
    writer = BufferedWriter(tmp_path, "r", max_trials=1000, max_age_s=60, max_rows=rows[0] + rows[1])
    try:
        writer.add(results[:1])
        assert not (tmp_path / "trials").exists()  # under every limit
        writer.add(results[1:2])
        assert len(list((tmp_path / "trials").iterdir())) == 1  # the rows limit, far under max_trials
        assert writer.rows == 0 and not writer.pending
    finally:
        writer.close()
    epochs = pd.read_parquet(tmp_path / "epochs")
    assert len(epochs) == sum(len(r.epochs) for r in results[:2])
    assert list(epochs.columns) == list(store.SCHEMAS["epochs"].names)


def test_a_run_ends_compacted(tmp_path):
    summary = run_study(GRID, tmp_path, SerialBackend(work=instant_work), progress=False, flush_s=0)
    assert summary.ran == 15
    assert [len(list((tmp_path / kind).glob("*.parquet"))) for kind in ("trials", "epochs", "points")] == [1, 1, 1]


def test_compact_command(tmp_path):
    _flushed_apart(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "harness.compact", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"harness compact: {tmp_path}: 15 trials, 45 part files -> 3"
    bad = subprocess.run([sys.executable, "-m", "harness.compact", str(tmp_path / "nope")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("not a results folder (no trials/ or runs/ inside)")
