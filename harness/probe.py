"""Timing probes: the steady seconds per update of one model alone, per batch size.

A fused trial's wall clock is its group's time divided by the group's size, a number no user
will ever see on a clock. Seconds to target are instead drawn as updates to target times this
probe: one Keras model (the reference engine), one thread, the epoch as one graph call as the
Keras engine runs it, no per-epoch scoring; the first epoch (tracing) is a warm-up, then
``REPEATS`` timed repeats of at least ``MIN_UPDATES`` updates each; median, min and max kept.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import socket
import time
from typing import Sequence

import numpy as np

from harness.config import identity
from harness.grid import TrialSpec
from harness.schema import utc_now

REPEATS = 5
MIN_UPDATES = 50


def probe_id(spec: TrialSpec) -> str:
    """What the cost of an update depends on: data shape, network, optimizer and batch size
    (not the learning rate, the seed or the number of epochs)."""
    train = {"optimizer": spec.train.optimizer, "momentum": spec.train.momentum > 0}
    blob = json.dumps({"problem": identity(spec.problem), "model": identity(spec.model), "train": train,
                       "batch_size": spec.batch_size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def probes_for(specs: Sequence[TrialSpec], done: set[str] = frozenset()) -> list[TrialSpec]:
    """One representative spec per probe id not in ``done``, largest batch size first."""
    chosen: dict[str, TrialSpec] = {}
    for spec in specs:
        chosen.setdefault(probe_id(spec), spec)
    todo = [s for pid, s in chosen.items() if pid not in done]
    return sorted(todo, key=lambda s: -s.batch_size)


def run_probe(spec: TrialSpec, repeats: int = REPEATS, min_updates: int = MIN_UPDATES) -> dict:
    """Time ``spec``'s update on this process's one thread; a row of schema.PROBE_COLUMNS (run_id
    is filled in by the store)."""
    from harness.problem import build_model, import_tensorflow, make_data, pin_threads

    tf = import_tensorflow()
    import keras

    from harness.engines.keras import compile_model, epoch_dataset

    pin_threads(1)
    keras.backend.clear_session()
    per_epoch = spec.updates_per_epoch
    epochs_per_repeat = math.ceil(min_updates / per_epoch)
    epochs = 1 + repeats * epochs_per_repeat
    timed = dataclasses.replace(spec, train=dataclasses.replace(spec.train, epochs=epochs))
    model = build_model(spec.model, spec.problem, spec.seed)
    compile_model(model, timed, steps_per_execution=per_epoch)
    ends: list[float] = []

    class _Clock(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            ends.append(time.perf_counter())

    model.fit(epoch_dataset(make_data(spec.problem), timed), epochs=epochs, steps_per_epoch=per_epoch,
              shuffle=False, verbose=0, callbacks=[_Clock()])
    keras.backend.clear_session()
    marks = np.array(ends[::epochs_per_repeat])  # the end of the warm-up epoch, then each repeat's
    seconds = np.diff(marks[:repeats + 1]) / (epochs_per_repeat * per_epoch)
    return {"probe_id": probe_id(spec), "batch_size": spec.batch_size,
            "seconds_per_update": float(np.median(seconds)), "seconds_per_update_min": float(seconds.min()),
            "seconds_per_update_max": float(seconds.max()), "repeats": int(len(seconds)),
            "updates_per_repeat": int(epochs_per_repeat * per_epoch),
            "engine_version": f"keras {keras.__version__} / tensorflow {tf.__version__}",
            "hostname": socket.gethostname(), "measured_at": utc_now()}


def run_probes(specs: Sequence[TrialSpec]) -> list[dict]:
    """A unit of work for the schedulers: the probe of each spec, one after another."""
    return [run_probe(spec) for spec in specs]
