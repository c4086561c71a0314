"""The problem: data, the network, and the two random things a seed decides.

The harness, not Keras, owns the batch order and the initial weights, so that every engine
trains the same model on the same batches and engines can be compared number for number.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import sys
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from harness import datasets
from harness.cachedir import cache_dir, save_atomic
from harness.config import ModelConfig, ProblemConfig


@dataclass(frozen=True)
class Data:
    """float32 features and one-hot float32 labels, split as the reference study splits them:
    the first n_train rows train, the next n_val validate (empty when n_val is 0), the rest test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(x, y) of each split that has rows, by name: train, val, test."""
        named = {"train": (self.x_train, self.y_train), "val": (self.x_val, self.y_val),
                 "test": (self.x_test, self.y_test)}
        return {name: xy for name, xy in named.items() if len(xy[0])}

    @property
    def n_classes(self) -> int:
        return self.y_train.shape[1]


# Built-in data sets that scikit-learn generates or ships: their arrays are kept on disk, because
# importing scikit-learn takes ~1 s of every worker process, and reading them ~1 ms. Files are
# read as they are (their checksum is checked on each read); a plugin's loader is its own affair.
CACHED_DATA_SETS = ("blobs", "moons", "circles", "classification", "digits")


@lru_cache(maxsize=1)
def _data_folder() -> Path:
    """One folder per scikit-learn and NumPy version and per version of our loaders' code."""
    code = hashlib.sha256(Path(datasets.__file__).read_bytes()).hexdigest()[:12]
    return cache_dir("harness-data", f"sklearn{importlib.metadata.version('scikit-learn')}-"
                                     f"numpy{np.__version__}-{code}")


def _arrays(problem: ProblemConfig) -> datasets.Arrays:
    """``datasets.load_arrays(problem)``, through the disk cache for CACHED_DATA_SETS."""
    if problem.dataset not in CACHED_DATA_SETS:
        return datasets.load_arrays(problem)
    reads = datasets.lookup(problem.dataset).keys or ()
    key = repr((problem.dataset, *((k, getattr(problem, k)) for k in reads)))
    try:
        path = _data_folder() / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".npz")
    except OSError:  # no writable cache folder: load every time
        return datasets.load_arrays(problem)
    try:
        with np.load(path) as kept:
            return kept["x"], kept["labels"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):  # missing or damaged: made again
        x, labels = datasets.load_arrays(problem)
        save_atomic(path, lambda out: np.savez(out, x=x, labels=labels))
        return x, labels


@lru_cache(maxsize=8)
def make_data(problem: ProblemConfig) -> Data:
    """The data set depends only on ``problem``: every trial of a grid sees the same rows.
    Raises DataError (one line) when the data cannot be had, e.g. a file that changed."""
    x, labels = _arrays(problem)
    n, v = problem.n_train, problem.n_train + problem.n_val
    if v >= len(x):  # config validation says so first; this guards problems built in code
        raise datasets.DataError(f"data set '{problem.dataset}' has {len(x)} rows: too few for n_train + n_val "
                                 f"({v}) and a test set")
    if problem.standardize == "zscore":
        x = zscore(x, n)
    onehot = np.eye(int(labels.max()) + 1, dtype=np.float32)[labels]
    for array in (x, onehot):
        array.setflags(write=False)  # cached and shared between trials: nobody may edit it
    return Data(x_train=x[:n], y_train=onehot[:n], x_val=x[n:v], y_val=onehot[n:v], x_test=x[v:], y_test=onehot[v:])


def zscore(x: np.ndarray, n_train: int) -> np.ndarray:
    """Each feature centred and scaled by the mean and standard deviation of the first
    ``n_train`` rows, applied to all rows: validation and test rows must not leak into the
    scaling the model is trained with."""
    train = x[:n_train].astype(np.float64)
    mean, std = train.mean(axis=0), train.std(axis=0)
    std[std == 0] = 1.0  # a constant feature (digits' blank border pixels) stays constant instead of 0/0
    return ((x - mean) / std).astype(np.float32)


def data_shape(problem: ProblemConfig) -> tuple[int, int]:
    """(n_features, n_classes): the network's input and output sizes, read from the data."""
    data = make_data(problem)
    return data.x_train.shape[1], data.n_classes


def batch_order(seed: int, epoch: int, n_train: int) -> np.ndarray:
    """The permutation of training rows for one (0-based) epoch of one seed."""
    return np.random.default_rng((seed, epoch)).permutation(n_train)


def epoch_batches(seed: int, epoch: int, n_train: int, batch_size: int) -> list[np.ndarray]:
    """Row indices of each batch of an epoch; the last batch is short when batch_size doesn't divide n_train."""
    order = batch_order(seed, epoch, n_train)
    return [order[i:i + batch_size] for i in range(0, n_train, batch_size)]


def import_tensorflow():
    """``import tensorflow``, keeping its C++ start-up lines (the oneDNN notice, absl's preamble)
    off stderr when quiet TensorFlow was asked for (TF_CPP_MIN_LOG_LEVEL >= 2, as a worker's
    environment sets it): TensorFlow 2.21 prints them through absl before it reads that
    variable. Its Python logger is quieted the same way (retracing notices). Call it before the
    first ``import keras`` of a process; later calls return the module."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") < "2":
        import tensorflow
        return tensorflow
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    return tensorflow


def build_model(model: ModelConfig, problem: ProblemConfig, seed: int):
    """The reference network, its weights drawn from ``seed`` exactly as Keras draws them."""
    import_tensorflow()
    import keras

    n_features, n_classes = data_shape(problem)  # before seeding: whatever loading draws cannot move the weights
    keras.utils.set_random_seed(seed)
    penalty = keras.regularizers.L2(model.l2) if model.l2 else None
    hidden = [keras.layers.Dense(model.hidden_units, activation=model.activation,
                                 kernel_initializer=model.kernel_initializer, kernel_regularizer=penalty)
              for _ in range(model.depth)]
    return keras.Sequential([keras.Input(shape=(n_features,)), *hidden,
                             keras.layers.Dense(n_classes, activation="softmax", kernel_regularizer=penalty)])


def initial_weights(model: ModelConfig, problem: ProblemConfig, seed: int) -> tuple[np.ndarray, ...]:
    """(W1, b1, ..., Wout, bout) as float32 arrays: what ``build_model`` draws for this seed."""
    import keras

    weights = tuple(np.asarray(w, dtype=np.float32) for w in build_model(model, problem, seed).get_weights())
    keras.backend.clear_session()
    return weights


def pin_threads(n: int) -> None:
    """Keep TensorFlow to ``n`` threads so N cores run N trials without oversubscription."""
    tf = import_tensorflow()

    for setter in (tf.config.threading.set_intra_op_parallelism_threads,
                   tf.config.threading.set_inter_op_parallelism_threads):
        try:
            setter(n)
        except RuntimeError:
            pass  # already set in this process (e.g. a reused Ray worker): the first call holds
