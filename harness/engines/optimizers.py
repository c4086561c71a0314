"""The fused engine's optimizers: Keras 3's update rules, op for op in float32, applied to every
model of a stack at once. A new optimizer is a case in ``Hyper.from_specs`` and ``apply``.

Parameters, gradients and optimizer state are [M, P] arrays (one row per model); every
hyperparameter is an [M, 1] column, so the members of a stack may differ in all of them. The
rate of update t comes from ``harness.schedule`` (the Keras engine reads the same table). Keras'
rules, as ``keras/src/optimizers/{sgd,adam,rmsprop}.py`` write them:

    sgd       m = m*momentum - g*lr;  w = w + m, or with nesterov w = w + (m*momentum - g*lr)
    adam      alpha = lr * sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))
              m = m + (g - m)*(1 - beta_1);  v = v + (g^2 - v)*(1 - beta_2)
              w = w - (m*alpha) / (sqrt(v) + epsilon)
    rmsprop   v = rho*v + (1 - rho)*g^2;  w = w - (lr*g) / sqrt(v + epsilon)

Keras computes 1 - beta and 1 - rho from Python floats (float64) and rounds them to float32 when
they meet a tensor; so do we.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np

from harness.grid import TrialSpec
from harness.schedule import is_constant, learning_rates

f32 = np.float32
STATES = {"sgd": 1, "adam": 2, "rmsprop": 1}  # [M, P] state arrays each optimizer keeps


def _column(values: Sequence[float]) -> np.ndarray:
    return np.array(values, np.float64).astype(f32).reshape(-1, 1)


@dataclass(frozen=True)
class Hyper:
    """Per-model hyperparameters of one stack; every array has a row per model."""

    optimizer: str  # one rule per stack (work.group_key keeps optimizers apart)
    nesterov: bool
    rates: np.ndarray  # [M, T] the rate of every update, or [M, 1] when it never changes
    momentum: np.ndarray  # [M, 1] float32 each
    beta_1: np.ndarray
    beta_2: np.ndarray
    epsilon: np.ndarray
    rho: np.ndarray
    keep_1: np.ndarray  # 1 - beta_1
    keep_2: np.ndarray  # 1 - beta_2
    keep_rho: np.ndarray  # 1 - rho
    l2: np.ndarray  # [M, 1] L2 penalty coefficient (model.l2)
    any_l2: bool

    @classmethod
    def from_specs(cls, specs: Sequence[TrialSpec]) -> "Hyper":
        trains = [s.train for s in specs]
        if all(is_constant(s) for s in specs):
            rates = np.stack([learning_rates(s)[:1] for s in specs])
        else:
            rates = np.stack([learning_rates(s) for s in specs])
        l2 = _column([s.model.l2 for s in specs])
        return cls(optimizer=trains[0].optimizer, nesterov=trains[0].nesterov, rates=rates,
                   momentum=_column([t.momentum for t in trains]), beta_1=_column([t.beta_1 for t in trains]),
                   beta_2=_column([t.beta_2 for t in trains]), epsilon=_column([t.epsilon for t in trains]),
                   rho=_column([t.rho for t in trains]), keep_1=_column([1 - t.beta_1 for t in trains]),
                   keep_2=_column([1 - t.beta_2 for t in trains]), keep_rho=_column([1 - t.rho for t in trains]),
                   l2=l2, any_l2=bool(l2.any()))

    @classmethod
    def plain(cls, m: int) -> "Hyper":
        """Placeholder hyperparameters for a stack that only scores (never steps)."""
        zero = np.zeros((m, 1), f32)
        return cls("sgd", False, zero, *([zero] * 8), l2=zero, any_l2=False)

    def select(self, keep: np.ndarray) -> "Hyper":
        return replace(self, **{f.name: getattr(self, f.name)[keep] for f in fields(self)
                                if isinstance(getattr(self, f.name), np.ndarray)})

    def step_rates(self, t0: int, n: int) -> np.ndarray:
        """[M, n] what updates t0..t0+n-1 multiply the step by: the rate, and for Adam its alpha
        = rate * sqrt(1 - beta_2^k) / (1 - beta_1^k), k = t + 1 (Keras' local step). Computed
        once per epoch by both paths with the same call, so the numba kernels read the very
        floats the NumPy path uses (a float32 power may round differently in another call shape)."""
        rates = self.rates if self.rates.shape[1] == 1 else self.rates[:, t0:t0 + n]
        rates = np.broadcast_to(rates, (len(rates), n))
        if self.optimizer != "adam":
            # A copy, writable: the broadcast view is read-only (numba compiles that as another
            # type, once per machine inside a group's clock) and already contiguous at n = 1.
            return rates.copy()
        k = np.arange(t0 + 1, t0 + n + 1, dtype=f32)[None, :]
        return rates * np.sqrt(f32(1) - np.power(self.beta_2, k)) / (f32(1) - np.power(self.beta_1, k))

    def packed(self) -> np.ndarray:
        """[M, 6] float32 per model for the numba kernels: momentum, l2, 1 - beta_1, 1 - beta_2
        (RMSprop: 1 - rho), epsilon, rho."""
        keep_b = self.keep_rho if self.optimizer == "rmsprop" else self.keep_2
        return np.ascontiguousarray(np.concatenate(
            [self.momentum, self.l2, self.keep_1, keep_b, self.epsilon, self.rho], axis=1), dtype=f32)


def new_state(optimizer: str, theta: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(np.zeros_like(theta) for _ in range(STATES[optimizer]))


def apply(hyper: Hyper, lr: np.ndarray, theta: np.ndarray, grad: np.ndarray, state: tuple[np.ndarray, ...],
          scratch: tuple[np.ndarray, np.ndarray]) -> None:
    """Update ``theta`` in place from ``grad`` (overwritten); ``lr`` [M, 1] is the update's column
    of ``hyper.step_rates`` (for Adam, its alpha)."""
    if hyper.optimizer == "sgd":
        (velocity,) = state
        velocity *= hyper.momentum
        grad *= lr
        velocity -= grad
        if hyper.nesterov:
            step = np.multiply(velocity, hyper.momentum, out=scratch[0])
            step -= grad
            theta += step
        else:
            theta += velocity
    elif hyper.optimizer == "adam":
        m, v = state
        alpha = lr
        delta, root = scratch
        np.subtract(grad, m, out=delta)
        delta *= hyper.keep_1
        m += delta
        np.multiply(grad, grad, out=delta)
        delta -= v
        delta *= hyper.keep_2
        v += delta
        np.multiply(m, alpha, out=delta)
        np.sqrt(v, out=root)
        root += hyper.epsilon
        delta /= root
        theta -= delta
    elif hyper.optimizer == "rmsprop":
        (v,) = state
        delta, root = scratch
        np.multiply(grad, grad, out=delta)
        delta *= hyper.keep_rho
        v *= hyper.rho
        v += delta
        np.multiply(grad, lr, out=delta)
        np.add(v, hyper.epsilon, out=root)
        np.sqrt(root, out=root)
        delta /= root
        theta -= delta
    else:
        raise ValueError(f"fused engine: unknown optimizer {hyper.optimizer!r}; valid: {', '.join(STATES)}")
