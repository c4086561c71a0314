"""Data sets as a grid axis: each loads offline with its shape, classes and split; blobs keeps its
rows; standardization sees the training rows only; a user's file is pinned by its SHA-256;
plugins come only from installed entry points; and both engines agree beyond the blobs."""
from __future__ import annotations

import dataclasses
import hashlib
import socket
import sys
from importlib.metadata import EntryPoint, EntryPoints
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness import datasets
from harness.config import ConfigError, ModelConfig, ProblemConfig, TrainConfig, identity, load_grid, parse_grid
from harness.grid import TrialSpec, expand_grid
from harness.problem import data_shape, initial_weights, make_data

SWEEP = {"batch_size": [1], "learning_rate": [0.1], "seed": [0]}
PLUGINS = Path(__file__).parent / "data"  # plugin_datasets.py: what an installed package would hold


def problem_from(where: str = "g.yaml", **keys) -> ProblemConfig:
    return parse_grid({"problem": keys, "sweep": SWEEP}, where).problem


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a data set tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


BUILT_IN = [
    pytest.param({}, 2, 3, 1000, id="blobs"),
    pytest.param({"dataset": "moons", "noise": 0.2, "n_samples": 600, "n_train": 300, "n_val": 100}, 2, 2, 600,
                 id="moons"),
    pytest.param({"dataset": "circles", "noise": 0.1, "factor": 0.5, "n_samples": 400, "n_train": 200}, 2, 2, 400,
                 id="circles"),
    pytest.param({"dataset": "classification", "n_samples": 800, "n_features": 6, "n_informative": 3,
                  "n_classes": 5, "class_sep": 1.5}, 6, 5, 800, id="classification"),
    pytest.param({"dataset": "digits", "n_train": 1000, "n_val": 397}, 64, 10, 1797, id="digits"),
]


@pytest.mark.parametrize("keys, n_features, n_classes, rows", BUILT_IN)
def test_each_data_set_loads_offline_with_its_shape_classes_and_split(offline, keys, n_features, n_classes, rows):
    problem = problem_from(**keys)
    data = make_data(problem)
    n_train, n_val = problem.n_train, problem.n_val
    assert [len(x) for x in (data.x_train, data.x_val, data.x_test)] == [n_train, n_val, rows - n_train - n_val]
    assert data_shape(problem) == (n_features, n_classes)
    for x, y in data.splits().values():
        assert x.dtype == y.dtype == np.float32 and x.shape[1] == n_features and y.shape[1] == n_classes
        assert (y.sum(axis=1) == 1).all()  # one-hot
    assert set(data.y_train.argmax(axis=1)) == set(range(n_classes))  # every class is trained on


@pytest.fixture
def data_cache(tmp_path, monkeypatch):
    """An empty data cache of the test's own (harness.problem keeps built-in data sets on disk)."""
    from harness import problem

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    problem._data_folder.cache_clear()
    yield tmp_path / "harness-data"
    problem._data_folder.cache_clear()


@pytest.mark.parametrize("keys, n_features, n_classes, rows", BUILT_IN)
def test_built_in_data_sets_are_read_back_from_the_disk_cache_unchanged(data_cache, monkeypatch, keys, n_features,
                                                                         n_classes, rows):
    from harness import problem

    config = problem_from(**keys)
    made = datasets.load_arrays(config)
    assert not list(data_cache.rglob("*.npz"))
    problem._arrays(config)  # made here, and kept
    assert len(list(data_cache.rglob("*.npz"))) == 1
    monkeypatch.setattr(datasets, "load_arrays", lambda p: pytest.fail("made again instead of read from the cache"))
    kept = problem._arrays(config)
    for a, b in zip(made, kept):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_data_cache_tells_settings_apart(data_cache, monkeypatch):
    from harness import problem

    problem._arrays(problem_from(random_state=2))
    made = []
    monkeypatch.setattr(datasets, "load_arrays", lambda p: made.append(p) or (np.zeros((4, 2)), np.arange(4) % 2))
    problem._arrays(problem_from(random_state=3))
    problem._arrays(problem_from(random_state=2, cluster_std=1.0))
    problem._arrays(problem_from(random_state=2, n_train=400))  # split and scaling are made after the cache
    assert [(p.random_state, p.cluster_std) for p in made] == [(3, 2.0), (2, 1.0)]


def test_blobs_gives_exactly_the_rows_of_sklearn_make_blobs():
    from sklearn.datasets import make_blobs

    x, y = make_blobs(n_samples=1000, centers=3, n_features=2, cluster_std=2.0, random_state=2)
    data = make_data(ProblemConfig(n_val=100))
    got_x = np.concatenate([data.x_train, data.x_val, data.x_test])
    got_y = np.concatenate([data.y_train, data.y_val, data.y_test])
    np.testing.assert_array_equal(got_x, x.astype(np.float32))
    np.testing.assert_array_equal(got_y, np.eye(3, dtype=np.float32)[y])


def test_every_new_problem_key_is_id_neutral_at_its_default():
    # The seven keys the first results were written with; nothing else may enter a default id.
    assert identity(ProblemConfig()) == {"dataset": "blobs", "n_samples": 1000, "centers": 3, "n_features": 2,
                                         "cluster_std": 2.0, "random_state": 2, "n_train": 500}
    assert identity(ProblemConfig(standardize="zscore"))["standardize"] == "zscore"


def test_digits_rows_are_shuffled_once_by_random_state():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    first = make_data(problem_from(dataset="digits", random_state=0))
    again = make_data(dataclasses.replace(problem_from(dataset="digits", random_state=0)))
    other = make_data(problem_from(dataset="digits", random_state=1))
    rows = np.concatenate([first.x_train, first.x_test])
    order = np.random.RandomState(0).permutation(len(y))
    np.testing.assert_array_equal(rows, x[order].astype(np.float32))
    np.testing.assert_array_equal(rows, np.concatenate([again.x_train, again.x_test]))
    assert not np.array_equal(first.x_train, other.x_train)
    assert not np.array_equal(first.x_train, x[:500].astype(np.float32))


def test_standardize_uses_training_statistics_only():
    raw = make_data(ProblemConfig(n_val=200))
    scaled = make_data(ProblemConfig(n_val=200, standardize="zscore"))
    mean, std = raw.x_train.astype(np.float64).mean(axis=0), raw.x_train.astype(np.float64).std(axis=0)
    for split in ("train", "val", "test"):
        want = (getattr(raw, f"x_{split}") - mean) / std
        np.testing.assert_allclose(getattr(scaled, f"x_{split}"), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scaled.x_train.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(scaled.x_train.std(axis=0), 1.0, atol=1e-5)
    # Statistics over all rows would give other numbers: the held-out rows did not leak in.
    everything = np.concatenate([raw.x_train, raw.x_val, raw.x_test]).astype(np.float64)
    assert not np.allclose(scaled.x_test, (raw.x_test - everything.mean(axis=0)) / everything.std(axis=0), atol=1e-3)


def test_standardize_keeps_constant_features_finite():
    data = make_data(problem_from(dataset="digits", standardize="zscore"))
    assert np.isfinite(data.x_test).all()
    constant = data.x_train.std(axis=0) == 0  # blank border pixels
    assert constant.any() and (data.x_train[:, constant] == 0).all()


def write_points(folder: Path, name: str) -> Path:
    """Twelve rows, two numeric features, text labels whose sorted order is bird < cat < dog."""
    frame = pd.DataFrame({"x1": np.arange(12) * 0.5, "x2": np.arange(12)[::-1] * 0.25,
                          "species": ["dog", "cat", "bird"] * 4})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    frame.to_csv(path, index=False) if name.endswith(".csv") else frame.to_parquet(path, index=False)
    return path


def file_grid(tmp_path: Path, data_path: str, **keys) -> Path:
    grids = tmp_path / "grids"
    grids.mkdir(exist_ok=True)
    problem = ", ".join(f"{k}: {v}" for k, v in {"dataset": "file", "path": data_path, "label_column": "species",
                                                  "n_train": 6, "n_val": 3, **keys}.items())
    grid = grids / "g.yaml"
    grid.write_text(f"problem: {{{problem}}}\nsweep: {{batch_size: [2], learning_rate: [0.1], seed: [0]}}\n")
    return grid


@pytest.mark.parametrize("name", ["points.csv", "points.parquet"])
def test_file_data_set_from_csv_and_parquet_with_text_labels(tmp_path, monkeypatch, name):
    path = write_points(tmp_path / "data", name)
    monkeypatch.chdir(tmp_path / "data")  # the path is relative to the grid file, not the working folder
    problem = load_grid(file_grid(tmp_path, f"../data/{name}")).problem
    assert problem.path == str(path) and problem.file_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    data = make_data(problem)
    assert [len(x) for x in (data.x_train, data.x_val, data.x_test)] == [6, 3, 3]
    assert data_shape(problem) == (2, 3)
    np.testing.assert_array_equal(data.x_train[:, 0], np.arange(6) * 0.5)
    # dog, cat, bird, ... in sorted order bird=0, cat=1, dog=2
    assert data.y_train.argmax(axis=1).tolist() == [2, 1, 0, 2, 1, 0]


def test_file_integer_labels_become_class_ids_in_sorted_order(tmp_path):
    path = tmp_path / "ints.csv"
    path.write_text("a,label\n" + "".join(f"{i},{lab}\n" for i, lab in enumerate([10, 3, 7, 3, 10, 7, 3, 7])))
    problem = problem_from(str(tmp_path / "g.yaml"), dataset="file", path="ints.csv", n_train=4)
    assert make_data(problem).y_train.argmax(axis=1).tolist() == [2, 0, 1, 0]


def test_file_sha256_is_part_of_the_trial_id(tmp_path):
    path = write_points(tmp_path / "data", "points.csv")
    grid = file_grid(tmp_path, "../data/points.csv")
    before = expand_grid(load_grid(grid))[0]
    path.write_text(path.read_text().replace("dog", "cat", 1))
    after = expand_grid(load_grid(grid))[0]
    assert before.problem.file_sha256 != after.problem.file_sha256
    assert before.trial_id != after.trial_id
    assert "file_sha256" in before.config_values()  # a column of the trials table


def test_grid_pinning_another_sha256_is_refused(tmp_path):
    write_points(tmp_path / "data", "points.csv")
    with pytest.raises(ConfigError, match=r"points\.csv: SHA-256 is [0-9a-f]{64}, but 'problem.file_sha256' pins ab"):
        load_grid(file_grid(tmp_path, "../data/points.csv", file_sha256="ab" * 32))


def test_changed_file_fails_its_trials_with_one_line_naming_it(tmp_path):
    from harness.engines import run_group
    from harness.engines.keras import run_trial

    path = write_points(tmp_path / "data", "points.csv")
    spec = expand_grid(load_grid(file_grid(tmp_path, "../data/points.csv")))[0]
    path.write_text(path.read_text() + "9.0,9.0,cat\n")
    fused = dataclasses.replace(spec, train=dataclasses.replace(spec.train, engine="fused"))
    for result in (run_trial(spec), run_group([fused])[0]):
        assert result.status == "failed"
        first = result.error.splitlines()[0]
        assert str(path) in first and "SHA-256" in first and "changed" in first, first


def test_key_the_data_set_ignores_is_refused_naming_the_keys_it_takes():
    with pytest.raises(ConfigError, match=r"'problem.cluster_std' does not apply to data set 'digits'; "
                                          r"it takes random_state \(and n_train, n_val, standardize"):
        problem_from(dataset="digits", cluster_std=1.0)
    with pytest.raises(ConfigError, match="'problem.path' does not apply to data set 'blobs'"):
        problem_from(path="x.csv")


@pytest.fixture
def spiral_installed(monkeypatch):
    """An entry point ``spiral`` in group harness.datasets, as `pip install` of a plugin makes one."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    installed = EntryPoints([EntryPoint(name="spiral", value="plugin_datasets:spiral", group="harness.datasets")])

    def entry_points(group):
        return installed.select(group=group)

    monkeypatch.setattr(datasets, "entry_points", entry_points)


def test_installed_entry_point_is_a_data_set(spiral_installed):
    problem = problem_from(dataset="spiral", n_samples=300, n_train=200, noise=0.5)  # plugins take any key
    data = make_data(problem)
    assert data_shape(problem) == (2, 2) and len(data.x_test) == 100
    assert "spiral" in datasets.names()


def test_unknown_data_set_lists_builtins_and_installed_entry_points(spiral_installed):
    with pytest.raises(ConfigError, match=r"'dataset' is 'spirals'; valid choices: blobs, moons, circles, "
                                          r"classification, digits, file, spiral \(installed through the "
                                          r"'harness.datasets' entry point group: spiral\) \(did you mean 'spiral'\?\)"):
        problem_from(dataset="spirals")


def test_a_grid_naming_a_module_imports_nothing(spiral_installed):
    sys.modules.pop("plugin_datasets", None)
    for name in ("plugin_datasets", "plugin_datasets:spiral"):
        with pytest.raises(ConfigError, match="valid choices"):
            problem_from(dataset=name)
    assert "plugin_datasets" not in sys.modules  # importable from sys.path, yet never imported


def engine_pair(problem: ProblemConfig, batch_size: int, learning_rate: float):
    from harness.engines import fused
    from harness.engines.keras import run_trial

    spec = TrialSpec(problem=problem, model=ModelConfig(), train=TrainConfig(epochs=3, engine="fused"),
                     batch_size=batch_size, learning_rate=learning_rate, seed=1)
    keras_spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, engine="keras"))
    return fused.run_group([spec])[0], run_trial(keras_spec)


@pytest.mark.parametrize("problem, batch_size, learning_rate", [
    pytest.param(ProblemConfig(dataset="moons", noise=0.2, n_val=250), 7, 0.05, id="moons-bs7"),
    pytest.param(ProblemConfig(dataset="digits", n_train=1000, n_val=397, standardize="zscore"), 48, 0.01,
                 id="digits-bs48"),
])
def test_both_engines_give_equal_results_on(problem, batch_size, learning_rate):
    assert problem.n_train % batch_size  # a ragged last batch
    ours, keras = engine_pair(problem, batch_size, learning_rate)
    assert ours.status == keras.status == "ok", (ours.error, keras.error)
    n_features, n_classes = data_shape(problem)
    assert [w.shape for w in initial_weights(ModelConfig(), problem, 1)] == \
           [(n_features, 50), (50,), (50, n_classes), (n_classes,)]
    assert [e.updates for e in ours.epochs] == [e.updates for e in keras.epochs]
    for a, b in zip(ours.epochs, keras.epochs):
        for name in ("loss", "val_loss"):
            assert getattr(a, name) == pytest.approx(getattr(b, name), abs=1e-5), (a.epoch, name)
        for name in ("accuracy", "val_accuracy"):  # float32 (Keras) against float64 means of the same counts
            assert getattr(a, name) == pytest.approx(getattr(b, name), abs=1e-6), (a.epoch, name)
    for name in ("train", "val", "test"):
        assert getattr(ours, f"{name}_accuracy") == pytest.approx(getattr(keras, f"{name}_accuracy"), abs=1e-6)
        assert getattr(ours, f"{name}_loss") == pytest.approx(getattr(keras, f"{name}_loss"), abs=1e-5)
    assert ours.epochs[-1].loss < 0.8 * ours.epochs[0].loss  # it learned: the agreement is not vacuous


def test_plot_data_set_on_digits_shows_a_pca_projection():
    from matplotlib.figure import Figure

    from harness.figures import plot_data_set

    problem = problem_from(dataset="digits", n_train=1000, n_val=300)
    trials = pd.DataFrame([dataclasses.asdict(problem)] * 2)
    fig = plot_data_set(trials)
    title = fig._suptitle.get_text()
    assert isinstance(fig, Figure)
    assert "PCA" in title and "digits" in title and "10 classes" in title and "1797 rows" in title
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == \
           ["train: 1000 points", "val: 300 points", "test: 497 points"]


def test_a_damaged_data_cache_file_is_made_again(data_cache):
    from harness import problem

    config = problem_from()
    made = problem._arrays(config)
    (kept,) = data_cache.rglob("*.npz")
    for damage in (b"", b"not a zip at all", kept.read_bytes()[:100]):
        kept.write_bytes(damage)
        again = problem._arrays(config)
        for a, b in zip(made, again):
            np.testing.assert_array_equal(a, b)
        assert len(kept.read_bytes()) > 100  # rewritten whole
