"""The update clock, blow-up detection, the validation split and timing probes, in both engines."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from harness.clock import eval_points, examples_at, noise_points
from harness.config import ConfigError, ModelConfig, ProblemConfig, TrainConfig, parse_grid
from harness.engines import fused
from harness.grid import TrialSpec
from harness.problem import make_data


def make_spec(batch_size: int, epochs: int, learning_rate: float = 0.01, seed: int = 0, engine: str = "fused",
              schedule: str = "epoch", per_octave: int = 4, n_val: int = 0) -> TrialSpec:
    return TrialSpec(problem=ProblemConfig(n_val=n_val), model=ModelConfig(),
                     train=TrainConfig(epochs=epochs, engine=engine, eval_schedule=schedule,
                                       eval_points_per_octave=per_octave),
                     batch_size=batch_size, learning_rate=learning_rate, seed=seed)


def as_keras(spec: TrialSpec) -> TrialSpec:
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, engine="keras"))


@pytest.mark.parametrize("per_octave", [4, 8])
@pytest.mark.parametrize("batch_size", [1, 7, 500])
def test_geometric_clock_resolves_every_stretch_to_a_fraction_of_an_octave(batch_size, per_octave):
    spec = make_spec(batch_size, 200, schedule="geometric", per_octave=per_octave)
    points = eval_points(spec)
    assert points[0] == 0 and points[-1] == spec.planned_updates
    assert set(range(spec.updates_per_epoch, spec.planned_updates + 1, spec.updates_per_epoch)) <= set(points)
    # Past the first few integers, the next point is at most 2^(1/k) times the one before (+1 for
    # rounding): a step to target read off the clock is that much too high at worst.
    later = points[points >= per_octave]
    assert np.all(later[1:] <= np.ceil(later[:-1] * 2 ** (1 / per_octave)) + 1)
    assert len(points) <= 200 + per_octave * (math.log2(spec.planned_updates) + 1) + 1


def test_epoch_clock_is_update_zero_and_the_epoch_ends():
    spec = make_spec(7, 3)
    assert eval_points(spec).tolist() == [0, 72, 144, 216]
    assert noise_points(spec).tolist() == []  # the epoch clock stays as cheap as the reference study
    assert [examples_at(spec, u) for u in (0, 1, 71, 72, 73)] == [0, 7, 497, 500, 507]


def test_points_are_scored_on_whole_splits_and_end_at_the_final_scores():
    (result,) = fused.run_group([make_spec(7, 3, schedule="geometric", n_val=250)])
    points = result.points
    assert [p.updates for p in points] == eval_points(result.spec).tolist()
    assert points[0].updates == 0 and points[0].elapsed_s == 0.0
    last = points[-1]
    assert (last.train_loss, last.val_accuracy, last.test_accuracy) == \
           (result.train_loss, result.val_accuracy, result.test_accuracy)
    assert [e.val_accuracy for e in result.epochs] == [p.test_accuracy for p in points if p.updates % 72 == 0][1:]
    measured = [p for p in points if p.updates in set(noise_points(result.spec).tolist())]
    assert [p.updates for p in measured] == noise_points(result.spec).tolist() and len(measured) < len(points)
    assert all(p.grad_sq > 0 and p.trace_sigma > 0 and p.b_simple == pytest.approx(p.trace_sigma / p.grad_sq)
               for p in measured)
    assert all(math.isnan(p.b_simple) for p in points if p not in measured)  # not measured, not zero
    assert all(0 <= p.val_accuracy <= 1 for p in points)


def test_validation_split_takes_the_rows_after_the_training_rows():
    plain, split = make_data(ProblemConfig()), make_data(ProblemConfig(n_val=200))
    np.testing.assert_array_equal(split.x_train, plain.x_train)
    np.testing.assert_array_equal(split.x_val, plain.x_test[:200])
    np.testing.assert_array_equal(split.x_test, plain.x_test[200:])
    assert len(plain.x_val) == 0 and list(plain.splits()) == ["train", "test"]


def test_a_split_larger_than_the_data_is_one_line():
    with pytest.raises(ConfigError, match=r"'problem.n_train' \+ 'problem.n_val' \(1000\) must be below"):
        parse_grid({"problem": {"n_val": 500}, "sweep": {"batch_size": [1], "learning_rate": [0.1], "seed": [0]}},
                   "g.yaml")


@pytest.mark.parametrize("batch_size, epochs", [(7, 3), (500, 6)])
def test_update_clock_is_the_same_in_both_engines(batch_size, epochs):
    """Same points, same values within float32 rounding, on the geometric clock (points inside
    epochs at bs 7: the Keras engine then steps one update per call)."""
    from harness.engines.keras import run_trial

    spec = make_spec(batch_size, epochs, schedule="geometric", n_val=250)
    (ours,) = fused.run_group([spec])
    reference = run_trial(as_keras(spec))
    assert reference.status == ours.status == "ok", reference.error
    assert [p.updates for p in ours.points] == [p.updates for p in reference.points]
    assert [p.examples_seen for p in ours.points] == [p.examples_seen for p in reference.points]
    for a, b in zip(ours.points, reference.points):
        for name in ("train_loss", "val_loss", "test_loss"):
            assert getattr(a, name) == pytest.approx(getattr(b, name), abs=2e-5), (a.updates, name)
        for name in ("train_accuracy", "val_accuracy", "test_accuracy"):
            assert getattr(a, name) == pytest.approx(getattr(b, name), abs=1e-6), (a.updates, name)
        assert a.b_simple == pytest.approx(b.b_simple, rel=1e-3, nan_ok=True), a.updates


def test_finite_blow_up_is_diverged_in_both_engines():
    """bs 2 at lr 0.1: on the geometric clock the loss passes 100x its initial value at update 91
    without ever becoming NaN; such runs end as collapsed classifiers (test accuracy 0.34-0.46
    after 100 epochs). Both engines call it diverged at the same update and stop after epoch 1."""
    from harness.engines.keras import run_trial

    spec = make_spec(2, 3, learning_rate=0.1, schedule="geometric")
    (ours,) = fused.run_group([spec])
    reference = run_trial(as_keras(spec))
    for result in (ours, reference):
        assert result.status == "diverged" and "exceeded 100x its initial" in result.error
        assert all(math.isfinite(p.train_loss) for p in result.points)
        assert result.epochs_run == 1 and math.isnan(result.test_accuracy)
    assert ours.diverged_at_update == reference.diverged_at_update == 91
    assert f"at update {ours.diverged_at_update}" in ours.error


def test_divergence_factor_is_a_grid_key():
    relaxed = make_spec(2, 2, learning_rate=0.1, schedule="geometric")
    relaxed = dataclasses.replace(relaxed, train=dataclasses.replace(relaxed.train, divergence_factor=1e9))
    (result,) = fused.run_group([relaxed])
    assert result.status == "ok" and result.diverged_at_update is None
    with pytest.raises(ConfigError, match="'divergence_factor' must be above 1"):
        parse_grid({"train": {"divergence_factor": 1.0},
                    "sweep": {"batch_size": [1], "learning_rate": [0.1], "seed": [0]}}, "g.yaml")


def test_new_settings_at_their_defaults_keep_trial_ids():
    base = make_spec(32, 10)
    assert base.trial_id == dataclasses.replace(base, problem=ProblemConfig(n_val=0)).trial_id
    assert base.trial_id != make_spec(32, 10, n_val=100).trial_id
    assert base.trial_id != make_spec(32, 10, schedule="geometric").trial_id


def test_timing_probe_measures_one_model_per_batch_size():
    from harness.probe import probe_id, probes_for, run_probe

    specs = [make_spec(bs, 200, learning_rate=lr, seed=s) for bs in (32, 500) for lr in (0.01, 0.1) for s in (0, 1)]
    todo = probes_for(specs)
    assert [s.batch_size for s in todo] == [500, 32]
    assert probes_for(specs, {probe_id(todo[0])}) == [todo[1]]
    row = run_probe(todo[1], repeats=3, min_updates=20)
    assert row["repeats"] == 3 and row["updates_per_repeat"] == 32  # two epochs of 16 updates each
    assert row["seconds_per_update_min"] <= row["seconds_per_update"] <= row["seconds_per_update_max"]
    assert 1e-6 < row["seconds_per_update"] < 0.1


def test_engines_are_separate_studies_not_more_seeds():
    from harness.analysis import CONFIG_NAMES, split_studies

    trials = pd.DataFrame({name: [0] * 4 for name in CONFIG_NAMES})
    trials["seed"] = [0, 1, 0, 1]
    trials["engine"] = ["keras", "keras", "fused", "fused"]
    studies = split_studies(trials)
    assert [label for label, _ in studies] == ["engine=fused", "engine=keras"]
    assert [len(part) for _, part in studies] == [2, 2]
