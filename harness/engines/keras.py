"""The reference engine: one trial with Keras 3 ``fit``: data → model → fit → evaluate → result.

A trial never raises: an exception becomes a ``failed`` result and a NaN/inf loss stops the
trial early as ``diverged``, so one bad cell cannot take a study down.
"""
from __future__ import annotations

import os
import time

from typing import Sequence

import numpy as np

from harness.clock import eval_points, examples_at, noise_points
from harness.grid import TrialSpec
from harness.noise import noise_if
from harness.problem import Data, build_model, epoch_batches, import_tensorflow, make_data, pin_threads
from harness.schedule import is_constant, keras_schedule, learning_rates
from harness.results import EpochRecord, PointRecord, TrialResult, blow_up, failed_result, make_point, summarize
from harness.schema import utc_now


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


def make_optimizer(spec: TrialSpec):
    """The trial's Keras optimizer, its rate from harness.schedule (a plain number when constant)."""
    import keras

    train = spec.train
    rate = float(learning_rates(spec)[0]) if is_constant(spec) else keras_schedule(spec)
    if train.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=rate, beta_1=train.beta_1, beta_2=train.beta_2,
                                     epsilon=train.epsilon)
    if train.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=rate, rho=train.rho, epsilon=train.epsilon)
    return keras.optimizers.SGD(learning_rate=rate, momentum=train.momentum, nesterov=train.nesterov)


# With an L2 penalty Keras' logged loss includes it; the harness records the data loss (the
# cross-entropy), as the fused engine and every evaluation point do, from this metric instead.
DATA_LOSS = "data_loss"


def compile_model(model, spec: TrialSpec, steps_per_execution: int = 1) -> None:
    import keras

    metrics = ["accuracy"]
    if spec.model.l2:
        metrics.append(keras.metrics.CategoricalCrossentropy(name=DATA_LOSS))
    model.compile(optimizer=make_optimizer(spec), loss="categorical_crossentropy", metrics=metrics,
                  steps_per_execution=steps_per_execution)


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
    """Train with ``fit`` in the harness's batch order, scoring the model at the update clock's
    points; a blown-up trial stops at the end of that epoch. Returns (model, epoch records,
    points, training seconds)."""
    import keras

    n_batches = spec.updates_per_epoch
    wanted = set(eval_points(spec).tolist())
    # A whole epoch per graph call keeps Python out of the step loop; the numbers do not change
    # (tests/test_trial.py compares with a plain fit at steps_per_execution=1). Points inside an
    # epoch (the geometric clock) need the model between steps, so one step per call there.
    per_call = 1 if any(p % n_batches for p in wanted) else n_batches
    model = build_model(spec.model, spec.problem, spec.seed)
    compile_model(model, spec, steps_per_execution=per_call)
    scorers = {name: scorer(model, x, y) for name, (x, y) in data.splits().items()}
    records: list[EpochRecord] = []
    points: list[PointRecord] = []

    noise_at = set(noise_points(spec).tolist())

    def record(updates: int, elapsed: float) -> None:
        weights = [np.asarray(w)[None] for w in model.get_weights()]
        (grad_sq,), (trace,) = noise_if(updates in noise_at, weights, data.x_train, data.y_train,
                                        spec.model.activation)
        points.append(make_point(updates, examples_at(spec, updates), elapsed,
                                 {name: score() for name, score in scorers.items()}, grad_sq, trace))

    record(0, 0.0)
    start = time.perf_counter()

    class _Recorder(keras.callbacks.Callback):
        updates = 0

        def on_train_batch_end(self, batch, logs=None):
            self.updates += per_call
            if self.updates in wanted and self.updates % n_batches:  # epoch ends: on_epoch_end
                record(self.updates, time.perf_counter() - start)

        def on_epoch_end(self, epoch, logs=None):
            record(self.updates, time.perf_counter() - start)
            records.append(EpochRecord(
                epoch=epoch + 1, loss=float(logs[DATA_LOSS if spec.model.l2 else "loss"]),
                accuracy=float(logs["accuracy"]),
                val_loss=points[-1].test_loss, val_accuracy=points[-1].test_accuracy,
                elapsed_s=points[-1].elapsed_s, updates=self.updates))
            if blow_up(spec, points, records) is not None:
                self.model.stop_training = True  # blown up: no point training a collapsed model on

    model.fit(epoch_dataset(data, spec), epochs=spec.train.epochs, steps_per_epoch=n_batches,
              shuffle=False, verbose=0, callbacks=[_Recorder()])
    return model, records, points, time.perf_counter() - start


def run_trial(spec: TrialSpec) -> TrialResult:
    """Train one trial with Keras ``fit``; never raises for a per-trial problem."""
    started = utc_now()
    try:
        tf = import_tensorflow()
        import keras

        pin_threads(int(os.environ.get("HARNESS_THREADS_PER_TRIAL", "1")))
        keras.backend.clear_session()
        _, records, points, wall = fit_keras(spec, make_data(spec.problem))
        keras.backend.clear_session()
        return TrialResult(spec=spec, **summarize(spec, records, points), wall_clock_s=wall, group_size=1,
                           group_wall_clock_s=wall,
                           engine_version=f"keras {keras.__version__} / tensorflow {tf.__version__}",
                           started_at=started, finished_at=utc_now(), epochs=tuple(records), points=tuple(points))
    except Exception as exc:  # noqa: BLE001 - a trial's failure is data, not a crash
        return failed_result(spec, exc, started)


def run_group(specs: Sequence[TrialSpec]) -> list[TrialResult]:
    """Keras trials are isolated measurements: one after another, each timed alone."""
    return [run_trial(spec) for spec in specs]
