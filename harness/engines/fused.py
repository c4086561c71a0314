"""The fused engine: every model of a group trained as one stacked float32 computation.

A group (``work.group_key``) shares data, network shape, optimizer rule, epochs and batch size;
each member keeps its own learning rate and schedule, optimizer hyperparameters, L2 penalty,
initial weights and batch order. Weights carry a leading model axis, so one step of the whole
group is a handful of batched matmuls and elementwise ops, whatever the number of models M is.
The arithmetic is Keras 3's, op for op (``stack`` for the network, ``optimizers`` for the
updates), so the two engines agree to float32 rounding. Epoch ``loss``/``accuracy`` are
batch-size-weighted means of the per-batch values taken before each update, as Keras logs them
(the data loss: an L2 penalty is not in it); ``val_*`` are the latest test-set scores.

Two paths compute this. ``stack.Stack`` is NumPy: a handful of batched ufunc and matmul calls
per step for the whole stack, cheap to start but with a fixed cost per call that dominates at
small batches (1.4 µs per model-update at batch size 1 with 35 models). ``kernel_stack.NumbaStack``
runs the same arithmetic as compiled loops (0.2 µs there), bit for bit on this machine's
default network (tests/test_kernels.py says where), for networks of one hidden layer with any
optimizer option (``numba_supports``); it costs a start-up per process (import numba and load
the compiled kernels; the first time on a machine, compile them: ``kernel_choice.WARM_START_S``
and ``COLD_START_S``). The driver chooses a path per group for the whole run
(``kernel_choice.plan``: numba where the savings exceed the start-up of the processes that pay
it), sent with the task; a group trained on its own goes to numba only when its own saving
exceeds that start-up (``choose_kernel``), so a small grid never waits for a compile;
$HARNESS_FUSED_KERNEL or ``train_fused(kernel=...)`` force a path. Either way the stack's
interface is the same: ``begin_epoch``/``run`` train, ``evaluate`` scores, ``weights`` and
``select`` read and shrink it. Both paths train with denormals flushed to zero, as TensorFlow
does (``denormals``).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from harness.clock import eval_points, examples_at, noise_points
from harness.engines import denormals
from harness.engines.kernel_choice import ENV_VAR, choose_kernel, group_size, numba_supports
from harness.engines.optimizers import Hyper, new_state
from harness.engines.stack import Shape, Stack, Weights, argmax_classes, with_ones
from harness.grid import TrialSpec
from harness import initial
from harness.problem import batch_order, data_shape, make_data, pin_threads
from harness.results import EpochRecord, PointRecord, TrialResult, blown, make_points, summarize
from harness.schema import utc_now
from harness.work import group_key

if TYPE_CHECKING:
    from harness.engines.kernel_stack import NumbaStack



@dataclass(frozen=True)
class FusedTraining:
    """What training a group produced, member by member in the order of its specs."""

    specs: tuple[TrialSpec, ...]
    weights: tuple[Weights, ...]  # final weights; a diverged member's are those it stopped with
    records: tuple[tuple[EpochRecord, ...], ...]
    points: tuple[tuple[PointRecord, ...], ...]
    wall_clock_s: float  # the group's training seconds (all epochs with their test-set passes)
    engine_version: str = f"numpy {np.__version__}"  # what trained it: numpy, or numpy + numba kernels


def _stack_initial(specs: Sequence[TrialSpec]) -> tuple[np.ndarray, Shape]:
    """[M, P] initial weights and the layer widths. The driver sends them with the task
    (``initial.attach``); a group run elsewhere reads them from the cache or draws them."""
    spec = specs[0]
    n_features, n_classes = data_shape(spec.problem)
    shape = (n_features, *[spec.model.hidden_units] * spec.model.depth, n_classes)
    sent = getattr(specs, "initial", None) or {}
    return np.stack([sent[key] if (key := initial.key_of(s)) in sent else initial.flat(s) for s in specs]), shape


def _epoch_loss(loss: np.ndarray, batch_size: int) -> np.ndarray:
    """Keras' running epoch loss [M] from each row's loss [M,n] (the stack's ``epoch_scores``):
    each batch's mean loss weighted by its size."""
    n = loss.shape[1]
    starts = np.arange(0, n, batch_size)
    sizes = np.diff(np.append(starts, n))
    batch_means = np.add.reduceat(loss, starts, axis=1, dtype=np.float32) / sizes.astype(np.float32)
    return (batch_means.astype(np.float64) * sizes).sum(axis=1) / n


def _check_group(specs: Sequence[TrialSpec]) -> None:
    if not specs:
        raise ValueError("fused engine: empty group")
    keys = {group_key(s) for s in specs}
    if len(keys) != 1:
        raise ValueError("fused engine: a group must share problem, model, epochs and batch size "
                         "(build groups with harness.work.group_specs)")


def _epoch_rows(seeds: Sequence[int], epoch: int, n_train: int) -> np.ndarray:
    """[M, n_train] training-row order of each member for one epoch (its ``epoch_batches``, one
    after the other); members share seeds."""
    orders = {seed: batch_order(seed, epoch, n_train) for seed in set(seeds)}
    return np.stack([orders[seed] for seed in seeds])


class _Clock:
    """Scores every active member at the update clock's points (harness.clock): one batched
    forward pass per split for the whole stack, and the gradient noise over the training rows."""

    def __init__(self, specs: Sequence[TrialSpec], data, stack: "Stack | NumbaStack"):
        spec, size = specs[0], len(specs)
        self.spec, self.data, self.sorted = spec, data, eval_points(spec)
        self.at, self.noise_at = set(self.sorted.tolist()), set(noise_points(spec).tolist())
        self.splits = {name: stack.eval_input(x, y) for name, (x, y) in data.splits().items()}
        self.points: list[list[PointRecord]] = [[] for _ in range(size)]
        self.test: tuple[np.ndarray, np.ndarray] | None = None  # the latest test scores, for the epoch rows
        # results.blow_up's rule, checked on the stack's arrays as they come: the limit is each
        # member's divergence_factor times its point-0 training loss; ``bad`` sticks.
        self.factor = np.array([s.train.divergence_factor for s in specs], np.float64)
        self.limit, self.bad = np.full(size, np.inf), np.zeros(size, bool)

    def next_after(self, updates: int) -> int:
        """The first point after ``updates`` (past the last one: a number no run reaches)."""
        i = int(np.searchsorted(self.sorted, updates, side="right"))
        return int(self.sorted[i]) if i < len(self.sorted) else np.iinfo(np.int64).max

    def record(self, stack: "Stack | NumbaStack", members: np.ndarray, updates: int, elapsed: float) -> None:
        scores = {name: stack.evaluate(*split) for name, split in self.splits.items()}
        self.test = scores["test"]
        if updates in self.noise_at:
            grad_sq, trace = stack.gradient_noise(self.data.x_train, self.data.y_train)
        else:
            grad_sq = trace = np.full(len(members), np.nan)
        train_loss = scores["train"][0].astype(np.float64)
        if updates == 0:
            self.limit[members] = self.factor[members] * train_loss
        self.check(members, train_loss, scores["test"][0])
        columns = {name: (loss.tolist(), accuracy.tolist()) for name, (loss, accuracy) in scores.items()}
        points = make_points(updates, examples_at(self.spec, updates), elapsed, columns,
                             np.asarray(grad_sq).tolist(), np.asarray(trace).tolist())
        for i, point in zip(members.tolist(), points):
            self.points[i].append(point)

    def check(self, members: np.ndarray, loss: np.ndarray, held_out: np.ndarray) -> None:
        """Marks the members whose training loss blew up (results.blown) beside ``held_out``."""
        self.bad[members] |= blown(loss, held_out, self.limit[members])


def train_fused(specs: Sequence[TrialSpec], kernel: str | None = None) -> FusedTraining:
    """Train every spec of one group together, scoring all of them at the update clock's points;
    members that blow up stop at the end of that epoch, the rest go on. ``kernel`` picks the
    path: "numpy", "numba", or "auto" (the rule in kernel_choice); None reads
    $HARNESS_FUSED_KERNEL, default auto. The caller pins BLAS threads (run_group does)."""
    _check_group(specs)
    theta, shape = _stack_initial(specs)  # before the tuple() below drops what the task carried
    # The path: asked for here, or in $HARNESS_FUSED_KERNEL, or chosen by the driver for the run
    # (kernel_choice.attach), or else for this group alone (choose_kernel's rule).
    requested = kernel or os.environ.get(ENV_VAR) or getattr(specs, "kernel", None)
    specs = tuple(specs)
    first = specs[0]
    data = make_data(first.problem)
    n, batch, n_epochs = first.problem.n_train, first.batch_size, first.train.epochs
    hyper = Hyper.from_specs(specs)
    path = choose_kernel(group_size(specs), requested) if numba_supports(first) else "numpy"
    stack = _make_stack(path, theta, hyper, shape, first.model.activation)
    members = np.arange(len(specs))  # spec index of each active row of the stack
    final: list[Weights | None] = [None] * len(specs)
    records: list[list[EpochRecord]] = [[] for _ in specs]
    steps = -(-n // batch)
    # Writable copies: numba compiles read-only arrays (the cached data set's) as another type.
    x1_train, y_train = with_ones(data.x_train), np.array(data.y_train)
    labels = argmax_classes(data.y_train)
    clock = _Clock(specs, data, stack)
    updates = 0
    # A diverging member overflows: that is data, not a warning. Denormals flush to zero as in
    # TensorFlow's threads (engines/denormals: Keras' arithmetic, and no microcode assists).
    with np.errstate(all="ignore"), denormals.flushed() as flushing:
        clock.record(stack, members, 0, 0.0)
        start = time.perf_counter()
        for epoch in range(n_epochs):
            rows = _epoch_rows([specs[i].seed for i in members], epoch, n)
            logits = np.empty((len(members), n, y_train.shape[1]), np.float32)
            stack.begin_epoch(x1_train, y_train, rows, batch, logits)
            done = 0
            while done < steps:  # run up to the next clock point; every epoch end is one
                stop = min(steps, clock.next_after(updates) - (updates - done))
                stack.run(done, stop)
                updates, done = updates + stop - done, stop
                if updates in clock.at:
                    clock.record(stack, members, updates, time.perf_counter() - start)
            row_loss, accuracy = stack.epoch_scores(logits, y_train, labels, rows)
            loss = _epoch_loss(row_loss, batch)
            val_loss, val_accuracy = clock.test
            clock.check(members, loss, val_loss)  # the epoch's running mean sees between the points
            elapsed = time.perf_counter() - start
            for i, *values in zip(members.tolist(), loss.tolist(), accuracy.tolist(), val_loss.tolist(),
                                  val_accuracy.tolist()):
                records[i].append(EpochRecord(epoch + 1, *values, elapsed_s=elapsed, updates=updates))
            alive = ~clock.bad[members]
            if not alive.all():
                # Blown-up members stop here, as Keras stops them; the others are untouched
                # (every op is per model), and the stack shrinks so they cost nothing more.
                for row in np.flatnonzero(~alive):
                    final[members[row]] = tuple(w[row].copy() for w in stack.weights())
                members, stack = members[alive], stack.select(alive)
                if not len(members):
                    break
    wall = time.perf_counter() - start
    for row, i in enumerate(members):
        final[i] = tuple(w[row].copy() for w in stack.weights())
    version = f"numpy {np.__version__}"
    if path == "numba":
        import numba

        version += f" + numba {numba.__version__}"
    if not flushing:
        version += " (denormals kept)"
    return FusedTraining(specs=specs, weights=tuple(final), records=tuple(tuple(r) for r in records),
                         points=tuple(tuple(p) for p in clock.points), wall_clock_s=wall, engine_version=version)


def _make_stack(kernel: str, theta: np.ndarray, hyper: Hyper, shape: Shape, activation: str) -> "Stack | NumbaStack":
    if kernel == "numpy":
        return Stack(theta, new_state(hyper.optimizer, theta), hyper, shape, activation)
    from harness.engines import kernel_stack  # imports numba: only groups on the numba path pay for it

    kernel_stack.load()  # compile, or load from the cache, before the training clock starts
    return kernel_stack.NumbaStack.from_flat(theta, np.zeros_like(theta), hyper, shape, activation,
                                             exact=kernel_stack.blas_is_emulated())


def run_group(specs: Sequence[TrialSpec]) -> list[TrialResult]:
    """Train one fused group and return a result per spec, in order (as the Keras engine fills them)."""
    from threadpoolctl import threadpool_limits

    started = utc_now()
    if "tensorflow" in sys.modules:  # only if a draw imported it: initial weights usually come with the task
        pin_threads(1)
    with threadpool_limits(limits=1, user_api="blas"):  # N cores run N groups, not one group on N
        training = train_fused(specs)
    size = len(specs)
    return [TrialResult(spec=spec, **summarize(spec, records, points), wall_clock_s=training.wall_clock_s / size,
                        group_size=size, group_wall_clock_s=training.wall_clock_s,
                        engine_version=training.engine_version, started_at=started, finished_at=utc_now(),
                        epochs=records, points=points)
            for spec, records, points in zip(training.specs, training.records, training.points)]
