"""The fused engine against the Keras engine, number for number, and members against solo runs.

Keras is the reference: the fused engine must land on the same weights, per-epoch logs and
final scores for the same seed, to float32 rounding. Rounding differences grow with the number
of updates (a ReLU unit flipping on a near-zero input shows up as a small jump), so the weight
tolerance is per case. Measured worst cases, |fused - Keras| on weights: 4.4e-5 after 1,000
updates at batch size 1 (where Keras itself is 4.8e-5 from a float64 run and the fused engine
4.4e-6), 2e-6 after 216 updates at 7, 1e-7 after 5 full-batch updates; per-epoch losses
within 4e-6 and accuracies identical (the same rows right).
Steep settings (tanh at lr 0.05) are chaotic enough that two float32 runs drift apart by 1e-3
whatever the engine, so the cases below stay in well-conditioned territory.
"""
from __future__ import annotations

import dataclasses
import math
from functools import lru_cache

import numpy as np
import pytest

from harness.config import ModelConfig, ProblemConfig, TrainConfig
from harness.engines import fused
from harness.engines.fused import train_fused
from harness.grid import TrialSpec
from harness.work import group_specs
from harness.problem import make_data

LOSS_ATOL = 1e-5
ACCURACY_ATOL = 1e-6  # accuracies are counts over 500 rows: one flipped row would be 2e-3


def make_spec(batch_size: int, epochs: int, learning_rate: float = 0.01, seed: int = 0,
              momentum: float = 0.9, activation: str = "relu", engine: str = "fused") -> TrialSpec:
    return TrialSpec(problem=ProblemConfig(), model=ModelConfig(activation=activation),
                     train=TrainConfig(epochs=epochs, momentum=momentum, engine=engine),
                     batch_size=batch_size, learning_rate=learning_rate, seed=seed)


def as_keras(spec: TrialSpec) -> TrialSpec:
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, engine="keras"))


@lru_cache(maxsize=None)
def keras_reference(spec: TrialSpec):
    """Final weights, epoch records and final (loss, accuracy) per split from the Keras engine's
    own fit (``harness.engines.keras.fit_keras``), which ``run_trial`` does not hand back."""
    import keras

    from harness.engines.keras import fit_keras
    from harness.problem import pin_threads

    pin_threads(1)
    keras.backend.clear_session()
    data = make_data(spec.problem)
    model, records, _, _ = fit_keras(as_keras(spec), data)
    final = {}
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        scores = model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
        final[split] = (scores["loss"], scores["accuracy"])
    weights = tuple(np.asarray(w) for w in model.get_weights())
    keras.backend.clear_session()
    return weights, tuple(records), final


def assert_records_close(fused, keras_records, loss_atol=LOSS_ATOL):
    assert [r.epoch for r in fused] == [r.epoch for r in keras_records]
    assert [r.updates for r in fused] == [r.updates for r in keras_records]
    for f, k in zip(fused, keras_records):
        for name in ("loss", "val_loss"):
            assert getattr(f, name) == pytest.approx(getattr(k, name), abs=loss_atol, rel=1e-6), (f.epoch, name)
        for name in ("accuracy", "val_accuracy"):
            assert getattr(f, name) == pytest.approx(getattr(k, name), abs=ACCURACY_ATOL), (f.epoch, name)


def max_weight_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(a, b))


@pytest.mark.parametrize("spec, weight_atol", [
    pytest.param(make_spec(1, 2), 2e-4, id="bs1-momentum0.9"),
    pytest.param(make_spec(7, 3, momentum=0.0), 2e-5, id="bs7-ragged-momentum0"),
    pytest.param(make_spec(7, 3, seed=3), 2e-5, id="bs7-ragged-momentum0.9"),
    pytest.param(make_spec(500, 5), 2e-6, id="bs500-full-batch"),
    pytest.param(make_spec(50, 3, activation="tanh", seed=1), 2e-5, id="bs50-tanh"),
    pytest.param(make_spec(50, 3, learning_rate=0.05, activation="sigmoid"), 2e-5, id="bs50-sigmoid"),
])
def test_fused_matches_keras(spec, weight_atol):
    keras_weights, keras_records, keras_final = keras_reference(spec)
    training = train_fused([spec])
    (weights,), (records,) = training.weights, training.records

    assert [w.shape for w in weights] == [w.shape for w in keras_weights]
    assert max_weight_diff(weights, keras_weights) < weight_atol
    assert_records_close(records, keras_records)
    result = fused.run_group([spec])[0]
    for split, (loss, accuracy) in keras_final.items():
        assert getattr(result, f"{split}_loss") == pytest.approx(loss, abs=LOSS_ATOL)
        assert getattr(result, f"{split}_accuracy") == pytest.approx(accuracy, abs=ACCURACY_ATOL)


def test_fused_trained_at_all():
    """Guards the comparison above against a vacuous pass: the weights did move."""
    from harness.problem import initial_weights

    spec = make_spec(7, 2)
    start = initial_weights(spec.model, spec.problem, spec.seed)
    assert max_weight_diff(train_fused([spec]).weights[0], start) > 1e-2


def test_result_fields_match_keras_engine():
    from harness.engines.keras import run_trial

    spec = make_spec(500, 4)
    keras_result = run_trial(as_keras(spec))
    (result,) = fused.run_group([spec])
    assert keras_result.status == "ok", keras_result.error
    for name in ("status", "error", "epochs_run", "updates", "examples_seen", "group_size", "node_id", "hostname"):
        assert getattr(result, name) == getattr(keras_result, name), name
    for name in ("train_accuracy", "test_accuracy"):
        assert getattr(result, name) == pytest.approx(getattr(keras_result, name), abs=ACCURACY_ATOL)
    for name in ("train_loss", "test_loss"):
        assert getattr(result, name) == pytest.approx(getattr(keras_result, name), abs=LOSS_ATOL)
    assert_records_close(result.epochs, keras_result.epochs)
    # what trained it: the NumPy path, or the numba kernels beside it
    assert result.spec == spec and result.engine_version.split(" + ")[0] == f"numpy {np.__version__}"
    assert result.started_at <= result.finished_at


def test_group_members_equal_solo_runs():
    specs = [make_spec(7, 3, learning_rate=lr, seed=seed, momentum=momentum)
             for lr, seed, momentum in ((0.01, 0, 0.9), (0.05, 0, 0.0), (0.01, 1, 0.0), (0.003, 2, 0.9))]
    assert len(group_specs(specs)) == 1  # the scheduler would hand them over as one group
    together = train_fused(specs)
    for i, spec in enumerate(specs):
        alone = train_fused([spec])
        for a, b in zip(together.weights[i], alone.weights[0]):
            np.testing.assert_array_equal(a, b)
        assert [dataclasses.replace(r, elapsed_s=0.0) for r in together.records[i]] == \
               [dataclasses.replace(r, elapsed_s=0.0) for r in alone.records[0]]
    # different members really are different models
    assert max_weight_diff(together.weights[0], together.weights[1]) > 1e-3
    assert max_weight_diff(together.weights[0], together.weights[2]) > 1e-3


def test_group_results_carry_group_timing():
    specs = [make_spec(50, 3, learning_rate=lr) for lr in (0.01, 0.02, 0.04)]
    results = fused.run_group(specs)
    assert [r.spec for r in results] == specs
    for r in results:
        assert r.status == "ok" and r.group_size == 3
        assert r.wall_clock_s == pytest.approx(r.group_wall_clock_s / 3)
        assert r.first_epoch_s == r.epochs[0].elapsed_s > 0
        assert [e.elapsed_s for e in r.epochs] == sorted(e.elapsed_s for e in r.epochs)
        assert r.epochs[-1].elapsed_s <= r.group_wall_clock_s
        assert [e.updates for e in r.epochs] == [10, 20, 30]
    assert len({r.group_wall_clock_s for r in results}) == 1


def test_diverging_member_stops_without_disturbing_neighbours():
    calm = [make_spec(7, 4, learning_rate=0.01, seed=0), make_spec(7, 4, learning_rate=0.05, seed=1)]
    wild = make_spec(7, 4, learning_rate=1e3, seed=0)
    results = fused.run_group([calm[0], wild, calm[1]])
    baseline = fused.run_group(calm)

    bad = results[1]
    assert bad.status == "diverged" and bad.error and "epoch 1" in bad.error
    assert bad.epochs_run == 1 < wild.train.epochs and len(bad.epochs) == 1
    assert bad.updates == wild.updates_per_epoch
    assert not math.isfinite(bad.epochs[-1].loss) and math.isnan(bad.test_accuracy)
    for got, want in zip((results[0], results[2]), baseline):
        assert got.status == "ok" and got.epochs_run == 4
        for name in ("train_accuracy", "test_accuracy", "train_loss", "test_loss"):
            assert getattr(got, name) == getattr(want, name), name
        assert [dataclasses.replace(r, elapsed_s=0.0) for r in got.epochs] == \
               [dataclasses.replace(r, elapsed_s=0.0) for r in want.epochs]


def test_diverging_member_matches_keras_divergence():
    from harness.engines.keras import run_trial

    spec = make_spec(7, 3, learning_rate=1e3)
    keras_result = run_trial(as_keras(spec))
    (result,) = fused.run_group([spec])
    assert (result.status, result.epochs_run, result.error) == \
           (keras_result.status, keras_result.epochs_run, keras_result.error)


def test_group_stops_when_all_members_diverge():
    specs = [make_spec(7, 200, learning_rate=1e3, seed=s) for s in (0, 1)]
    results = fused.run_group(specs)
    assert [r.status for r in results] == ["diverged", "diverged"]
    assert [r.epochs_run for r in results] == [1, 1]
    # 200 epochs would take far longer than the one that ran
    assert results[0].group_wall_clock_s < 50 * results[0].first_epoch_s + 0.05


def test_rejects_a_mixed_group():
    with pytest.raises(ValueError, match="group"):
        train_fused([make_spec(7, 2), make_spec(8, 2)])


def test_loss_is_computed_from_logits_like_keras():
    """Keras' categorical_crossentropy on a Dense softmax output uses the layer's logits, not
    probabilities clipped to [1e-7, 1 - 1e-7]: with confident wrong predictions the two differ
    (here about 80 against 8.6), and the fused engine must report what Keras reports."""
    import keras

    from harness.engines.stack import evaluate_stacked
    from harness.problem import build_model

    spec = make_spec(7, 1)
    data = make_data(spec.problem)
    model = build_model(spec.model, spec.problem, spec.seed)
    w1, b1, w2, b2 = model.get_weights()
    model.set_weights([w1, b1, w2 * 40, b2])  # logits far apart: softmax saturates below 1e-7
    model.compile(optimizer="sgd", loss="categorical_crossentropy", metrics=["accuracy"])
    scores = model.evaluate(data.x_test, data.y_test, batch_size=len(data.x_test), verbose=0, return_dict=True)
    keras.backend.clear_session()
    loss, accuracy = evaluate_stacked(tuple(w[None] for w in (w1, b1, w2 * 40, b2)), data.x_test, data.y_test, "relu")
    assert scores["loss"] > 20  # the clipped formula would cap each row at -log(1e-7) ~ 16
    assert float(loss[0]) == pytest.approx(scores["loss"], rel=1e-5)
    assert float(accuracy[0]) == pytest.approx(scores["accuracy"], abs=ACCURACY_ATOL)
