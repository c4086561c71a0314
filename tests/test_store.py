import dataclasses
import json
import math
from datetime import datetime, timezone

import pandas as pd
import pyarrow.parquet as pq
import pytest

from harness import store
from harness.grid import expand_grid
from harness.schema import EPOCH_SCHEMA, SCHEMA_VERSION, TRIAL_SCHEMA
from harness.results import EpochRecord, TrialResult, failed_result

from conftest import check_golden, tiny_grid

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def fake_results(seeds=(0, 1), status="ok"):
    """Real specs with made-up numbers: the store only moves values around."""
    out = []
    for spec in expand_grid(tiny_grid(epochs=2, batch_size=[100], seed=list(seeds))):
        epochs = tuple(EpochRecord(epoch=e, loss=1.0 / e, accuracy=0.5 + e / 10, val_loss=1.1 / e,
                                   val_accuracy=0.4 + e / 10, elapsed_s=0.1 * e, updates=e * spec.updates_per_epoch)
                       for e in (1, 2))
        out.append(TrialResult(spec=spec, status=status, train_accuracy=0.7, test_accuracy=0.6, train_loss=0.5,
                               test_loss=0.6, epochs_run=2, updates=2 * spec.updates_per_epoch, examples_seen=1000,
                               wall_clock_s=0.2, first_epoch_s=0.1, group_size=1, group_wall_clock_s=0.2,
                               engine_version="test", started_at=T0, finished_at=T0, epochs=epochs))
    return out


def test_schema_golden():
    from harness.schema import POINT_SCHEMA, PROBE_SCHEMA

    text = "--\n".join("".join(f"{f.name}: {f.type}\n" for f in schema)
                       for schema in (TRIAL_SCHEMA, EPOCH_SCHEMA, POINT_SCHEMA, PROBE_SCHEMA))
    check_golden("schema.txt", text + f"-- version {SCHEMA_VERSION}\n")


def test_round_trip_readable_with_plain_pandas(tmp_path):
    results = fake_results()
    store.write_results(tmp_path, results, "run1", 0)
    trials = pd.read_parquet(tmp_path / "trials")
    epochs = pd.read_parquet(tmp_path / "epochs")
    assert len(trials) == len(results) and len(epochs) == 2 * len(results)
    assert list(trials.columns) == TRIAL_SCHEMA.names
    row = trials.set_index("trial_id").loc[results[0].trial_id]
    spec = results[0].spec
    assert row.batch_size == spec.batch_size and row.learning_rate == spec.learning_rate
    assert row.momentum == 0.9 and row.epochs == 2 and row.hidden_units == 50 and row.dataset == "blobs"
    assert row.run_id == "run1" and row.status == "ok" and row.test_accuracy == 0.6
    assert str(row.started_at) == "2026-01-01 00:00:00+00:00"
    meta = pq.read_schema(next((tmp_path / "trials").iterdir())).metadata
    assert meta[b"harness.schema_version"] == str(SCHEMA_VERSION).encode()
    assert store.read_trials(tmp_path).equals(trials)


def test_failed_rows_keep_error_and_nan(tmp_path):
    spec = fake_results()[0].spec
    store.write_results(tmp_path, [failed_result(spec, ValueError("bad"))], "r", 0)
    row = store.read_trials(tmp_path).iloc[0]
    assert row.status == "failed" and row.error == "ValueError: bad" and math.isnan(row.test_accuracy)
    assert store.finished_trials(tmp_path) == {spec.trial_id: "failed"}


def test_atomic_write_leaves_no_partial_file_on_error(tmp_path, monkeypatch):
    store.write_results(tmp_path, fake_results(), "r", 0)

    def broken(table, where, **kw):
        where.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(store.pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        store.write_results(tmp_path, fake_results(seeds=(5,)), "r", 1)
    assert sorted(p.name for p in (tmp_path / "trials").iterdir()) == ["part-r-000000.parquet"]
    assert not [p for p in tmp_path.rglob(".*.tmp")]
    assert len(pd.read_parquet(tmp_path / "trials")) == 2


def test_orphan_epochs_from_a_cut_flush_are_dropped(tmp_path):
    store.write_results(tmp_path, fake_results(), "r", 0)
    (tmp_path / "trials" / "part-r-000000.parquet").unlink()  # as if killed between the two writes
    assert store.drop_orphan_epochs(tmp_path)
    assert store.finished_trials(tmp_path) == {} and not list((tmp_path / "epochs").iterdir())


def test_foreign_and_truncated_files_are_named_or_set_aside(tmp_path):
    store.write_results(tmp_path, fake_results(), "r", 0)
    good = tmp_path / "trials" / "part-r-000000.parquet"
    (tmp_path / "trials" / "notes.parquet").write_bytes(good.read_bytes()[:100])
    with pytest.raises(store.StoreError, match=r"notes.parquet: not a readable Parquet file"):
        store.read_trials(tmp_path)
    with pytest.warns(UserWarning, match="moved it to"):
        done = store.finished_trials(tmp_path)
    assert len(done) == 2  # the good file still counts
    assert (tmp_path / "set-aside" / "trials-notes.parquet").exists()


def test_other_schema_version_is_refused_in_one_line(tmp_path):
    store.write_results(tmp_path, fake_results(), "r", 0)
    path = tmp_path / "trials" / "part-r-000000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({b"harness.schema_version": b"0"}), path)
    with pytest.raises(store.StoreError) as info:
        store.read_trials(tmp_path)
    assert "schema version 0, this harness reads versions 1, 2" in str(info.value) and "\n" not in str(info.value)


def test_version_1_trials_are_read_with_the_settings_they_ran_with(tmp_path):
    """A folder written before schema version 2 still reads and resumes: its rows get the added
    settings at their defaults (what they ran with) and keep their trial ids."""
    from harness.schema import added_columns

    results = fake_results()
    store.write_results(tmp_path, results, "r", 0)
    path = tmp_path / "trials" / "part-r-000000.parquet"
    table = pq.read_table(path)
    old = table.drop_columns(list(added_columns())).replace_schema_metadata({b"harness.schema_version": b"1"})
    pq.write_table(old, path)
    trials = store.read_trials(tmp_path)
    assert list(trials.columns) == TRIAL_SCHEMA.names
    assert (trials["n_val"] == 0).all() and (trials["eval_schedule"] == "epoch").all()
    # judged diverged on NaN/inf only, as version 1 did: an infinite blow-up factor
    assert (trials["divergence_factor"] == math.inf).all() and trials["val_accuracy"].isna().all()
    assert sorted(store.finished_trials(tmp_path)) == sorted(r.trial_id for r in results)


def test_remove_trials_keeps_removed_rows_aside(tmp_path):
    results = fake_results()
    store.write_results(tmp_path, results, "r", 0)
    assert store.remove_trials(tmp_path, {results[0].trial_id}) == 1
    assert list(store.read_trials(tmp_path).trial_id) == [results[1].trial_id]
    assert len(store.read_epochs(tmp_path)) == 2
    assert len(pd.read_parquet(tmp_path / "set-aside" / "retried-trials-part-r-000000.parquet")) == 1


def test_lock_refuses_a_second_holder(tmp_path):
    with store.locked(tmp_path):
        with pytest.raises(store.StoreError, match="in use by pid"):
            with store.locked(tmp_path):
                pass
    with store.locked(tmp_path):  # released after use
        pass


def test_move_aside_keeps_old_results(tmp_path):
    target = tmp_path / "smoke"
    store.write_results(target, fake_results(), "r", 0)
    moved = store.move_aside(target)
    assert not target.exists() and moved.name.startswith("smoke.")
    assert len(pd.read_parquet(moved / "trials")) == 2


def test_run_metadata_round_trip(tmp_path):
    from harness.schema import run_metadata

    meta = run_metadata("r1", T0, "grids/x.yaml", "abc", {"backend": "serial"})
    store.write_run_metadata(tmp_path, meta)
    (loaded,) = store.read_runs(tmp_path)
    assert loaded["run_id"] == "r1" and loaded["schema_version"] == SCHEMA_VERSION and loaded["keras"]
    assert loaded["backend"] == "serial" and loaded["cpu_count"] >= 1
    json.dumps(loaded)
    assert dataclasses.is_dataclass(fake_results()[0])


def test_readme_documents_every_column():
    from conftest import REPO
    from harness.schema import CONFIG_COLUMNS, EPOCH_COLUMNS, TRIAL_COLUMNS

    readme = (REPO / "README.md").read_text()
    config = {name for name, _, _ in CONFIG_COLUMNS}
    from harness.schema import POINT_COLUMNS, PROBE_COLUMNS

    documented = [name for name, _, _ in (*TRIAL_COLUMNS, *EPOCH_COLUMNS, *POINT_COLUMNS, *PROBE_COLUMNS)
                  if name not in config]
    missing = [name for name in documented if f"| `{name}` |" not in readme]
    assert not missing, f"README.md has no table row for columns {missing}"
    missing_config = [name for name in config if f"{name}:" not in readme]
    assert not missing_config, f"README.md's grid example lacks {missing_config}"
