"""Initial weights: drawn by Keras once per (network, data shape, seed), kept on disk, and
handed to the fused engine's workers with their work, so that a worker training fused groups
never imports TensorFlow (about 3 s a process, most of a small grid's time).

Keras draws them (``problem.initial_weights``), so both engines start every seed from the same
weights. The driver draws what a run needs before dispatching it (``prepare``, in a thread
while Ray starts) and attaches each fused task's share (``attach``); a fused group run outside
the driver (a test, a notebook) reads the same cache or draws. The cache holds one ``.npy`` per
key under the user's cache directory (``$XDG_CACHE_HOME/harness-weights``, else a temporary
folder), in a sub-folder per Keras and TensorFlow version, whose draws may differ.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import io
import os
import pickle
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from harness.cachedir import cache_dir, save_atomic
from harness.grid import TrialSpec

Key = tuple  # (n_features, n_classes, hidden_units, depth, kernel_initializer, seed)


def key_of(spec: TrialSpec) -> Key:
    """What the draw depends on: the data's shape, the network's layers and initializer, the seed
    (not the activation, rates or penalty, which draw nothing)."""
    from harness.problem import data_shape

    n_features, n_classes = data_shape(spec.problem)
    model = spec.model
    return (n_features, n_classes, model.hidden_units, model.depth, model.kernel_initializer, spec.seed)


def _version(*names: str) -> str:
    """The installed version of the first distribution found (TensorFlow ships under several)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "none"


@lru_cache(maxsize=1)
def _folder() -> Path:
    return cache_dir("harness-weights", f"keras{_version('keras')}-tf{_version('tensorflow', 'tensorflow-cpu')}")


def _path(key: Key) -> Path:
    return _folder() / (hashlib.sha256(repr(key).encode()).hexdigest()[:24] + ".npy")


def _drawn(spec: TrialSpec) -> np.ndarray:
    from harness.problem import initial_weights

    model = dataclasses.replace(spec.model, l2=0.0)
    return np.concatenate([w.ravel() for w in initial_weights(model, spec.problem, spec.seed)]).astype(np.float32)


def _cached(key: Key) -> np.ndarray | None:
    """The key's weights from the cache; None when they are not there (or unreadable)."""
    try:
        return np.load(_path(key))
    except (OSError, ValueError, EOFError):  # missing, or damaged (an empty file is EOFError)
        return None


def _store(key: Key, flat: np.ndarray) -> np.ndarray:
    save_atomic(_path(key), lambda out: np.save(out, flat))
    return flat


_lock = threading.Lock()
_memo: dict[Key, np.ndarray] = {}  # this process's draws and reads, by key


def flat(spec: TrialSpec) -> np.ndarray:
    """The spec's initial weights, (W1, b1, ..., Wout, bout) ravelled into one float32 array."""
    key = key_of(spec)
    with _lock:
        if key not in _memo:
            weights = _cached(key)
            if weights is None:
                weights = _store(key, _drawn(spec))
            weights.setflags(write=False)
            _memo[key] = weights
        return _memo[key]


class DrawError(RuntimeError):
    """Drawing initial weights failed; the message is the drawing process's last line."""


def prepare(specs: Iterable[TrialSpec], environ: dict[str, str] | None = None) -> dict[Key, np.ndarray]:
    """Every fused spec's initial weights by key, read from the cache or drawn. What is missing
    is drawn in a child process (``python -m harness.initial``): the driver never imports
    TensorFlow for it, and TensorFlow's start-up lines stay in the child's captured stderr."""
    wanted: dict[Key, TrialSpec] = {}
    for spec in specs:
        if spec.train.engine == "fused":
            wanted.setdefault(key_of(spec), spec)
    table, missing = {}, []
    for key, spec in wanted.items():
        weights = _cached(key)
        if weights is None:
            missing.append((key, spec))
        else:
            table[key] = weights
    if missing:
        base = os.environ if environ is None else environ  # the child's environment, TF quieted
        env = {**base, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "-1"}
        child = subprocess.run([sys.executable, "-m", "harness.initial"], input=pickle.dumps([s for _, s in missing]),
                               capture_output=True, env=env, check=False)
        if child.returncode:
            last = (child.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise DrawError(f"drawing initial weights failed: {last}")
        drawn = np.load(io.BytesIO(child.stdout))
        for i, (key, _) in enumerate(missing):
            table[key] = _store(key, drawn[str(i)])
    return table


class Unit(tuple):
    """One task's specs (a tuple, as schedulers and engines use it) and the initial weights its
    fused groups need (``initial``, by key), travelling with it to the worker."""

    initial: dict[Key, np.ndarray] | None = None


def attach(tasks: Sequence[Sequence[TrialSpec]], table: dict[Key, np.ndarray]) -> list[Sequence[TrialSpec]]:
    """``tasks`` with each fused task's share of ``table`` attached (other tasks as they are)."""
    out: list[Sequence[TrialSpec]] = []
    for task in tasks:
        if task and task[0].train.engine == "fused":
            unit = Unit(task)
            unit.initial = {k: table[k] for k in {key_of(s) for s in task} if k in table}
            out.append(unit)
        else:
            out.append(task)
    return out


class Preparing:
    """``prepare`` in a background thread: the driver draws (importing TensorFlow on a cold
    cache) while Ray starts. ``result()`` waits for it; an exception there is re-raised."""

    def __init__(self, specs: Sequence[TrialSpec]):
        self._table: dict[Key, np.ndarray] = {}
        self._error: BaseException | None = None
        # The environment as it is now: the driver sets Ray's workers' while Ray starts.
        self._thread = threading.Thread(target=self._run, args=(list(specs), dict(os.environ)), daemon=True,
                                        name="initial-weights")
        self._thread.start()

    def _run(self, specs: list[TrialSpec], environ: dict[str, str]) -> None:
        try:
            self._table = prepare(specs, environ)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller in result()
            self._error = exc

    def result(self) -> dict[Key, np.ndarray]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._table


if __name__ == "__main__":  # prepare's child: specs pickled on stdin, their weights as .npz on stdout
    drawn = {str(i): _drawn(spec) for i, spec in enumerate(pickle.load(sys.stdin.buffer))}
    buffer = io.BytesIO()
    np.savez(buffer, **drawn)
    sys.stdout.buffer.write(buffer.getvalue())
