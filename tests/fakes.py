"""Cheap stand-ins for the training step, for tests of scheduling and storage logic only.
Every test of training itself uses the real engines."""
from __future__ import annotations

import os

from harness.schema import utc_now
from harness.results import EpochRecord, TrialResult, failed_result


def instant_work(group):
    """A plausible result per spec without training: epochs fixed, numbers derived from the spec."""
    out = []
    for spec in group:
        acc = 0.5 + 0.01 * spec.seed
        now = utc_now()
        epochs = tuple(EpochRecord(e, 1.0 / e, acc, 1.0 / e, acc, 0.001 * e, e * spec.updates_per_epoch)
                       for e in range(1, spec.train.epochs + 1))
        out.append(TrialResult(spec=spec, status="ok", train_accuracy=acc, test_accuracy=acc, train_loss=0.5,
                               test_loss=0.5, epochs_run=spec.train.epochs, updates=spec.planned_updates,
                               examples_seen=spec.train.epochs * spec.problem.n_train, wall_clock_s=0.001,
                               first_epoch_s=0.001, group_size=len(group), group_wall_clock_s=0.001,
                               engine_version="fake", started_at=now, finished_at=utc_now(), epochs=epochs))
    return out


def failing_seed_one(group):
    """Fails every trial with seed 1, as a crashing trial would."""
    return [failed_result(s, RuntimeError("seed one is cursed")) if s.seed == 1 else instant_work([s])[0]
            for s in group]


def die_on_seed_one(group):
    """Kills its own worker process for seed 1, as an OOM-kill or a segfault would."""
    if any(s.seed == 1 for s in group):
        os._exit(1)
    return instant_work(group)


def die_once_then_work(marker_dir, group):
    """Kills its worker the first time it sees each trial, then succeeds: a transient crash."""
    from pathlib import Path

    for spec in group:
        marker = Path(marker_dir) / spec.trial_id
        if not marker.exists():
            marker.write_text("died once")
            os._exit(1)
    return instant_work(group)


def timed_work(marker_dir, group):
    """Sleeps a little and writes when it ran, so a test can see how many groups overlapped."""
    import time
    from pathlib import Path

    start = time.time()
    time.sleep(1.0)  # long enough that a second, already-started worker overlaps it
    Path(marker_dir, group[0].trial_id).write_text(f"{start} {time.time()}")
    return instant_work(group)


def environment(group):
    """What a worker's environment says of the thread budget and TensorFlow's logging."""
    return [{key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "HARNESS_THREADS_PER_TRIAL",
                                                  "TF_CPP_MIN_LOG_LEVEL")}]
