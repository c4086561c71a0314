"""The numba path's stack of models (``NumbaStack``, the interface of stack.Stack over the
kernels' layout) and what the fused engine needs around the kernels: compiling or loading them
ahead of the training clock (``load``), and whether this process's BLAS is the one whose
summation order the kernels emulate (``blas_is_emulated``).

``python -m harness.engines.kernel_stack`` compiles the kernels into the cache ahead of a run
(a new machine, a CI image, a cluster's nodes), so that no group waits for, or is kept off
numba by, a first compile (kernel_choice counts a cold cache's compile against a group).
"""
from __future__ import annotations

import importlib
import sys
from functools import lru_cache

import numpy as np

from harness.engines.optimizers import Hyper
from harness.engines.stack import Stack, with_ones
from harness.engines.kernel_math import ACTIVATION_CODES, OPTIMIZER_CODES, RELU, f32
from harness.engines.kernels import train_steps
from harness.engines.noise_kernel import gradient_noise
from harness.engines.score_kernels import epoch_scores, evaluate


@lru_cache(maxsize=1)
def blas_is_emulated() -> bool:
    """Whether the exact order is this process's BLAS's own: OpenBLAS with its SkylakeX kernels
    (the ones the order was read from). Elsewhere the fixed order serves as well."""
    from threadpoolctl import threadpool_info

    return any(lib.get("internal_api") == "openblas" and lib.get("architecture") == "SkylakeX"
               for lib in threadpool_info() if lib.get("user_api") == "blas")


def _registries_without_scipy() -> None:
    """Load numba's typing registries before any kernel, without SciPy's BLAS. On its first
    compile or cache load numba imports numba.np.arraymath, which imports scipy.linalg only to
    learn whether np.convolve may call BLAS: 0.2 s of every worker's start (kernel load 0.35 s
    -> 0.17 s), for kernels that call no BLAS. The import is refused for that one module
    while it runs, then allowed again: scipy.linalg imports as usual afterwards."""
    blas = "scipy.linalg.cython_blas"
    if "numba.np.arraymath" in sys.modules or blas in sys.modules:
        return
    sys.modules[blas] = None  # an import of it raises ImportError, without importing scipy.linalg
    try:
        importlib.import_module("numba.np.arraymath")
    finally:
        if sys.modules.get(blas, 0) is None:
            del sys.modules[blas]


def load(noise: bool = False) -> None:
    """Compile the training and scoring kernels, or load them from the cache, for the argument
    types train_fused passes, so that the first training step does not pay for it. The noise
    kernel only with ``noise``: otherwise its first call does it, as only the geometric clock
    measures noise."""
    _registries_without_scipy()
    w = (np.zeros((1, 2, 1), f32), np.zeros((1, 1, 1), f32), np.zeros((1, 1), f32))
    x1, y, lr, hp = np.ones((1, 2), f32), np.ones((1, 1), f32), np.zeros((1, 1), f32), np.zeros((1, 6), f32)
    train_steps(*w, *w, *w, lr, hp, 0, False, x1, y, np.zeros((1, 1), np.int64), 1, 0, 0, np.zeros((1, 1, 1), f32),
                RELU, True)
    evaluate(*w, np.ascontiguousarray(x1.T), y, np.zeros(1, np.int64), RELU)
    epoch_scores(np.zeros((1, 1, 1), f32), np.zeros((1, 1), np.int64), y, np.zeros(1, np.int64), np.zeros((1, 1), f32))
    if noise:
        gradient_noise(*w, x1, y, RELU)


class NumbaStack:
    """The active members' weights and momenta in the kernels' layout; the same interface as
    stack.Stack (begin_epoch/run, evaluate, weights, select)."""

    def __init__(self, tensors: tuple[np.ndarray, ...], hyper: Hyper, activation: str, exact: bool, updates: int = 0):
        self.tensors = tensors  # W1b, W2T, b2, then the optimizer's first and second states of each
        self.hyper, self.updates = hyper, updates  # updates taken: the schedule's clock
        self._packed, self._opt = hyper.packed(), OPTIMIZER_CODES[hyper.optimizer]
        self.activation, self.exact = activation, exact
        self._act = ACTIVATION_CODES[activation]
        w1b, w2t = tensors[:2]
        self._shape = (w1b.shape[1] - 1, w1b.shape[2], w2t.shape[1])  # (F, H, C)
        self._scores_in_numba = scores_in_numba(self._shape, activation)
        self._numpy_scorer: Stack | None = None
        self._epoch: tuple = ()

    @classmethod
    def from_flat(cls, theta: np.ndarray, velocity: np.ndarray, hyper: Hyper, shape: tuple[int, int, int],
                  activation: str, exact: bool) -> "NumbaStack":
        """From stack.Stack's [M, P] layout (W1, b1, W2, b2 ravelled), the optimizer's states
        starting at ``velocity`` (zeros), and the hyperparameters."""
        return cls(split(theta, shape) + split(velocity, shape) + split(velocity.copy(), shape), hyper, activation, exact)

    def weights(self):
        """(W1 [M,F,H], b1 [M,H], W2 [M,H,C], b2 [M,C]) as views."""
        w1b, w2t, b2 = self.tensors[:3]
        f = w1b.shape[1] - 1
        return w1b[:, :f], w1b[:, f], w2t.transpose(0, 2, 1), b2

    def select(self, keep: np.ndarray) -> "NumbaStack":
        return NumbaStack(tuple(t[keep] for t in self.tensors), self.hyper.select(keep), self.activation, self.exact,
                          self.updates)

    def begin_epoch(self, x1: np.ndarray, y: np.ndarray, rows: np.ndarray, batch: int, logits: np.ndarray) -> None:
        """x1 [N, F+1] and y [N, C] are all training rows; rows [M, N] each member's order."""
        # The epoch's Hyper.step_rates ride with it: column s is step s's rate (Adam: its alpha).
        rates = self.hyper.step_rates(self.updates, -(-rows.shape[1] // batch))
        self._epoch = (x1, y, np.ascontiguousarray(rows, np.int64), batch, logits, rates)

    def run(self, s0: int, s1: int) -> None:
        """Steps s0..s1-1 of the epoch begun."""
        x1, y, rows, batch, logits, rates = self._epoch
        train_steps(*self.tensors, rates, self._packed, self._opt, self.hyper.nesterov, x1, y, rows, batch, s0, s1,
                    logits, self._act, self.exact)
        self.updates += s1 - s0

    def epoch_scores(self, logits: np.ndarray, y: np.ndarray, labels: np.ndarray,
                     rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As stack.Stack.epoch_scores, bit for bit (score_kernels.epoch_scores)."""
        rows, labels = np.ascontiguousarray(rows, np.int64), labels.astype(np.int64)  # the compiled types
        loss = np.empty(rows.shape, np.float32)
        right = epoch_scores(logits, rows, y, labels, loss)
        return loss, right / rows.shape[1]

    def eval_input(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
        """A split as the arguments of ``evaluate``: for the numba kernel, features transposed
        with a ones row and the class ids; for NumPy (``scores_in_numba`` false), fused's."""
        if not self._scores_in_numba:
            return with_ones(x), y
        x1t = np.ascontiguousarray(np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1).T, np.float32)
        # Fresh, writable arrays: numba compiles a read-only array (the cached data set) as another type.
        return x1t, np.array(y, np.float32), y.argmax(axis=1).astype(np.int64)

    def gradient_noise(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(|G|^2 [M], tr(Σ) [M]) over the rows (x, y), as stack.Stack.gradient_noise."""
        x1 = np.ascontiguousarray(with_ones(x), np.float32)
        return gradient_noise(*self.tensors[:3], x1, np.array(y, np.float32), self._act)

    def evaluate(self, *split: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(loss [M], accuracy [M]) of every model on a split from ``eval_input``."""
        if self._scores_in_numba:
            return evaluate(*self.tensors[:3], *split, self._act)
        if self._numpy_scorer is None:
            self._numpy_scorer = Stack.for_scoring(join(self.tensors[:3]), self._shape, self.activation)
        else:  # the weights moved since: copy them into the scorer's [M, P] array
            self._numpy_scorer.theta[...] = join(self.tensors[:3])
        return self._numpy_scorer.evaluate(*split)


def scores_in_numba(shape: tuple[int, int, int], activation: str) -> bool:
    """Whether the numba kernel scores a split faster than stack.Stack.evaluate (35 models, 50
    hidden units, 500 rows, measured): with 3 classes 1.6x faster at 2 features, 1.2x at 8, even
    at 16 and 0.6x at 64 (BLAS's blocked matmul wins as the inputs grow); with 10 classes 0.9x
    or slower at any feature count; and slower for tanh, whose NumPy SIMD version beats ours."""
    features, _, classes = shape
    return activation != "tanh" and features <= 8 and classes <= 3


def split(flat: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[M, P] (W1b ravelled, W2 [H, C] ravelled, b2) -> contiguous (W1b [M,F+1,H], W2T [M,C,H], b2 [M,C])."""
    f, h, c = shape
    m, cut1, cut2 = flat.shape[0], (f + 1) * h, (f + 1) * h + h * c
    return (np.ascontiguousarray(flat[:, :cut1].reshape(m, f + 1, h)),
            np.ascontiguousarray(flat[:, cut1:cut2].reshape(m, h, c).transpose(0, 2, 1)),
            np.ascontiguousarray(flat[:, cut2:]))


def join(tensors: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """The inverse of ``split``."""
    w1b, w2t, b2 = tensors
    m = w1b.shape[0]
    return np.concatenate([w1b.reshape(m, -1), w2t.transpose(0, 2, 1).reshape(m, -1), b2], axis=1)


if __name__ == "__main__":  # --no-noise: not the noise kernel, which only the geometric clock uses
    load(noise="--no-noise" not in sys.argv[1:])
    from harness.engines.kernel_choice import cache_dir

    print(f"numba kernels compiled into {cache_dir()}")
