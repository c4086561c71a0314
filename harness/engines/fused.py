"""The fused engine: every model of a group trained as one stacked float32 NumPy computation.

A group (``work.group_specs``) shares data, network shape, epochs and batch size; each member
keeps its own learning rate, momentum, initial weights and batch order. Weights carry a leading
model axis (W1 [M,F,H], b1 [M,H], W2 [M,H,C], b2 [M,C]), so one step of the whole group is a
handful of batched matmuls and elementwise ops, whatever M is.

The arithmetic is Keras 3's, op for op, so the two engines agree to float32 rounding:
- the loss is computed from the logits (a Dense softmax layer hands Keras its logits, so
  ``categorical_crossentropy`` takes the ``softmax_cross_entropy_with_logits`` path and never
  clips), averaged over the batch; its gradient is ``(softmax - y) * (1/B)``;
- SGD: ``m = m*momentum - g*lr; w = w + m``. With momentum 0 Keras does ``w = w - g*lr``
  instead, which is the same float32 result (0*m is exactly 0), so one formula serves both;
- epoch ``loss``/``accuracy`` are batch-size-weighted means of the per-batch values taken
  before each update; ``val_*`` are one full-batch pass over the test rows after the epoch.

Two paths compute this. ``_Stack`` below is NumPy: a handful of batched ufunc and matmul calls
per step for the whole stack, cheap to start but with a fixed cost per call that dominates at
small batches (1.4 µs per model-update at batch size 1 with 35 models). ``kernel_stack.NumbaStack``
runs the same arithmetic as compiled loops (0.2 µs there), bit for bit on this machine's
default network (tests/test_kernels.py says where), and scores the clock's points 1.5x faster
on small networks (it leaves larger ones to NumPy's scoring, faster there); it costs a start-up
per process (import numba and load the compiled kernels, ~0.7 s; the first time on a machine,
compile them, ~4 s). ``kernel_choice.choose_kernel`` takes the numba path only
when a group's estimated saving exceeds that start-up, so small groups (under ~1 s of NumPy
work) stay on NumPy and a small grid never waits for a compile; $HARNESS_FUSED_KERNEL or
``train_fused(kernel=...)`` force a path. Either way the stack's interface is the same:
``begin_epoch``/``run`` train, ``evaluate`` scores, ``weights`` and ``select`` read and shrink it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Sequence

import numpy as np

from harness.clock import eval_points, examples_at, noise_points
from harness.config import ModelConfig, ProblemConfig
from harness.engines.kernel_choice import GroupSize, choose_kernel
from harness.noise import noise_if
from harness.grid import TrialSpec
from harness.problem import data_shape, epoch_batches, initial_weights, make_data, pin_threads
from harness.results import EpochRecord, PointRecord, TrialResult, blow_up, make_point, summarize
from harness.schema import utc_now
from harness.work import group_key

if TYPE_CHECKING:
    from harness.engines.kernel_stack import NumbaStack

Weights = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # (W1, b1, W2, b2)


@dataclass(frozen=True)
class FusedTraining:
    """What training a group produced, member by member in the order of its specs."""

    specs: tuple[TrialSpec, ...]
    weights: tuple[Weights, ...]  # final weights; a diverged member's are those it stopped with
    records: tuple[tuple[EpochRecord, ...], ...]
    points: tuple[tuple[PointRecord, ...], ...]
    wall_clock_s: float  # the group's training seconds (all epochs with their test-set passes)
    engine_version: str = f"numpy {np.__version__}"  # what trained it: numpy, or numpy + numba kernels


def activate(name: str, z: np.ndarray, out: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(z, 0.0, out=out)
    if name == "tanh":
        return np.tanh(z, out=out)
    if name == "sigmoid":
        np.negative(z, out=out)
        np.exp(out, out=out)
        out += 1.0
        return np.reciprocal(out, out=out)
    raise ValueError(f"fused engine: unknown activation {name!r}; valid: relu, tanh, sigmoid")


def _activation_grad(name: str, z: np.ndarray, a: np.ndarray, da: np.ndarray, mask: np.ndarray,
                     out: np.ndarray) -> None:
    # The gradients TensorFlow uses: ReluGrad masks on z > 0, TanhGrad da*(1-a*a), SigmoidGrad da*a*(1-a).
    if name == "relu":
        np.greater(z, 0.0, out=mask)
        np.multiply(da, mask, out=out)
    elif name == "tanh":
        np.multiply(a, a, out=out)
        np.subtract(1.0, out, out=out)
        np.multiply(out, da, out=out)
    else:
        np.subtract(1.0, a, out=out)
        np.multiply(out, a, out=out)
        np.multiply(out, da, out=out)


def reduce_classes(ufunc: np.ufunc, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``ufunc`` folded over the short last (class) axis: C-1 calls on [...] slices, many times
    faster than a NumPy reduction whose inner loop is only C long."""
    out = ufunc(x[..., 0], x[..., 1], out=out)
    for c in range(2, x.shape[-1]):
        ufunc(out, x[..., c], out=out)
    return out


def argmax_classes(x: np.ndarray) -> np.ndarray:
    """argmax over the last axis, first index on ties (as np.argmax and tf.argmax), without the
    slow short-axis reduction."""
    # The narrowest index type that holds every class id (int8 would wrap past 127 classes).
    best, index = x[..., 0].copy(), np.zeros(x.shape[:-1], np.min_scalar_type(x.shape[-1] - 1))
    for c in range(1, x.shape[-1]):
        np.copyto(index, c, where=x[..., c] > best)
        np.maximum(best, x[..., c], out=best)
    return index


def softmax_xent(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row cross-entropy from logits and the softmax probabilities, over the last axis,
    as TF's SoftmaxCrossEntropyWithLogits: sum(labels * (log(sum(exp(s))) - s)), s = z - max(z)."""
    shifted = logits - reduce_classes(np.maximum, logits)[..., None]
    exp = np.exp(shifted)
    total = reduce_classes(np.add, exp)[..., None]
    loss = reduce_classes(np.add, labels * (np.log(total) - shifted))
    return loss, exp / total


def evaluate_stacked(weights: Weights, x: np.ndarray, y: np.ndarray, activation: str) -> tuple[np.ndarray, np.ndarray]:
    """(loss [M], accuracy [M]) of every stacked model on all of (x, y), as one full batch."""
    w1, _, w2, _ = weights
    flat = np.concatenate([w.reshape(len(w), -1) for w in weights], axis=1).astype(np.float32)
    unused = np.zeros((len(flat), 1), np.float32)  # learning rate and momentum: no training here
    stack = _Stack(flat, unused, unused, unused, (w1.shape[1], w1.shape[2], w2.shape[2]), activation)
    return stack.evaluate(*stack.eval_input(x, y))


def with_ones(x: np.ndarray) -> np.ndarray:
    """x with a column of ones appended: x1 @ [[W1], [b1]] is the first layer with its bias, and
    x1.T @ dz1 yields the kernel and bias gradients in one matmul (no [M,B,H] add or sum)."""
    return np.concatenate([x, np.ones((*x.shape[:-1], 1), x.dtype)], axis=-1)


@dataclass(frozen=True)
class _Buffers:
    """Scratch arrays for one batch size B (M models, H hidden units, C classes)."""

    z1: np.ndarray  # [M,B,H] pre-activation
    a1: np.ndarray  # [M,B,H] activation
    da1: np.ndarray  # [M,B,H] dLoss/da1
    dz1: np.ndarray  # [M,B,H] dLoss/dz1
    mask: np.ndarray  # [M,B,H] bool, z1 > 0
    logits: np.ndarray  # [M,B,C] for evaluation passes (training writes the caller's array)
    prob: np.ndarray  # [M,B,C] softmax, then dLoss/dlogits
    col: np.ndarray  # [M,B,1] per-row max, then per-row sum
    inv_batch: np.float32

    @classmethod
    def allocate(cls, m: int, batch: int, hidden: int, classes: int) -> "_Buffers":
        def empty(width, dtype=np.float32):
            return np.empty((m, batch, width), dtype)

        return cls(z1=empty(hidden), a1=empty(hidden), da1=empty(hidden), dz1=empty(hidden),
                   mask=empty(hidden, bool), logits=empty(classes), prob=empty(classes), col=empty(1),
                   inv_batch=np.float32(1.0) / np.float32(batch))


class _Stack:
    """The active members' parameters, momenta and reusable buffers.

    Parameters, gradients and momenta each live in one [M, P] array laid out (W1, b1, W2, b2),
    so [[W1], [b1]] is a [M, F+1, H] view and the optimizer step is four ufunc calls for all
    layers of all models. Buffers are kept per batch size: fresh multi-megabyte arrays would
    cost page faults on every step."""

    def __init__(self, theta: np.ndarray, velocity: np.ndarray, lr: np.ndarray, momentum: np.ndarray,
                 shape: tuple[int, int, int], activation: str):
        self.theta, self.velocity, self.lr, self.momentum = theta, velocity, lr, momentum
        self.shape, self.activation = shape, activation
        self._epoch: tuple = ()  # the epoch begun (begin_epoch)
        self.grad = np.empty_like(theta)
        self.w1b, self.w2, self.b2 = self._views(theta)
        self.dw1b, self.dw2, self.db2 = self._views(self.grad)
        self._buffers: dict[int, _Buffers] = {}

    def _views(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f, h, c = self.shape
        m, cut1, cut2 = flat.shape[0], (f + 1) * h, (f + 1) * h + h * c
        return (flat[:, :cut1].reshape(m, f + 1, h), flat[:, cut1:cut2].reshape(m, h, c),
                flat[:, cut2:].reshape(m, 1, c))

    def weights(self) -> Weights:
        """(W1 [M,F,H], b1 [M,H], W2 [M,H,C], b2 [M,C]) as views."""
        f = self.shape[0]
        return self.w1b[:, :f], self.w1b[:, f], self.w2, self.b2[:, 0]

    def select(self, keep: np.ndarray) -> "_Stack":
        return _Stack(self.theta[keep], self.velocity[keep], self.lr[keep], self.momentum[keep],
                      self.shape, self.activation)

    def _buffers_for(self, batch: int) -> _Buffers:
        if batch not in self._buffers:
            _, h, c = self.shape
            self._buffers[batch] = _Buffers.allocate(self.theta.shape[0], batch, h, c)
        return self._buffers[batch]

    def _forward(self, x1: np.ndarray, buf: _Buffers, logits: np.ndarray) -> None:
        np.matmul(x1, self.w1b, out=buf.z1)
        activate(self.activation, buf.z1, out=buf.a1)
        np.matmul(buf.a1, self.w2, out=logits)
        logits += self.b2

    def step(self, x1: np.ndarray, y: np.ndarray, logits: np.ndarray) -> None:
        """One SGD update of every model on its own batch x1 [M,B,F+1] (``with_ones``),
        y [M,B,C]; the pre-update logits go to ``logits`` [M,B,C] for the epoch's metrics."""
        buf = self._buffers_for(x1.shape[1])
        prob, col = buf.prob, buf.col[..., 0]
        self._forward(x1, buf, logits)
        reduce_classes(np.maximum, logits, out=col)  # softmax, shifted by the row max as TF does
        np.subtract(logits, buf.col, out=prob)
        np.exp(prob, out=prob)
        reduce_classes(np.add, prob, out=col)
        prob /= buf.col
        prob -= y  # dLoss/dlogits = (softmax - y) / B for the batch-mean cross-entropy
        single = x1.shape[1] == 1
        if not single:  # at B = 1 the batch sums have one term: cheaper ops, the same floats
            prob *= buf.inv_batch
        np.matmul(buf.a1.transpose(0, 2, 1), prob, out=self.dw2)
        if single:
            np.copyto(self.db2, prob)
        else:
            np.sum(prob, axis=1, keepdims=True, out=self.db2)
        np.matmul(prob, self.w2.transpose(0, 2, 1), out=buf.da1)
        _activation_grad(self.activation, buf.z1, buf.a1, buf.da1, buf.mask, out=buf.dz1)
        # [[dW1], [db1]] = x1.T @ dz1 (the ones column gives db1); an outer product at B = 1.
        (np.multiply if single else np.matmul)(x1.transpose(0, 2, 1), buf.dz1, out=self.dw1b)
        # Keras SGD: m = m*momentum - g*lr; w = w + m (float32 throughout).
        self.velocity *= self.momentum
        self.grad *= self.lr
        self.velocity -= self.grad
        self.theta += self.velocity

    def begin_epoch(self, x1: np.ndarray, y: np.ndarray, rows: np.ndarray, batch: int, logits: np.ndarray) -> None:
        """Gather the epoch's batches: x1 [N,F+1] (``with_ones``) and y [N,C] are all training
        rows, rows [M,N] each member's order; ``run`` writes the pre-update logits to logits [M,N,C]."""
        self._epoch = (np.take(x1, rows, axis=0), np.take(y, rows, axis=0), batch, logits)

    def run(self, s0: int, s1: int) -> None:
        """Steps s0..s1-1 of the epoch begun."""
        xs, ys, batch, logits = self._epoch
        for i in range(s0 * batch, min(s1 * batch, xs.shape[1]), batch):
            self.step(xs[:, i:i + batch], ys[:, i:i + batch], logits[:, i:i + batch])

    @staticmethod
    def eval_input(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A split as the arguments of ``evaluate``."""
        return with_ones(x), y

    def evaluate(self, x1: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(loss [M], accuracy [M]) of every model on all rows x1 [N,F+1], y [N,C] at once."""
        m, n = self.theta.shape[0], x1.shape[0]
        buf = self._buffers_for(n)
        with np.errstate(all="ignore"):
            self._forward(np.broadcast_to(x1, (m, *x1.shape)), buf, buf.logits)
            loss, prob = softmax_xent(buf.logits, np.broadcast_to(y, buf.logits.shape))
        correct = argmax_classes(prob) == argmax_classes(y)
        return loss.mean(axis=-1, dtype=np.float32), correct.mean(axis=-1)


@lru_cache(maxsize=256)
def _initial_flat(model: ModelConfig, problem: ProblemConfig, seed: int) -> np.ndarray:
    # initial_weights builds a Keras model and clears the session, whose gc.collect costs
    # ~0.5 s in a process holding TensorFlow: draw each seed once per process, not per group.
    flat = np.concatenate([w.ravel() for w in initial_weights(model, problem, seed)]).astype(np.float32)
    flat.setflags(write=False)
    return flat


def _stack_initial(specs: Sequence[TrialSpec]) -> tuple[np.ndarray, tuple[int, int, int]]:
    spec = specs[0]
    n_features, n_classes = data_shape(spec.problem)
    shape = (n_features, spec.model.hidden_units, n_classes)
    return np.stack([_initial_flat(s.model, s.problem, s.seed) for s in specs]), shape


def _epoch_metrics(logits: np.ndarray, y: np.ndarray, labels: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Keras' running epoch loss and accuracy [M] from the pre-update logits [M,n,C] of all
    batches (y one-hot, labels its class ids [M,n]): each batch's mean loss weighted by its
    size, and the fraction of rows right."""
    n = logits.shape[1]
    loss, prob = softmax_xent(logits, y)
    starts = np.arange(0, n, batch_size)
    sizes = np.diff(np.append(starts, n))
    batch_means = np.add.reduceat(loss, starts, axis=1, dtype=np.float32) / sizes.astype(np.float32)
    epoch_loss = (batch_means.astype(np.float64) * sizes).sum(axis=1) / n
    return epoch_loss, (argmax_classes(prob) == labels).mean(axis=1)


def _check_group(specs: Sequence[TrialSpec]) -> None:
    if not specs:
        raise ValueError("fused engine: empty group")
    keys = {group_key(s) for s in specs}
    if len(keys) != 1:
        raise ValueError("fused engine: a group must share problem, model, epochs and batch size "
                         "(build groups with harness.work.group_specs)")


def _epoch_rows(seeds: Sequence[int], epoch: int, n_train: int, batch_size: int) -> np.ndarray:
    """[M, n_train] training-row order of each member for one epoch; members share seeds."""
    orders = {seed: np.concatenate(epoch_batches(seed, epoch, n_train, batch_size)) for seed in set(seeds)}
    return np.stack([orders[seed] for seed in seeds])


class _Clock:
    """Scores every active member at the update clock's points (harness.clock): one batched
    forward pass per split for the whole stack, and the gradient noise over the training rows."""

    def __init__(self, spec: TrialSpec, data, size: int, stack: "_Stack | NumbaStack"):
        self.spec, self.data, self.sorted = spec, data, eval_points(spec)
        self.at, self.noise_at = set(self.sorted.tolist()), set(noise_points(spec).tolist())
        self.splits = {name: stack.eval_input(x, y) for name, (x, y) in data.splits().items()}
        self.points: list[list[PointRecord]] = [[] for _ in range(size)]
        self.test: tuple[np.ndarray, np.ndarray] | None = None  # the latest test scores, for the epoch rows

    def next_after(self, updates: int) -> int:
        """The first point after ``updates`` (past the last one: a number no run reaches)."""
        i = int(np.searchsorted(self.sorted, updates, side="right"))
        return int(self.sorted[i]) if i < len(self.sorted) else np.iinfo(np.int64).max

    def record(self, stack: "_Stack | NumbaStack", members: np.ndarray, updates: int, elapsed: float) -> None:
        scores = {name: stack.evaluate(*split) for name, split in self.splits.items()}
        self.test = scores["test"]
        grad_sq, trace = noise_if(updates in self.noise_at, stack.weights(), self.data.x_train, self.data.y_train,
                                  stack.activation)
        examples = examples_at(self.spec, updates)
        for row, i in enumerate(members):
            self.points[i].append(make_point(updates, examples, elapsed, {
                name: (loss[row], accuracy[row]) for name, (loss, accuracy) in scores.items()},
                grad_sq[row], trace[row]))


def train_fused(specs: Sequence[TrialSpec], kernel: str | None = None) -> FusedTraining:
    """Train every spec of one group together, scoring all of them at the update clock's points;
    members that blow up stop at the end of that epoch, the rest go on. ``kernel`` picks the
    path: "numpy", "numba", or "auto" (the rule in kernel_choice); None reads
    $HARNESS_FUSED_KERNEL, default auto. The caller pins BLAS threads (run_group does)."""
    specs = tuple(specs)
    _check_group(specs)
    first = specs[0]
    data = make_data(first.problem)
    n, batch, n_epochs = first.problem.n_train, first.batch_size, first.train.epochs
    theta, shape = _stack_initial(specs)
    lr = np.array([[s.learning_rate] for s in specs], np.float32)
    momentum = np.array([[s.train.momentum] for s in specs], np.float32)
    path = choose_kernel(_group_size(specs, shape), kernel)
    stack = _make_stack(path, theta, lr, momentum, shape, first.model.activation)
    members = np.arange(len(specs))  # spec index of each active row of the stack
    final: list[Weights | None] = [None] * len(specs)
    records: list[list[EpochRecord]] = [[] for _ in specs]
    steps = -(-n // batch)
    # Writable copies: numba compiles read-only arrays (the cached data set's) as another type.
    x1_train, y_train = with_ones(data.x_train), np.array(data.y_train)
    labels = argmax_classes(data.y_train)
    clock = _Clock(first, data, len(specs), stack)
    updates = 0
    with np.errstate(all="ignore"):  # a diverging member overflows; that is data, not a warning
        clock.record(stack, members, 0, 0.0)
        start = time.perf_counter()
        for epoch in range(n_epochs):
            rows = _epoch_rows([specs[i].seed for i in members], epoch, n, batch)
            logits = np.empty((len(members), n, y_train.shape[1]), np.float32)
            stack.begin_epoch(x1_train, y_train, rows, batch, logits)
            done, first_point = 0, len(clock.points[members[0]])
            while done < steps:  # run up to the next clock point; every epoch end is one
                stop = min(steps, clock.next_after(updates) - (updates - done))
                stack.run(done, stop)
                updates, done = updates + stop - done, stop
                if updates in clock.at:
                    clock.record(stack, members, updates, time.perf_counter() - start)
            loss, accuracy = _epoch_metrics(logits, np.take(y_train, rows, axis=0), np.take(labels, rows), batch)
            val_loss, val_accuracy = clock.test
            elapsed = time.perf_counter() - start
            for row, i in enumerate(members):
                records[i].append(EpochRecord(
                    epoch=epoch + 1, loss=float(loss[row]), accuracy=float(accuracy[row]),
                    val_loss=float(val_loss[row]), val_accuracy=float(val_accuracy[row]),
                    elapsed_s=elapsed, updates=updates))
            # Only this epoch's points and record are new (earlier ones passed), and point 0 sets
            # the limit: checking all of them every epoch would cost O(epochs^2) per member.
            alive = np.array([blow_up(specs[i], clock.points[i][:1] + clock.points[i][first_point:], records[i][-1:])
                              is None for i in members])
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
    return FusedTraining(specs=specs, weights=tuple(final), records=tuple(tuple(r) for r in records),
                         points=tuple(tuple(p) for p in clock.points), wall_clock_s=wall, engine_version=version)


def _group_size(specs: Sequence[TrialSpec], shape: tuple[int, int, int]) -> GroupSize:
    spec, (f, h, c) = specs[0], shape
    problem = spec.problem
    return GroupSize(models=len(specs), batch_size=spec.batch_size, n_train=problem.n_train, epochs=spec.train.epochs,
                     weights=(f + 1) * h + h * c, eval_rows=sum(len(x) for x, _ in make_data(problem).splits().values()),
                     eval_points=len(eval_points(spec)), activation=spec.model.activation)


def _make_stack(kernel: str, theta: np.ndarray, lr: np.ndarray, momentum: np.ndarray, shape: tuple[int, int, int],
                activation: str) -> "_Stack | NumbaStack":
    if kernel == "numpy":
        return _Stack(theta, np.zeros_like(theta), lr, momentum, shape, activation)
    from harness.engines import kernel_stack  # imports numba: only groups on the numba path pay for it

    kernel_stack.load()  # compile, or load from the cache, before the training clock starts
    return kernel_stack.NumbaStack.from_flat(theta, np.zeros_like(theta), lr, momentum, shape, activation,
                                             exact=kernel_stack.blas_is_emulated())


def run_group(specs: Sequence[TrialSpec]) -> list[TrialResult]:
    """Train one fused group and return a result per spec, in order (as the Keras engine fills them)."""
    from threadpoolctl import threadpool_limits

    started = utc_now()
    pin_threads(1)  # TensorFlow only draws the initial weights here
    with threadpool_limits(limits=1, user_api="blas"):  # N cores run N groups, not one group on N
        training = train_fused(specs)
    size = len(specs)
    return [TrialResult(spec=spec, **summarize(spec, records, points), wall_clock_s=training.wall_clock_s / size,
                        group_size=size, group_wall_clock_s=training.wall_clock_s,
                        engine_version=training.engine_version, started_at=started, finished_at=utc_now(),
                        epochs=records, points=points)
            for spec, records, points in zip(training.specs, training.records, training.points)]
