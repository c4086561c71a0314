from pathlib import Path

import pytest

from harness.config import ConfigError, GridConfig, TrainConfig, load_grid, parse_grid, with_engine
from harness.grid import count_trials, expand_grid

from conftest import REPO, check_golden

GOOD = {"name": "g", "sweep": {"batch_size": [32], "learning_rate": [0.01], "seed": [0]}}


def _grid(**over):
    raw = {**GOOD, **over}
    return parse_grid(raw, "g.yaml")


def _err(raw) -> str:
    with pytest.raises(ConfigError) as info:
        parse_grid(raw, "g.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("g.yaml: ")
    return message


def test_defaults_are_the_classic_study():
    grid = _grid()
    assert grid.problem.n_samples == 1000 and grid.problem.centers == 3 and grid.problem.n_train == 500
    assert grid.problem.cluster_std == 2.0 and grid.problem.random_state == 2
    assert grid.model.hidden_units == 50 and grid.model.activation == "relu"
    assert grid.model.kernel_initializer == "he_uniform"
    assert grid.train == TrainConfig(optimizer="sgd", momentum=0.9, epochs=200, engine="keras")


def test_misspelt_key_lists_valid_keys_golden():
    message = _err({**GOOD, "sweep": {"batch_size": [1], "learning_rates": [0.1], "seed": [0]}})
    assert "'learning_rates'" in message and "did you mean 'learning_rate'" in message
    assert "momentum" in message and "hidden_units" in message  # lists the valid ones
    check_golden("misspelt_key_error.txt", message + "\n")


@pytest.mark.parametrize("raw, needle", [
    ({**GOOD, "problme": {}}, "unknown key 'problme'"),
    ({**GOOD, "model": {"units": 5}}, "unknown key 'units' under 'model'"),
    ({**GOOD, "train": {"epoch": 5}}, "did you mean 'epochs'"),
    ({**GOOD, "problem": {"n_sample": 5}}, "under 'problem'"),
    ({**GOOD, "sweep": {"batch_size": [0], "learning_rate": [0.1], "seed": [0]}}, "'batch_size' must be a whole number from 1 to 'problem.n_train'"),
    ({**GOOD, "sweep": {"batch_size": [-4], "learning_rate": [0.1], "seed": [0]}}, "from 1 to 'problem.n_train', got -4"),
    ({**GOOD, "sweep": {"batch_size": [2.5], "learning_rate": [0.1], "seed": [0]}}, "must be a whole number"),
    ({**GOOD, "sweep": {"batch_size": [501], "learning_rate": [0.1], "seed": [0]}}, "above 'problem.n_train'"),
    ({**GOOD, "sweep": {"batch_size": [1], "learning_rate": [0.0], "seed": [0]}}, "'learning_rate' must be positive"),
    ({**GOOD, "sweep": {"batch_size": [1], "learning_rate": [-0.1], "seed": [0]}}, "must be positive"),
    ({**GOOD, "sweep": {"batch_size": [1], "learning_rate": ["fast"], "seed": [0]}}, "must be a finite number"),
    ({**GOOD, "sweep": {"batch_size": [], "learning_rate": [0.1], "seed": [0]}}, "empty list"),
    ({**GOOD, "sweep": {"batch_size": [4, 4], "learning_rate": [0.1], "seed": [0]}}, "more than once"),
    ({**GOOD, "sweep": {"batch_size": [4], "seed": [0]}}, "must list 'learning_rate'"),
    ({**GOOD, "sweep": {"batch_size": [4], "learning_rate": [0.1], "seed": [True]}}, "whole number"),
    ({**GOOD, "sweep": []}, "empty list of blocks"),
    ({"name": "g"}, "missing key 'sweep'"),
    ({**GOOD, "name": "../etc"}, "plain identifier"),
    ({**GOOD, "name": "a/b"}, "plain identifier"),
    ({**GOOD, "model": {"activation": "relux"}}, "valid choices: relu, tanh, sigmoid"),
    ({**GOOD, "train": {"optimizer": "adamw"}}, "valid choices: sgd, adam, rmsprop (did you mean 'adam'?)"),
    ({**GOOD, "problem": {"dataset": "mnist"}}, "valid choices: blobs"),
    ({**GOOD, "train": {"momentum": 1.0}}, "momentum' must be in [0, 1)"),
    ({**GOOD, "train": {"epochs": "10"}}, "whole number"),
    ({**GOOD, "problem": {"n_train": 1000}}, "to leave a test set"),
    ({**GOOD, "model": "big"}, "'model' must be a mapping"),
    ([1, 2], "got a list"),
    (None, "the file is empty"),
])
def test_bad_grids_give_one_line_naming_the_key(raw, needle):
    assert needle in _err(raw)


def test_yaml_scientific_notation_without_dot_is_accepted():
    grid = parse_grid({**GOOD, "sweep": {"batch_size": [1], "learning_rate": ["1e-3"], "seed": [0]}}, "g.yaml")
    assert dict(grid.sweep[0])["learning_rate"] == (0.001,)


def test_model_and_train_scalars_can_be_swept():
    grid = _grid(sweep={"batch_size": [32], "learning_rate": [0.01], "seed": [0], "momentum": [0.0, 0.9],
                        "hidden_units": [10, 50]})
    specs = expand_grid(grid)
    assert len(specs) == 4
    assert {(s.train.momentum, s.model.hidden_units) for s in specs} == {(0.0, 10), (0.0, 50), (0.9, 10), (0.9, 50)}


def test_load_grid_file_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such grid file"):
        load_grid(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweep: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line"):
        load_grid(bad)
    with pytest.raises(ConfigError, match="is a directory"):
        load_grid(tmp_path)


def test_yaml_cannot_execute_code(tmp_path: Path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo hi']\nsweep: {}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_grid(evil)


def test_shipped_grids_load_and_have_the_promised_sizes():
    sizes = {p.stem: count_trials(load_grid(p)) for p in (REPO / "grids").glob("*.yaml")}
    assert sizes["full"] == 350 and sizes["seed"] == 40 and sizes["curves"] == 24
    assert sizes["smoke"] <= 16
    seed = expand_grid(load_grid(REPO / "grids" / "seed.yaml"))
    cells = {(s.batch_size, s.learning_rate) for s in seed}
    assert cells == {(500, 0.01), (32, 0.01), (1, 0.01), (1, 0.001)}


def test_engine_override():
    grid = _grid(sweep={"batch_size": [32], "learning_rate": [0.01], "seed": [0], "engine": ["keras"]})
    fused = with_engine(grid, "fused")
    assert {s.train.engine for s in expand_grid(fused)} == {"fused"}
    with pytest.raises(ConfigError, match="valid choices: keras, fused"):
        with_engine(grid, "torch")
    assert isinstance(fused, GridConfig)


def test_command_line_overrides_set_keys_and_are_validated_like_the_file(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("name: g\ntrain: {epochs: 200}\nsweep:\n  batch_size: [32]\n  learning_rate: [0.01]\n"
                    "  seed: [0]\n")
    grid = load_grid(path, ["train.epochs=20", "sweep.seed=[0, 1]", "problem.n_val=100", "name=quick"])
    assert (grid.train.epochs, grid.problem.n_val, grid.name) == (20, 100, "quick")
    assert [s.seed for s in expand_grid(grid)] == [0, 1]
    assert grid.overrides == ("train.epochs=20", "sweep.seed=[0, 1]", "problem.n_val=100", "name=quick")
    # the grid as run is recorded, so a report rebuilds the same plan from the run's metadata
    assert parse_grid(__import__("yaml").safe_load(grid.source), "run").train.epochs == 20
    with pytest.raises(ConfigError, match=r"g.yaml \(with train.epoch=3\): unknown key 'epoch' under 'train'"):
        load_grid(path, ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"'batch_size' must be a whole number from 1 to 'problem.n_train', got 0"):
        load_grid(path, ["sweep.batch_size=[0]"])
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        load_grid(path, ["epochs"])
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        load_grid(path, ["a.b.c=1"])
