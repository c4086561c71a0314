import math

import pytest

from harness.grid import expand_grid
from harness.schema import EPOCH_SCHEMA, RESULT_COLUMNS, TRIAL_SCHEMA
from harness.engines import run_group
from harness.engines.keras import run_trial
from harness.results import EpochRecord, TrialResult

from conftest import tiny_grid


@pytest.fixture(scope="module")
def result() -> TrialResult:
    spec = expand_grid(tiny_grid(epochs=4, batch_size=[7], learning_rate=[0.01], seed=[3]))[0]
    return run_trial(spec)


def test_schema_and_dataclasses_agree():
    result_fields = [f for f in TrialResult.__dataclass_fields__ if f not in ("spec", "epochs", "points")]
    assert result_fields == [name for name, _, _ in RESULT_COLUMNS]
    assert list(EpochRecord.__dataclass_fields__) == EPOCH_SCHEMA.names[1:]
    assert len(set(TRIAL_SCHEMA.names)) == len(TRIAL_SCHEMA.names)


def test_trial_fields_and_invariants(result: TrialResult):
    spec = result.spec
    assert result.status == "ok", result.error
    assert result.epochs_run == 4 and len(result.epochs) == 4
    assert result.updates == 4 * math.ceil(500 / 7) == 288  # ragged last batch counts as an update
    assert result.examples_seen == 4 * 500
    assert [e.epoch for e in result.epochs] == [1, 2, 3, 4]
    assert [e.updates for e in result.epochs] == [72, 144, 216, 288]
    elapsed = [e.elapsed_s for e in result.epochs]
    assert elapsed == sorted(elapsed) and result.first_epoch_s == elapsed[0]
    assert 0 < result.first_epoch_s <= result.wall_clock_s
    assert result.group_size == 1 and result.group_wall_clock_s == result.wall_clock_s
    assert result.started_at < result.finished_at
    assert "keras" in result.engine_version
    assert spec.trial_id == result.trial_id


def test_learns_above_chance_after_a_few_epochs(result: TrialResult):
    assert result.test_accuracy > 0.6 and result.train_accuracy > 0.6  # chance is 1/3
    assert result.test_loss < math.log(3)
    assert result.epochs[-1].val_accuracy == pytest.approx(result.test_accuracy, abs=1e-6)


def test_same_seed_same_numbers_different_seed_different(result: TrialResult):
    again = run_trial(result.spec)
    assert [e.loss for e in again.epochs] == [e.loss for e in result.epochs]
    assert again.test_accuracy == result.test_accuracy
    other = run_trial(expand_grid(tiny_grid(epochs=4, batch_size=[7], learning_rate=[0.01], seed=[4]))[0])
    assert [e.loss for e in other.epochs] != [e.loss for e in result.epochs]


def test_huge_learning_rate_diverges_early():
    spec = expand_grid(tiny_grid(epochs=50, batch_size=[10], learning_rate=[1e4], seed=[0]))[0]
    res = run_trial(spec)
    assert res.status == "diverged"
    assert res.epochs_run < 5  # stopped at once, not after 50 epochs on NaN
    assert "non-finite" in res.error
    assert math.isnan(res.test_accuracy)
    assert res.updates == res.epochs_run * 50


def test_an_exception_becomes_a_failed_row(monkeypatch):
    import harness.engines.keras as trial

    def boom(spec, data):
        raise MemoryError("out of memory in a test")

    monkeypatch.setattr(trial, "fit_keras", boom)
    spec = expand_grid(tiny_grid())[0]
    res = run_group([spec])[0]
    assert res.status == "failed" and res.error.splitlines()[0] == "MemoryError: out of memory in a test"
    assert "at test_trial.py:" in res.error and "in boom" in res.error.splitlines()[-1]  # where it failed
    assert res.finished_at is not None and res.updates == 0


def plain_fit_history(spec):
    """The reference path as the tutorial writes it (fit with validation_data, one step per call),
    fed the harness's batch order."""
    import keras

    from harness.problem import build_model, make_data
    from harness.engines.keras import compile_model, epoch_dataset

    data = make_data(spec.problem)
    keras.backend.clear_session()
    model = build_model(spec.model, spec.problem, spec.seed)
    compile_model(model, spec, steps_per_execution=1)
    history = model.fit(epoch_dataset(data, spec), epochs=spec.train.epochs, steps_per_epoch=spec.updates_per_epoch,
                        validation_data=(data.x_test, data.y_test), shuffle=False, verbose=0).history
    final = model.evaluate(data.x_test, data.y_test, verbose=0, return_dict=True)
    return history, final


@pytest.mark.parametrize("batch_size", [7, 500])
def test_fast_keras_path_gives_the_plain_fit_numbers(batch_size):
    spec = expand_grid(tiny_grid(epochs=3, batch_size=[batch_size], learning_rate=[0.01], seed=[2]))[0]
    fast = run_trial(spec)
    history, final = plain_fit_history(spec)
    assert [e.accuracy for e in fast.epochs] == pytest.approx(history["accuracy"], abs=1e-6)
    assert [e.loss for e in fast.epochs] == pytest.approx(history["loss"], rel=1e-5)
    assert [e.val_accuracy for e in fast.epochs] == pytest.approx(history["val_accuracy"], abs=1e-6)
    assert [e.val_loss for e in fast.epochs] == pytest.approx(history["val_loss"], rel=1e-5)
    assert fast.test_accuracy == pytest.approx(final["accuracy"], abs=1e-6)
    assert fast.test_loss == pytest.approx(final["loss"], rel=1e-5)
