import pandas as pd
import pyarrow as pa

from harness import store
from harness.driver import describe_plan, plan_run, run_study
from harness.grid import expand_grid
from harness.scheduler import SerialBackend

from conftest import tiny_grid
from fakes import failing_seed_one, instant_work

GRID = tiny_grid(epochs=2, batch_size=[10, 100, 500], seed=[0, 1])


def _ids(path):
    return sorted(pd.read_parquet(path / "trials").trial_id)


def test_run_writes_one_row_per_trial_and_rerun_runs_nothing(tmp_path):
    summary = run_study(GRID, tmp_path, SerialBackend(work=instant_work), progress=False)
    assert summary.ran == 6 and summary.exit_code == 0 and summary.skipped == 0
    assert _ids(tmp_path) == sorted(s.trial_id for s in expand_grid(GRID))
    assert len(pd.read_parquet(tmp_path / "epochs")) == 12
    calls = []
    again = run_study(GRID, tmp_path, SerialBackend(work=lambda g: calls.append(g) or instant_work(g)),
                      progress=False)
    assert again.ran == 0 and again.skipped == 6 and calls == []
    assert len(store.read_runs(tmp_path)) == 1  # a run with nothing to do leaves no run record


def _drop_rows(results, trial_ids):
    """Take the rows of ``trial_ids`` out of every table, as if their flush had never landed."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for kind in (store.TRIALS, *store.CURVES):
        for path in store.live_parts(results, kind):
            table = pq.read_table(path)
            keep = table.filter(pc.invert(pc.is_in(table["trial_id"], value_set=pa.array(trial_ids))))
            store.write_atomic(keep.replace_schema_metadata(table.schema.metadata), path)


def test_resume_runs_only_missing_trials(tmp_path):
    run_study(GRID, tmp_path, SerialBackend(work=instant_work), progress=False)
    lost = _ids(tmp_path)[1::3]
    _drop_rows(tmp_path, lost)
    ran = []
    summary = run_study(GRID, tmp_path, SerialBackend(work=lambda g: ran.extend(g) or instant_work(g)),
                        progress=False)
    assert sorted(s.trial_id for s in ran) == sorted(lost)
    assert summary.ran == 2 and summary.skipped == 4
    ids = _ids(tmp_path)
    assert len(ids) == len(set(ids)) == 6
    epochs = pd.read_parquet(tmp_path / "epochs")
    assert len(epochs) == 12 and not epochs.duplicated(["trial_id", "epoch"]).any()


def test_failed_trials_are_kept_until_retry_failed(tmp_path):
    first = run_study(GRID, tmp_path, SerialBackend(work=failing_seed_one), progress=False)
    assert first.statuses == {"ok": 3, "failed": 3} and first.exit_code == 1
    second = run_study(GRID, tmp_path, SerialBackend(work=instant_work), progress=False)
    assert second.ran == 0 and second.exit_code == 1  # failed rows remain, so the grid is not clean
    third = run_study(GRID, tmp_path, SerialBackend(work=instant_work), retry_failed=True, progress=False)
    assert third.statuses == {"ok": 3} and third.exit_code == 0
    trials = pd.read_parquet(tmp_path / "trials")
    assert len(trials) == 6 and set(trials.status) == {"ok"} and trials.trial_id.is_unique
    assert (tmp_path / "set-aside").is_dir()  # the superseded failed rows are kept, out of the way


def test_dry_run_plan_names_every_trial_and_writes_nothing(tmp_path):
    plan = plan_run(GRID, store.finished_trials(tmp_path), retry_failed=False)
    text = describe_plan(GRID, plan, "serial")
    assert "6 trials; 0 already finished; 6 would run" in text
    assert all(s.trial_id in text for s in expand_grid(GRID))
    assert not any(tmp_path.iterdir())


def test_interrupt_keeps_what_finished(tmp_path):
    def interrupt_on_third(group, seen):
        seen.append(group)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return instant_work(group)

    seen = []
    summary = run_study(GRID, tmp_path, SerialBackend(work=lambda g: interrupt_on_third(g, seen)), progress=False)
    finished = sum(len(g) for g in seen[:2])  # short trials are packed, several to a task
    assert summary.interrupted and summary.exit_code == 130 and summary.ran == finished and 0 < finished < 6
    assert "run the same command again to resume" in summary.describe()
    assert len(_ids(tmp_path)) == finished
    rest = run_study(GRID, tmp_path, SerialBackend(work=instant_work), progress=False)
    assert rest.ran == 6 - finished and len(_ids(tmp_path)) == 6
