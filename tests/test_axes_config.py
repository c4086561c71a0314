"""The optimizer, schedule, scaling and network-shape keys: each bad value is one line naming the
key and the valid choices (in parse_grid, load_grid and on the command line), a key no trial
reads is refused, mixed sweeps give each distinct trial once, the default study keeps its trial
ids, and harness.schedule's rate table matches hand-computed values."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import test_bad_input
from harness.config import ConfigError, ModelConfig, ProblemConfig, TrainConfig, identity, load_grid, parse_grid
from harness.grid import TrialSpec, expand_grid
from harness.schedule import learning_rates

from conftest import GOLDEN, grid_file
from test_cli import assert_one_line_error, harness_run

SWEEP = {"batch_size": [32], "learning_rate": [0.01], "seed": [0]}
NEW_TRAIN_KEYS = {"nesterov", "beta_1", "beta_2", "epsilon", "rho", "schedule", "warmup_updates",
                  "warmup_epochs", "decay_epochs", "decay_factor", "learning_rate_scaling", "base_batch_size"}


def _err(raw) -> str:
    with pytest.raises(ConfigError) as info:
        parse_grid(raw, "g.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("g.yaml: "), message
    return message


def _specs(train=None, model=None, **sweep) -> tuple[TrialSpec, ...]:
    raw = {"sweep": {**SWEEP, **sweep}}
    if train:
        raw["train"] = train
    if model:
        raw["model"] = model
    return expand_grid(parse_grid(raw, "g.yaml"))


# --- one line per bad value ------------------------------------------------------------------

@pytest.mark.parametrize("raw, needles", [
    ({"train": {"optimizer": "adamw"}, "sweep": SWEEP},
     ["'optimizer' is 'adamw'", "valid choices: sgd, adam, rmsprop", "did you mean 'adam'"]),
    ({"sweep": {**SWEEP, "optimizer": ["sgd", "lion"]}}, ["'optimizer' is 'lion'", "valid choices: sgd, adam, rmsprop"]),
    ({"train": {"schedule": "linear"}, "sweep": SWEEP},
     ["'schedule' is 'linear'", "valid choices: constant, step, cosine"]),
    ({"train": {"schedule": "cosin"}, "sweep": SWEEP}, ["did you mean 'cosine'"]),
    ({"train": {"learning_rate_scaling": "log"}, "sweep": SWEEP},
     ["'learning_rate_scaling' is 'log'", "valid choices: none, linear, sqrt"]),
    # a key the optimizer, schedule or scaling does not read, set in train
    ({"train": {"beta_1": 0.5}, "sweep": SWEEP},
     ["'train.beta_1' is not read by any trial", "optimizer 'adam' reads it", "optimizer is 'sgd'"]),
    ({"train": {"optimizer": "adam", "momentum": 0.5}, "sweep": SWEEP}, ["'train.momentum' is not read", "'sgd'"]),
    ({"train": {"optimizer": "adam", "nesterov": True}, "sweep": SWEEP}, ["'train.nesterov' is not read"]),
    ({"train": {"optimizer": "sgd", "rho": 0.5}, "sweep": SWEEP}, ["'train.rho' is not read", "'rmsprop'"]),
    ({"train": {"decay_factor": 0.5}, "sweep": SWEEP}, ["'train.decay_factor' is not read", "schedule 'step'"]),
    ({"train": {"schedule": "cosine", "decay_epochs": 10.0}, "sweep": SWEEP}, ["'train.decay_epochs' is not read"]),
    ({"train": {"base_batch_size": 64}, "sweep": SWEEP},
     ["'train.base_batch_size' is not read", "learning_rate_scaling linear or sqrt"]),
    # swept where no trial of the block reads it
    ({"sweep": {**SWEEP, "beta_1": [0.8, 0.9]}}, ["'sweep.beta_1' is not read by any trial of its block"]),
    ({"sweep": {**SWEEP, "optimizer": ["sgd"], "beta_1": [0.8, 0.9]}}, ["'sweep.beta_1' is not read by any trial"]),
    ({"sweep": [{**SWEEP, "optimizer": "adam", "beta_1": [0.8, 0.9]},
                {**SWEEP, "optimizer": "sgd", "rho": [0.8, 0.9]}]}, ["'sweep.rho' is not read by any trial"]),
    ({"sweep": {**SWEEP, "optimizer": ["adam", "rmsprop"], "momentum": [0.0, 0.9]}}, ["'sweep.momentum' is not read"]),
    ({"sweep": {**SWEEP, "decay_factor": [0.1, 0.5]}}, ["'sweep.decay_factor' is not read"]),
    ({"sweep": {**SWEEP, "base_batch_size": [32, 64]}}, ["'sweep.base_batch_size' is not read"]),
    # warm-up in updates or in epochs, never both
    ({"train": {"warmup_updates": 10, "warmup_epochs": 1.0}, "sweep": SWEEP},
     ["'train.warmup_updates' or 'train.warmup_epochs', not both"]),
    ({"train": {"warmup_epochs": 1.0}, "sweep": {**SWEEP, "warmup_updates": [5, 10]}}, ["not both"]),
    ({"sweep": {**SWEEP, "warmup_updates": [5], "warmup_epochs": [1.0]}}, ["not both"]),
    ({"train": {"warmup_updates": -1}, "sweep": SWEEP}, ["'warmup_updates' must be zero or more, got -1"]),
    ({"train": {"warmup_updates": 2.5}, "sweep": SWEEP}, ["'warmup_updates' must be a whole number"]),
    ({"train": {"warmup_epochs": -0.5}, "sweep": SWEEP}, ["'warmup_epochs' must be zero or more"]),
    # ranges
    ({"train": {"momentum": -0.1}, "sweep": SWEEP}, ["'momentum' must be in [0, 1), got -0.1"]),
    ({"train": {"optimizer": "adam", "beta_1": 1.0}, "sweep": SWEEP}, ["'beta_1' must be in [0, 1), got 1.0"]),
    ({"train": {"optimizer": "adam", "beta_2": 1.5}, "sweep": SWEEP}, ["'beta_2' must be in [0, 1), got 1.5"]),
    ({"train": {"optimizer": "rmsprop", "rho": -0.1}, "sweep": SWEEP}, ["'rho' must be in [0, 1), got -0.1"]),
    ({"sweep": {**SWEEP, "optimizer": "adam", "beta_2": [0.99, 1.0]}}, ["'beta_2' must be in [0, 1), got 1.0"]),
    ({"train": {"optimizer": "adam", "epsilon": 0.0}, "sweep": SWEEP}, ["'epsilon' must be positive"]),
    ({"train": {"schedule": "step", "decay_factor": 0.0}, "sweep": SWEEP}, ["'decay_factor' must be in (0, 1], got 0.0"]),
    ({"train": {"schedule": "step", "decay_factor": 1.5}, "sweep": SWEEP}, ["'decay_factor' must be in (0, 1], got 1.5"]),
    ({"train": {"schedule": "step", "decay_epochs": 0}, "sweep": SWEEP}, ["'decay_epochs' must be positive"]),
    ({"train": {"learning_rate_scaling": "linear", "base_batch_size": 0}, "sweep": SWEEP},
     ["'base_batch_size' must be positive"]),
    ({"train": {"nesterov": "yes"}, "sweep": SWEEP}, ["'nesterov' must be true or false, got 'yes'"]),
    ({"train": {"nesterov": 1}, "sweep": SWEEP}, ["'nesterov' must be true or false, got 1"]),
    ({"sweep": {**SWEEP, "nesterov": [0, 1]}}, ["'nesterov' must be true or false, got 0"]),
    # network shape
    ({"model": {"hidden_units": [50, 20]}, "sweep": SWEEP},
     ["'model.hidden_units' as a list must repeat one width", "[50, 20]", "give hidden_units and depth"]),
    ({"model": {"hidden_units": []}, "sweep": SWEEP}, ["'model.hidden_units' as a list must repeat one width"]),
    ({"model": {"hidden_units": [50, 50], "depth": 3}, "sweep": SWEEP},
     ["'model.hidden_units' lists 2 layers but 'model.depth' is 3"]),
    ({"model": {"hidden_units": [50.5, 50.5]}, "sweep": SWEEP}, ["'hidden_units' must be a whole number"]),
    ({"model": {"depth": 0}, "sweep": SWEEP}, ["'depth' must be positive, got 0"]),
    ({"sweep": {**SWEEP, "depth": [1, 0]}}, ["'depth' must be positive, got 0"]),
    ({"model": {"depth": 1.5}, "sweep": SWEEP}, ["'depth' must be a whole number"]),
    ({"model": {"l2": -1.0e-4}, "sweep": SWEEP}, ["'l2' must be zero or more, got -0.0001"]),
    ({"model": {"l2": "a lot"}, "sweep": SWEEP}, ["'l2' must be a finite number"]),
    # misspelt new keys are suggested
    ({"train": {"warmup_update": 5}, "sweep": SWEEP}, ["unknown key 'warmup_update' under 'train'", "did you mean 'warmup_updates'"]),
    ({"sweep": {**SWEEP, "beta1": [0.9]}}, ["unknown key 'beta1'", "did you mean 'beta_1'"]),
])
def test_bad_new_key_gives_one_line_naming_it(raw, needles):
    message = _err(raw)
    for needle in needles:
        assert needle in message, message


def test_load_grid_names_the_file_and_the_override(tmp_path):
    path = grid_file(tmp_path, "opt", "train: {optimizer: adagrad}\n"
                                      "sweep: {batch_size: [32], learning_rate: [0.01], seed: [0]}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: 'optimizer' is 'adagrad'; valid choices: sgd, adam, rmsprop"):
        load_grid(path)
    good = grid_file(tmp_path, "good", "sweep: {batch_size: [32], learning_rate: [0.01], seed: [0]}\n")
    with pytest.raises(ConfigError, match=r"\(with train.beta_1=0.5\): 'train.beta_1' is not read by any trial"):
        load_grid(good, ["train.beta_1=0.5"])
    grid = load_grid(good, ["model.hidden_units=[64, 64, 64]", "train.optimizer=adam", "train.beta_1=0.8"])
    assert (grid.model.hidden_units, grid.model.depth, grid.train.optimizer, grid.train.beta_1) == (64, 3, "adam", 0.8)


# --- what the new keys do to the trial list ---------------------------------------------------

def test_keys_each_optimizer_reads_are_accepted_with_it():
    (sgd,) = _specs({"optimizer": "sgd", "momentum": 0.5, "nesterov": True})
    (adam,) = _specs({"optimizer": "adam", "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-6})
    (rms,) = _specs({"optimizer": "rmsprop", "rho": 0.95, "epsilon": 1e-6})
    assert (sgd.train.momentum, sgd.train.nesterov) == (0.5, True)
    assert (adam.train.beta_1, adam.train.beta_2, adam.train.epsilon) == (0.8, 0.99, 1e-6)
    assert (rms.train.rho, rms.train.epsilon) == (0.95, 1e-6)
    (step,) = _specs({"schedule": "step", "decay_epochs": 20, "decay_factor": 0.5, "warmup_epochs": 2})
    assert (step.train.decay_epochs, step.train.decay_factor, step.train.warmup_epochs) == (20.0, 0.5, 2.0)
    (scaled,) = _specs({"learning_rate_scaling": "sqrt", "base_batch_size": 64})
    assert scaled.train.base_batch_size == 64


def test_mixed_optimizer_sweep_gives_each_distinct_trial_once():
    specs = _specs(batch_size=[8, 32], learning_rate=[0.01, 0.1], seed=[0, 1],
                   optimizer=["sgd", "adam"], momentum=[0.0, 0.9])
    cells = {}
    for s in specs:
        cells.setdefault((s.batch_size, s.learning_rate, s.seed), []).append((s.train.optimizer, s.train.momentum))
    assert len(cells) == 8 and len(specs) == 24
    for trials in cells.values():  # sgd x 2 momenta + adam once (momentum reset to its default)
        assert sorted(trials) == [("adam", 0.9), ("sgd", 0.0), ("sgd", 0.9)]
    assert len({s.trial_id for s in specs}) == 24


def test_mixed_schedule_sweep_resets_step_keys_for_the_other_schedules():
    specs = _specs(schedule=["constant", "step", "cosine"], decay_factor=[0.1, 0.5])
    assert sorted((s.train.schedule, s.train.decay_factor) for s in specs) == [
        ("constant", 0.1), ("cosine", 0.1), ("step", 0.1), ("step", 0.5)]


def test_sweep_blocks_give_each_optimizer_its_own_keys():
    grid = parse_grid({"sweep": [
        {**SWEEP, "optimizer": "sgd", "momentum": [0.0, 0.9], "nesterov": [False, True]},
        {**SWEEP, "optimizer": "adam", "beta_1": [0.8, 0.9]},
        {**SWEEP, "optimizer": "rmsprop", "rho": [0.9, 0.99]},
    ]}, "g.yaml")
    specs = expand_grid(grid)
    assert len(specs) == 8
    assert {s.train.optimizer for s in specs} == {"sgd", "adam", "rmsprop"}
    assert {s.train.beta_1 for s in specs if s.train.optimizer != "adam"} == {0.9}  # defaults where not read


def test_hidden_units_list_sets_depth_and_depth_can_be_swept():
    assert parse_grid({"model": {"hidden_units": [32, 32, 32]}, "sweep": SWEEP}, "g").model == \
        ModelConfig(hidden_units=32, depth=3)
    assert parse_grid({"model": {"hidden_units": [32], "depth": 1}, "sweep": SWEEP}, "g").model.depth == 1
    specs = _specs(depth=[1, 2, 4], l2=[0.0, 1e-4])
    assert sorted((s.model.depth, s.model.l2) for s in specs) == [
        (d, l2) for d in (1, 2, 4) for l2 in (0.0, 1e-4)]


# --- the default study keeps its trial ids ----------------------------------------------------

def _golden_ids() -> dict[tuple[int, float, int], str]:
    ids = {}
    for line in (GOLDEN / "trial_ids_2x2x1.txt").read_text().splitlines():
        trial_id, *pairs = line.split()
        values = dict(p.split("=") for p in pairs)
        ids[int(values["batch_size"]), float(values["learning_rate"]), int(values["seed"])] = trial_id
    return ids


def test_default_trial_ids_are_unchanged_by_the_new_keys():
    golden = _golden_ids()  # written before the new keys existed: 200 epochs, every other key default
    assert len(golden) == 4
    for (bs, lr, seed), trial_id in golden.items():
        spec = TrialSpec(problem=ProblemConfig(), model=ModelConfig(), train=TrainConfig(),
                         batch_size=bs, learning_rate=lr, seed=seed)
        assert spec.trial_id == trial_id, (bs, lr, seed)
    # writing the new keys out at their defaults changes nothing either
    explicit = parse_grid({
        "model": {"hidden_units": [50], "l2": 0.0},
        "train": {"optimizer": "sgd", "nesterov": False, "schedule": "constant", "warmup_updates": 0,
                  "warmup_epochs": 0.0, "learning_rate_scaling": "none"},
        "sweep": {"batch_size": [32, 500], "learning_rate": [0.01, 0.001], "seed": [0]}}, "g.yaml")
    assert {(s.batch_size, s.learning_rate, s.seed): s.trial_id for s in expand_grid(explicit)} == golden


def test_identity_of_the_defaults_holds_no_new_key():
    assert set(identity(TrainConfig())) == {"optimizer", "momentum", "epochs", "engine"}
    assert set(identity(ModelConfig())) == {"hidden_units", "activation", "kernel_initializer"}
    assert not NEW_TRAIN_KEYS & set(identity(TrainConfig()))
    # and any new key off its default does enter the id
    (base,) = _specs()
    for train in ({"nesterov": True}, {"schedule": "cosine"}, {"warmup_updates": 5},
                  {"learning_rate_scaling": "linear"}, {"optimizer": "adam"}):
        (other,) = _specs(train)
        assert other.trial_id != base.trial_id, train
    for model in ({"depth": 2}, {"l2": 1e-4}):
        (other,) = _specs(model=model)
        assert other.trial_id != base.trial_id, model


# --- the learning-rate table ------------------------------------------------------------------

def _rates(batch_size=100, learning_rate=0.1, epochs=10, **train) -> np.ndarray:
    # blobs: 500 training rows, so batch size 100 is 5 updates per epoch
    (spec,) = _specs({"epochs": epochs, **train}, batch_size=[batch_size], learning_rate=[learning_rate])
    rates = learning_rates(spec)
    assert rates.dtype == np.float32 and rates.shape == (spec.planned_updates,)
    return rates.astype(np.float64)


def test_constant_rate_is_the_learning_rate_everywhere():
    rates = _rates()
    assert len(rates) == 50
    np.testing.assert_array_equal(rates, np.float32(0.1))


def test_warm_up_is_linear_to_the_full_rate():
    rates = _rates(warmup_updates=10)
    np.testing.assert_allclose(rates[:10], 0.1 * np.arange(1, 11) / 10, rtol=1e-6)  # (t + 1) / W
    assert rates[0] == pytest.approx(0.01) and rates[9] == pytest.approx(0.1)
    np.testing.assert_allclose(rates[10:], 0.1, rtol=1e-6)
    # in epochs: 2 epochs of 5 updates is the same 10 updates
    np.testing.assert_array_equal(_rates(warmup_epochs=2), rates)
    # a fractional epoch rounds up to whole updates: 0.5 x 5 = 2.5 -> 3
    assert _rates(warmup_epochs=0.5)[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])


def test_step_schedule_multiplies_by_the_factor_at_each_period_boundary():
    rates = _rates(schedule="step", decay_epochs=2, decay_factor=0.5)  # period 2 x 5 = 10 updates
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(0.1)
    assert rates[10] == pytest.approx(0.05) and rates[19] == pytest.approx(0.05)
    assert rates[20] == pytest.approx(0.025) and rates[49] == pytest.approx(0.1 * 0.5 ** 4)
    assert _rates(schedule="step", decay_epochs=2, decay_factor=1.0) == pytest.approx(np.full(50, 0.1))


def test_cosine_schedule_falls_from_the_rate_to_zero():
    rates = _rates(schedule="cosine")  # T = 50
    assert rates[0] == pytest.approx(0.1)
    assert rates[25] == pytest.approx(0.05)  # half way: (1 + cos(pi/2)) / 2
    assert rates[49] == pytest.approx(0.1 * (1 + math.cos(math.pi * 49 / 50)) / 2)
    assert rates[49] < 1e-3 * 0.1 and rates[49] > 0  # about zero at the last update
    assert np.all(np.diff(rates) <= 0)


def test_cosine_after_warm_up_starts_at_the_end_of_warm_up():
    rates = _rates(schedule="cosine", warmup_updates=10)  # warm-up 10, cosine over the last 40
    assert rates[0] == pytest.approx(0.01) and rates[9] == pytest.approx(0.1)
    assert rates[10] == pytest.approx(0.1)
    assert rates[30] == pytest.approx(0.05)
    assert rates[49] == pytest.approx(0.1 * (1 + math.cos(math.pi * 39 / 40)) / 2)


def test_step_decay_counts_from_update_zero_even_with_warm_up():
    rates = _rates(schedule="step", decay_epochs=1, decay_factor=0.5, warmup_updates=10)
    assert rates[4] == pytest.approx(0.1 * 5 / 10)
    assert rates[5] == pytest.approx(0.1 * 6 / 10 * 0.5)  # the first period (5 updates) is over
    assert rates[10] == pytest.approx(0.1 * 0.5 ** 2)


@pytest.mark.parametrize("scaling, batch_size, base, factor", [
    ("none", 64, 32, 1.0),
    ("linear", 64, 32, 2.0),  # the linear scaling rule: double the batch, double the rate
    ("linear", 8, 32, 0.25),
    ("linear", 32, 32, 1.0),
    ("sqrt", 128, 32, 2.0),
    ("sqrt", 8, 32, 0.5),
])
def test_learning_rate_scaling_with_batch_size(scaling, batch_size, base, factor):
    train = {"learning_rate_scaling": scaling} | ({} if scaling == "none" else {"base_batch_size": base})
    rates = _rates(batch_size=batch_size, learning_rate=0.01, epochs=1, **train)
    np.testing.assert_allclose(rates, 0.01 * factor, rtol=1e-6)


def test_scaling_warm_up_and_cosine_multiply():
    rates = _rates(batch_size=100, learning_rate=0.01, learning_rate_scaling="linear", base_batch_size=25,
                   schedule="cosine", warmup_updates=10)
    assert rates[4] == pytest.approx(0.01 * 4 * 5 / 10)
    assert rates[30] == pytest.approx(0.01 * 4 * 0.5)


# --- keys read by swept settings; fractional epochs --------------------------------------------

def test_train_key_read_by_every_swept_optimizer_is_accepted():
    specs = _specs({"beta_1": 0.8}, optimizer=["adam"])
    assert {s.train.beta_1 for s in specs} == {0.8}


def test_fractional_warm_up_epochs_round_to_the_exact_update_count():
    rates = _rates(batch_size=5, epochs=2, warmup_epochs=1.1)  # 100 updates per epoch: W = 110
    assert rates[109] == pytest.approx(0.1)


# --- the command line -------------------------------------------------------------------------

BAD_GRIDS = {
    "optimizer_unknown": ("'optimizer' is 'adamw'; valid choices: sgd, adam, rmsprop",
                          "train: {optimizer: adamw}"),
    "schedule_unknown": ("'schedule' is 'exponential'; valid choices: constant, step, cosine",
                         "train: {schedule: exponential}"),
    "beta_1_with_sgd": ("'train.beta_1' is not read by any trial; only optimizer 'adam' reads it",
                        "train: {optimizer: sgd, beta_1: 0.5}"),
    "beta_1_swept_with_sgd": ("'sweep.beta_1' is not read by any trial of its block",
                              "train: {optimizer: sgd}"),
    "warmup_both": ("set or sweep 'train.warmup_updates' or 'train.warmup_epochs', not both",
                    "train: {warmup_updates: 10, warmup_epochs: 1.0}"),
    "hidden_units_unequal": ("'model.hidden_units' as a list must repeat one width",
                             "model: {hidden_units: [50, 20]}"),
}


@pytest.mark.parametrize("name", sorted(BAD_GRIDS))
def test_bad_new_key_on_the_command_line_is_exit_2_one_line_nothing_written(name, tmp_path, capsys):
    expected, section = BAD_GRIDS[name]
    sweep = "sweep: {batch_size: [1], learning_rate: [0.1], seed: [0]"
    sweep += ", beta_1: [0.8, 0.9]}" if name == "beta_1_swept_with_sgd" else "}"
    path = grid_file(tmp_path, name, f"# error: {expected}\n{section}\n{sweep}\n")
    # the bad-grid corpus's own check: exit 2, one line naming the file, nothing written
    test_bad_input.test_bad_grid(path, tmp_path, capsys)


def test_python_m_harness_run_refuses_a_bad_new_key(tmp_path):
    path = grid_file(tmp_path, "bad", "train: {optimizer: adam, momentum: 0.5}\n"
                                      "sweep: {batch_size: [1], learning_rate: [0.1], seed: [0]}\n")
    proc = harness_run(path, "--results", tmp_path / "out", "--dry-run")
    assert_one_line_error(proc, f"{path}: 'train.momentum' is not read by any trial")
    assert not (tmp_path / "out").exists()
