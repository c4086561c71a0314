"""The learning rate of every update of a trial: one table that both engines read.

Update t (0-based: the t-th optimizer step) uses

    lr(t) = learning_rate x scale x warmup(t) x decay(t)
    scale     = 1, B/B0 or sqrt(B/B0)   for learning_rate_scaling none, linear (Goyal et al. 2017)
                                        or sqrt, B the batch size and B0 base_batch_size
    warmup(t) = min(1, (t + 1) / W)     W warm-up updates (warmup_updates, or warmup_epochs x
                                        updates per epoch rounded up); 1 when W is 0
    decay(t)  = 1                       constant
              = decay_factor ** floor(t / (decay_epochs x updates per epoch))     step
              = (1 + cos(pi (t - W) / (T - W))) / 2 for t >= W, else 1            cosine
                                        T the trial's planned updates: the rate reaches 0 at T

The table is computed in float64 and rounded once to float32, and the Keras engine looks its
rate up in the same table (``keras_schedule``), so the two engines step with identical rates.
"""
from __future__ import annotations

import math

import numpy as np

from harness.grid import TrialSpec


def scale(spec: TrialSpec) -> float:
    """The batch-size scaling factor of the learning rate."""
    ratio = spec.batch_size / spec.train.base_batch_size
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[spec.train.learning_rate_scaling]


def warmup_updates(spec: TrialSpec) -> int:
    train = spec.train
    # Rounded before the ceiling: 1.1 epochs of 100 updates are 110, not ceil(110.00000000000001).
    return train.warmup_updates or math.ceil(round(train.warmup_epochs * spec.updates_per_epoch, 9))


def is_constant(spec: TrialSpec) -> bool:
    """Whether every update has the same rate (no warm-up, constant schedule)."""
    return spec.train.schedule == "constant" and warmup_updates(spec) == 0


def learning_rates(spec: TrialSpec) -> np.ndarray:
    """float32 [planned_updates]: the rate of every update of the trial."""
    train, total = spec.train, spec.planned_updates
    t = np.arange(total, dtype=np.float64)
    rate = np.full(total, spec.learning_rate * scale(spec))
    w = warmup_updates(spec)
    if w:
        rate *= np.minimum(1.0, (t + 1.0) / w)
    if train.schedule == "step":
        period = round(train.decay_epochs * spec.updates_per_epoch, 9)
        rate *= train.decay_factor ** np.floor(t / period)
    elif train.schedule == "cosine" and total > w:
        rate *= np.where(t >= w, 0.5 * (1.0 + np.cos(math.pi * (t - w) / (total - w))), 1.0)
    return rate.astype(np.float32)


def keras_schedule(spec: TrialSpec):
    """A Keras LearningRateSchedule that reads ``learning_rates(spec)`` at the optimizer's
    iteration count (0 for the first update). Past the table (never, in a trial) it keeps the
    last rate."""
    import keras

    table = learning_rates(spec)

    class _Table(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self):
            self.table = keras.ops.convert_to_tensor(table, dtype="float32")

        def __call__(self, step):
            index = keras.ops.minimum(keras.ops.cast(step, "int32"), len(table) - 1)
            return keras.ops.take(self.table, index)

        def get_config(self):
            return {}

    return _Table()
