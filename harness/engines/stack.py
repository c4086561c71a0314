"""The fused engine's NumPy path: a stack of M models of one network shape, trained one step at
a time as a handful of batched matmuls and ufuncs, whatever M is.

The arithmetic is Keras 3's, op for op, so the engines agree to float32 rounding:
- each Dense layer is ``x @ W + b``; the first layer folds its bias into the matmul (x carries a
  ones column, ``with_ones``), which rounds as a fused multiply-add would;
- the loss is computed from the logits (a Dense softmax layer hands Keras its logits, so
  ``categorical_crossentropy`` takes the ``softmax_cross_entropy_with_logits`` path and never
  clips), averaged over the batch; its gradient is ``(softmax - y) * (1/B)``;
- an L2 penalty l2 * sum(W^2) on every kernel adds ``l2 * (2 W)`` to the kernel's gradient;
- the update is harness.engines.optimizers'.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.engines import optimizers
from harness.engines.optimizers import Hyper
from harness.noise import gradient_noise

Weights = tuple[np.ndarray, ...]  # (W1, b1, ..., Wout, bout), each with a leading model axis
Shape = tuple[int, ...]  # layer widths: (features, hidden..., classes)


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


def activation_grad(name: str, z: np.ndarray, a: np.ndarray, da: np.ndarray, mask: np.ndarray,
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


def with_ones(x: np.ndarray) -> np.ndarray:
    """x with a column of ones appended: x1 @ [[W1], [b1]] is the first layer with its bias, and
    x1.T @ dz1 yields the kernel and bias gradients in one matmul (no [M,B,H] add or sum)."""
    return np.concatenate([x, np.ones((*x.shape[:-1], 1), x.dtype)], axis=-1)


def n_params(shape: Shape) -> int:
    return sum((a + 1) * b for a, b in zip(shape[:-1], shape[1:]))


@dataclass(frozen=True)
class _Buffers:
    """Scratch arrays for one batch size B: per hidden layer [M,B,H] pre-activation z,
    activation a, dLoss/da, dLoss/dz and the relu mask; [M,B,C] logits and probabilities."""

    z: tuple[np.ndarray, ...]
    a: tuple[np.ndarray, ...]
    da: tuple[np.ndarray, ...]
    dz: tuple[np.ndarray, ...]
    mask: tuple[np.ndarray, ...]
    logits: np.ndarray  # for evaluation passes (training writes the caller's array)
    prob: np.ndarray  # softmax, then dLoss/dlogits
    col: np.ndarray  # [M,B,1] per-row max, then per-row sum
    inv_batch: np.float32

    @classmethod
    def allocate(cls, m: int, batch: int, shape: Shape) -> "_Buffers":
        hidden, classes = shape[1:-1], shape[-1]

        def each(dtype=np.float32):
            return tuple(np.empty((m, batch, h), dtype) for h in hidden)

        return cls(z=each(), a=each(), da=each(), dz=each(), mask=each(bool),
                   logits=np.empty((m, batch, classes), np.float32), prob=np.empty((m, batch, classes), np.float32),
                   col=np.empty((m, batch, 1), np.float32), inv_batch=np.float32(1.0) / np.float32(batch))


class Stack:
    """The active members' parameters, optimizer state and reusable buffers.

    Parameters, gradients and optimizer state each live in one [M, P] array laid out (W1, b1,
    W2, b2, ...), so [[W1], [b1]] is a [M, F+1, H] view and an optimizer step is a few ufunc
    calls for all layers of all models. Buffers are kept per batch size: fresh multi-megabyte
    arrays would cost page faults on every step. ``updates`` counts the steps taken (the members
    of a stack move in lockstep): schedules and Adam's bias correction read it."""

    def __init__(self, theta: np.ndarray, state: tuple[np.ndarray, ...], hyper: Hyper, shape: Shape,
                 activation: str, updates: int = 0):
        self.theta, self.state, self.hyper, self.updates = theta, state, hyper, updates
        self.shape, self.activation = tuple(shape), activation
        self._epoch: tuple = ()  # the epoch begun (begin_epoch)
        self._rates: tuple = ()  # its steps' rates (Hyper.step_rates) and the update it began at
        self.grad = np.empty_like(theta)
        self._scratch: tuple[np.ndarray, np.ndarray] | None = None
        self.w1b, self.kernels, self.biases = self._views(theta)
        self.dw1b, self.dkernels, self.dbiases = self._views(self.grad)
        self._buffers: dict[int, _Buffers] = {}

    @classmethod
    def for_scoring(cls, theta: np.ndarray, shape: Shape, activation: str) -> "Stack":
        """A stack that only evaluates: no optimizer state."""
        return cls(theta, (), Hyper.plain(len(theta)), shape, activation)

    def _views(self, flat: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        """[M, F+1, H1] first layer with its bias row; then per later layer W [M, in, out] and b [M, 1, out]."""
        m, (f, h) = flat.shape[0], self.shape[:2]
        cut = (f + 1) * h
        w1b, kernels, biases = flat[:, :cut].reshape(m, f + 1, h), [], []
        for a, b in zip(self.shape[1:-1], self.shape[2:]):
            kernels.append(flat[:, cut:cut + a * b].reshape(m, a, b))
            biases.append(flat[:, cut + a * b:cut + a * b + b].reshape(m, 1, b))
            cut += (a + 1) * b
        return w1b, tuple(kernels), tuple(biases)

    def weights(self) -> Weights:
        """(W1 [M,F,H], b1 [M,H], ..., Wout [M,H,C], bout [M,C]) as views."""
        f = self.shape[0]
        out: list[np.ndarray] = [self.w1b[:, :f], self.w1b[:, f]]
        for w, b in zip(self.kernels, self.biases):
            out += [w, b[:, 0]]
        return tuple(out)

    def select(self, keep: np.ndarray) -> "Stack":
        return Stack(self.theta[keep], tuple(s[keep] for s in self.state), self.hyper.select(keep), self.shape,
                     self.activation, self.updates)

    def _buffers_for(self, batch: int) -> _Buffers:
        if batch not in self._buffers:
            self._buffers[batch] = _Buffers.allocate(self.theta.shape[0], batch, self.shape)
        return self._buffers[batch]

    def _forward(self, x1: np.ndarray, buf: _Buffers, logits: np.ndarray) -> None:
        np.matmul(x1, self.w1b, out=buf.z[0])
        activate(self.activation, buf.z[0], out=buf.a[0])
        for i, (w, b) in enumerate(zip(self.kernels, self.biases)):
            out = logits if i == len(self.kernels) - 1 else buf.z[i + 1]
            np.matmul(buf.a[i], w, out=out)
            out += b
            if out is not logits:
                activate(self.activation, out, out=buf.a[i + 1])

    def step(self, x1: np.ndarray, y: np.ndarray, logits: np.ndarray) -> None:
        """One update of every model on its own batch x1 [M,B,F+1] (``with_ones``), y [M,B,C];
        the pre-update logits go to ``logits`` [M,B,C] for the epoch's metrics."""
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
        delta = prob  # dLoss/d(output of the layer below)
        for i in range(len(self.kernels) - 1, -1, -1):  # the layers above the first, top down
            np.matmul(buf.a[i].transpose(0, 2, 1), delta, out=self.dkernels[i])
            if single:
                np.copyto(self.dbiases[i], delta)
            else:
                np.sum(delta, axis=1, keepdims=True, out=self.dbiases[i])
            np.matmul(delta, self.kernels[i].transpose(0, 2, 1), out=buf.da[i])
            activation_grad(self.activation, buf.z[i], buf.a[i], buf.da[i], buf.mask[i], out=buf.dz[i])
            delta = buf.dz[i]
        # [[dW1], [db1]] = x1.T @ dz1 (the ones column gives db1); an outer product at B = 1.
        (np.multiply if single else np.matmul)(x1.transpose(0, 2, 1), delta, out=self.dw1b)
        if self.hyper.any_l2:
            self._add_l2()
        if self._scratch is None and (self.hyper.optimizer != "sgd" or self.hyper.nesterov):
            self._scratch = (np.empty_like(self.theta), np.empty_like(self.theta))
        rates, first = self._rates
        column = self.updates - first
        optimizers.apply(self.hyper, rates[:, column:column + 1], self.theta, self.grad, self.state, self._scratch)
        self.updates += 1

    def _add_l2(self) -> None:
        # Keras' L2 regularizer: loss += l2 * sum(W^2), whose gradient TF forms as l2 * (2 W).
        l2 = self.hyper.l2[:, :, None]
        f = self.shape[0]
        for w, dw in ((self.w1b[:, :f], self.dw1b[:, :f]), *zip(self.kernels, self.dkernels)):
            dw += (w * np.float32(2)) * l2

    def begin_epoch(self, x1: np.ndarray, y: np.ndarray, rows: np.ndarray, batch: int, logits: np.ndarray) -> None:
        """Gather the epoch's batches: x1 [N,F+1] (``with_ones``) and y [N,C] are all training
        rows, rows [M,N] each member's order; ``run`` writes the pre-update logits to logits [M,N,C]."""
        self._epoch = (np.take(x1, rows, axis=0), np.take(y, rows, axis=0), batch, logits)
        self._rates = (self.hyper.step_rates(self.updates, -(-rows.shape[1] // batch)), self.updates)

    def run(self, s0: int, s1: int) -> None:
        """Steps s0..s1-1 of the epoch begun."""
        xs, ys, batch, logits = self._epoch
        for i in range(s0 * batch, min(s1 * batch, xs.shape[1]), batch):
            self.step(xs[:, i:i + batch], ys[:, i:i + batch], logits[:, i:i + batch])

    @staticmethod
    def epoch_scores(logits: np.ndarray, y: np.ndarray, labels: np.ndarray,
                     rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(loss [M,N] of each row, accuracy [M]) from the epoch's pre-update logits [M,N,C] of
        the rows ``rows`` [M,N] of y [N,C] (one-hot) and labels [N] (its class ids)."""
        loss, prob = softmax_xent(logits, np.take(y, rows, axis=0))
        return loss, (argmax_classes(prob) == np.take(labels, rows)).mean(axis=1)

    @staticmethod
    def eval_input(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A split as the arguments of ``evaluate``."""
        return with_ones(x), y

    def gradient_noise(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(|G|^2 [M], tr(Σ) [M]) of every member over the rows (x, y): noise.gradient_noise."""
        return gradient_noise(self.weights(), x, y, self.activation)

    def evaluate(self, x1: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(loss [M], accuracy [M]) of every model on all rows x1 [N,F+1], y [N,C] at once."""
        m, n = self.theta.shape[0], x1.shape[0]
        buf = self._buffers_for(n)
        with np.errstate(all="ignore"):
            self._forward(np.broadcast_to(x1, (m, *x1.shape)), buf, buf.logits)
            loss, prob = softmax_xent(buf.logits, np.broadcast_to(y, buf.logits.shape))
        correct = argmax_classes(prob) == argmax_classes(y)
        return loss.mean(axis=-1, dtype=np.float32), correct.mean(axis=-1)


def evaluate_stacked(weights: Weights, x: np.ndarray, y: np.ndarray, activation: str) -> tuple[np.ndarray, np.ndarray]:
    """(loss [M], accuracy [M]) of every stacked model on all of (x, y), as one full batch."""
    shape = (weights[0].shape[1], *(w.shape[2] for w in weights[::2]))
    flat = np.concatenate([w.reshape(len(w), -1) for w in weights], axis=1).astype(np.float32)
    stack = Stack.for_scoring(flat, shape, activation)
    return stack.evaluate(*stack.eval_input(x, y))
