"""One trial with the reference engine (Keras 3 ``fit``): data → model → fit → evaluate → result.

A trial never raises: an exception becomes a ``failed`` result and a NaN/inf loss stops the
trial early as ``diverged``, so one bad cell cannot take a study down.
"""
from __future__ import annotations

import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Sequence

import numpy as np

from harness.grid import TrialSpec
from harness.problem import Data, build_model, epoch_batches, make_data
from harness.schema import utc_now


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    elapsed_s: float
    updates: int


@dataclass(frozen=True)
class TrialResult:
    spec: TrialSpec
    status: str
    error: str | None = None
    train_accuracy: float = math.nan
    test_accuracy: float = math.nan
    train_loss: float = math.nan
    test_loss: float = math.nan
    epochs_run: int = 0
    updates: int = 0
    examples_seen: int = 0
    wall_clock_s: float = math.nan
    first_epoch_s: float = math.nan
    group_size: int = 1
    group_wall_clock_s: float = math.nan
    engine_version: str = ""
    node_id: str = "local"
    hostname: str = field(default_factory=socket.gethostname)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    epochs: tuple[EpochRecord, ...] = ()

    @property
    def trial_id(self) -> str:
        return self.spec.trial_id


def failed_result(spec: TrialSpec, exc: BaseException | str, started_at: datetime | None = None,
                  **fields_) -> TrialResult:
    """A ``failed`` row carrying the error; used by engines and by schedulers for lost workers."""
    error = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}".strip()
    return TrialResult(spec=spec, status="failed", error=error[:2000], started_at=started_at or utc_now(),
                       finished_at=utc_now(), **fields_)


def pin_threads(n: int) -> None:
    """Keep TensorFlow to ``n`` threads so N cores run N trials without oversubscription."""
    import tensorflow as tf

    for setter in (tf.config.threading.set_intra_op_parallelism_threads,
                   tf.config.threading.set_inter_op_parallelism_threads):
        try:
            setter(n)
        except RuntimeError:
            pass  # already set in this process (e.g. a reused Ray worker): the first call holds


def summarize_epochs(spec: TrialSpec, records: Sequence[EpochRecord]) -> dict:
    """Per-trial fields derived from the per-epoch records, the same way for every engine."""
    epochs_run = len(records)
    last = records[-1] if records else None
    diverged = last is not None and not all(math.isfinite(v) for v in (last.loss, last.val_loss))
    return {
        "status": "diverged" if diverged else "ok",
        "error": f"loss became non-finite in epoch {last.epoch}" if diverged else None,
        "epochs_run": epochs_run,
        "updates": epochs_run * spec.updates_per_epoch,
        "examples_seen": epochs_run * spec.problem.n_train,
        "first_epoch_s": records[0].elapsed_s if records else math.nan,
    }


def epoch_arrays(data: Data, spec: TrialSpec) -> tuple[np.ndarray, np.ndarray]:
    """Training rows in the harness's batch order, shaped (epochs, n_train, ...)."""
    orders = [np.concatenate(epoch_batches(spec.seed, e, spec.problem.n_train, spec.batch_size))
              for e in range(spec.train.epochs)]
    return data.x_train[np.stack(orders)], data.y_train[np.stack(orders)]


def epoch_dataset(data: Data, spec: TrialSpec):
    """A tf.data pipeline of all epochs' batches in the harness's order. One element per epoch,
    re-batched inside the epoch: batches never straddle epochs and the last one is short, as in
    ``fit(shuffle=False)``."""
    import tensorflow as tf

    xs, ys = epoch_arrays(data, spec)
    return tf.data.Dataset.from_tensor_slices((xs, ys)).flat_map(
        lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)).batch(spec.batch_size))


def compile_model(model, spec: TrialSpec, steps_per_execution: int = 1) -> None:
    import keras

    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=spec.learning_rate, momentum=spec.train.momentum),
        loss="categorical_crossentropy", metrics=["accuracy"], steps_per_execution=steps_per_execution)


def scorer(model, x: np.ndarray, y: np.ndarray):
    """A compiled (loss, accuracy) of ``model`` on one whole split: the numbers ``evaluate`` gives
    for a single batch, without its per-call set-up (about 0.7 ms instead of 50-150 ms)."""
    import keras
    import tensorflow as tf

    x, y = tf.constant(x), tf.constant(y)

    @tf.function
    def score():
        probs = model(x, training=False)
        loss = tf.reduce_mean(keras.losses.categorical_crossentropy(y, probs))
        hits = tf.equal(tf.argmax(probs, axis=1), tf.argmax(y, axis=1))
        return loss, tf.reduce_mean(tf.cast(hits, tf.float32))

    return lambda: tuple(float(v) for v in score())


def fit_keras(spec: TrialSpec, data: Data):
    import keras

    n_batches = spec.updates_per_epoch
    model = build_model(spec.model, spec.problem, spec.seed)
    # A whole epoch per graph call keeps Python out of the step loop; the numbers do not change
    # (tests/test_trial.py compares with a plain fit at steps_per_execution=1).
    compile_model(model, spec, steps_per_execution=n_batches)
    score_test = scorer(model, data.x_test, data.y_test)
    records: list[EpochRecord] = []
    start = time.perf_counter()

    class _Recorder(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            val_loss, val_accuracy = score_test()
            records.append(EpochRecord(
                epoch=epoch + 1, loss=float(logs["loss"]), accuracy=float(logs["accuracy"]),
                val_loss=val_loss, val_accuracy=val_accuracy,
                elapsed_s=time.perf_counter() - start, updates=(epoch + 1) * n_batches))
            if not (math.isfinite(records[-1].loss) and math.isfinite(val_loss)):
                self.model.stop_training = True  # diverged: no point running more epochs on NaN

    model.fit(epoch_dataset(data, spec), epochs=spec.train.epochs, steps_per_epoch=n_batches,
              shuffle=False, verbose=0, callbacks=[_Recorder()])
    return model, records, time.perf_counter() - start


def run_trial(spec: TrialSpec) -> TrialResult:
    """Train one trial with Keras ``fit``; never raises for a per-trial problem."""
    started = utc_now()
    try:
        import keras
        import tensorflow as tf

        pin_threads(int(os.environ.get("HARNESS_THREADS_PER_TRIAL", "1")))
        keras.backend.clear_session()
        data = make_data(spec.problem)
        model, records, wall = fit_keras(spec, data)
        summary = summarize_epochs(spec, records)
        final = {}
        if summary["status"] == "ok":
            for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
                final[f"{split}_loss"], final[f"{split}_accuracy"] = scorer(model, x, y)()
        keras.backend.clear_session()
        return TrialResult(spec=spec, **summary, **final, wall_clock_s=wall, group_size=1,
                           group_wall_clock_s=wall,
                           engine_version=f"keras {keras.__version__} / tensorflow {tf.__version__}",
                           started_at=started, finished_at=utc_now(), epochs=tuple(records))
    except Exception as exc:  # noqa: BLE001 - a trial's failure is data, not a crash
        return failed_result(spec, exc, started)


def run_group(specs: Sequence[TrialSpec]) -> list[TrialResult]:
    """Run one unit of work from ``grid.group_specs``: a fused group or a single Keras trial."""
    if specs and specs[0].train.engine == "fused":
        from harness.fused import run_fused_group

        try:
            return run_fused_group(specs)
        except Exception as exc:  # noqa: BLE001
            detail = f"{type(exc).__name__}: {exc} ({traceback.extract_tb(exc.__traceback__)[-1].name})"
            return [failed_result(s, detail) for s in specs]
    return [run_trial(spec) for spec in specs]


def with_node(results: Sequence[TrialResult], node_id: str) -> list[TrialResult]:
    return [replace(r, node_id=node_id) for r in results]
