"""The gradient noise scale of McCandlish, Kaplan, Amodei et al. (2018), "An Empirical Model of
Large-Batch Training" (arXiv:1812.06162): the batch size above which larger batches stop buying
proportionally fewer optimizer steps.

With g_i the gradient of row i's loss and n training rows,

    G       = (1/n) sum_i g_i                              the true (full-batch) gradient
    tr(Σ)   = (1/(n-1)) sum_i |g_i - G|^2                  trace of the per-example covariance
    B_simple = tr(Σ) / |G|^2                               the simple noise scale (paper eq. 2.8)

Exact estimator: compute every g_i (``mlp_per_example_grads``) and apply the sums above.

Two-batch estimator (paper appendix A.1), for when n × P per-example gradients are too many: a
batch B drawn *without replacement* from the n rows has mean gradient G_B with

    E|G_B|^2 = |G|^2 + tr(Σ) (1/B - 1/n)                   (finite-population variance of a mean)

so for two sizes B_s < B_b the difference cancels |G|^2 and the 1/n terms cancel each other:

    tr(Σ) ≈ (|G_s|^2 - |G_b|^2) / (1/B_s - 1/B_b)
    |G|^2 ≈ |G_b|^2 - tr(Σ) (1/B_b - 1/n)

The paper's |G|^2 ≈ (B_b|G_b|^2 - B_s|G_s|^2)/(B_b - B_s) equals |G_b|^2 - tr(Σ)/B_b, which assumes
an infinite population and so underestimates |G|^2 by tr(Σ)/n here; we keep the 1/n term (with
B_b = n it makes |G|^2 exact). |G_s|^2 and |G_b|^2 are averaged over many draws before the
formulas are applied (both are linear in them, so each stays unbiased); B_simple, a ratio, is
then consistent but not unbiased, and with few draws |G|^2 can even come out negative.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

ACTIVATIONS = ("relu", "tanh", "sigmoid")


@dataclass(frozen=True)
class NoiseScale:
    grad_sq: float  # |G|^2
    trace_sigma: float  # tr(Σ)
    b_simple: float  # tr(Σ) / |G|^2; inf when |G|^2 == 0, NaN when either input is not finite

    @classmethod
    def of(cls, grad_sq: float, trace_sigma: float) -> "NoiseScale":
        grad_sq, trace_sigma = float(grad_sq), float(trace_sigma)
        if not (math.isfinite(grad_sq) and math.isfinite(trace_sigma)):
            b_simple = math.nan
        elif grad_sq == 0.0:
            b_simple = math.inf  # at a stationary point any batch is "small": no size helps
        else:
            b_simple = trace_sigma / grad_sq
        return cls(grad_sq, trace_sigma, b_simple)


# --- exact estimator ---------------------------------------------------------------------------

def noise_from_per_example_stacked(grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(|G|^2 [M], tr(Σ) [M]) from per-example gradients [M, n, P] of M models."""
    grads = np.asarray(grads)
    if grads.ndim != 3 or grads.shape[1] < 2:
        raise ValueError(f"per-example gradients must be [M, n >= 2, P], got shape {grads.shape}")
    n = grads.shape[1]
    mean = grads.mean(axis=1, dtype=np.float64)  # [M, P]
    grad_sq = np.einsum("mp,mp->m", mean, mean)
    # Centred sum of squares, not sum|g_i|^2 - n|G|^2: no cancellation when |G|^2 dominates.
    centred = grads - mean[:, None, :]
    trace = np.einsum("mip,mip->m", centred, centred) / (n - 1)
    return grad_sq, trace


def noise_from_per_example(grads: np.ndarray) -> NoiseScale:
    """The exact estimator for one model's per-example gradients [n, P]."""
    grads = np.asarray(grads)
    if grads.ndim != 2:
        raise ValueError(f"per-example gradients must be [n, P], got shape {grads.shape}")
    (grad_sq,), (trace,) = noise_from_per_example_stacked(grads[None])
    return NoiseScale.of(grad_sq, trace)


# --- per-example gradients of stacked MLPs -----------------------------------------------------

def _layers(weights: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(W [M,in,out], b [M,out])] in float64, checked to chain."""
    if len(weights) < 4 or len(weights) % 2:
        raise ValueError(f"weights must be (W1, b1, ..., Wout, bout) with >= 1 hidden layer; "
                         f"got {len(weights)} arrays")
    layers = [(np.asarray(w, np.float64), np.asarray(b, np.float64))
              for w, b in zip(weights[::2], weights[1::2])]
    for k, (w, b) in enumerate(layers):
        if w.ndim != 3 or b.shape != (w.shape[0], w.shape[2]):
            raise ValueError(f"layer {k + 1}: kernel {w.shape} and bias {b.shape} are not [M,in,out], [M,out]")
        if k and w.shape[:2] != (layers[0][0].shape[0], layers[k - 1][0].shape[2]):
            raise ValueError(f"layer {k + 1}: kernel {w.shape} does not follow {layers[k - 1][0].shape}")
    return layers


def _activate(name: str, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, da/dz) with TensorFlow's derivatives (ReLU masks on z > 0)."""
    if name == "relu":
        return np.maximum(z, 0.0), (z > 0).astype(z.dtype)
    if name == "tanh":
        a = np.tanh(z)
        return a, 1.0 - a * a
    if name == "sigmoid":
        a = 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1/(1+e^-z) without overflow for large -z
        return a, a * (1.0 - a)
    raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")


def mlp_per_example_grads(weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray,
                          activation: str) -> np.ndarray:
    """Gradients [M, n, P] of each row's softmax cross-entropy (logsumexp(z) - z·y, not divided
    by n) for M stacked MLPs; P runs layer by layer, kernel ravelled row-major, then bias."""
    layers = _layers(weights)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n = layers[0][0].shape[0], x.shape[0]
    if x.shape != (n, layers[0][0].shape[1]) or y.shape != (n, layers[-1][0].shape[2]):
        raise ValueError(f"x {x.shape} and y {y.shape} do not fit the network's input and output")

    # Forward, keeping each layer's input and the activation's derivative for the backward pass.
    inputs, slopes = [np.broadcast_to(x, (m, n, x.shape[1]))], []
    for w, b in layers[:-1]:
        a, slope = _activate(activation, inputs[-1] @ w + b[:, None, :])
        inputs.append(a)
        slopes.append(slope)
    logits = inputs[-1] @ layers[-1][0] + layers[-1][1][:, None, :]
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)

    # Backward, row by row at once: d loss_i / d z_out = softmax - y; a kernel's gradient for row
    # i is the outer product of the layer's input and delta for that row.
    sizes = [w.shape[1] * w.shape[2] + w.shape[2] for w, _ in layers]
    out = np.empty((m, n, sum(sizes)))
    ends = np.cumsum(sizes)
    delta = probs - y
    for k in reversed(range(len(layers))):
        w, _ = layers[k]
        start, n_kernel = ends[k] - sizes[k], w.shape[1] * w.shape[2]
        # Written in place (splitting the contiguous last axis is a view): no [M,n,in,out] temporary.
        kernel = out[:, :, start:start + n_kernel].reshape(m, n, w.shape[1], w.shape[2])
        np.multiply(inputs[k][..., :, None], delta[..., None, :], out=kernel)
        out[:, :, start + n_kernel:ends[k]] = delta
        if k:
            delta = (delta @ w.transpose(0, 2, 1)) * slopes[k - 1]
    return out


def mlp_noise_scale(weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray,
                    activation: str) -> tuple[np.ndarray, np.ndarray]:
    """(|G|^2 [M], tr(Σ) [M]) of M stacked MLPs, exact over all rows of (x, y)."""
    return noise_from_per_example_stacked(mlp_per_example_grads(weights, x, y, activation))


def gradient_noise(weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray,
                   activation: str) -> tuple[np.ndarray, np.ndarray]:
    """The same (|G|^2 [M], tr(Σ) [M]) as ``mlp_noise_scale``, without forming the [M, n, P]
    per-example gradients: what the engines call at the points of the geometric clock.

    A dense layer's gradient for row i is the outer product of its input a_i and its error d_i,
    so its squared norm with the bias is (|a_i|^2 + 1)|d_i|^2 (Goodfellow 2015, "Efficient
    per-example gradient computations"); then tr(Σ) = (Σ_i |g_i|^2 − n|G|^2)/(n − 1) needs one
    forward and one backward pass. The passes run in float32 (the engines' precision; half the
    time of float64) and the sums in float64; the subtraction only loses digits when
    tr(Σ) ≪ |G|^2, i.e. B_simple ≪ 1. ``mlp_noise_scale`` checks it in the tests."""
    f32 = np.float32
    layers = [(w.astype(f32), b.astype(f32)) for w, b in _layers(weights)]
    x, y = np.asarray(x, f32), np.asarray(y, f32)
    m, n = layers[0][0].shape[0], x.shape[0]
    inputs, slopes = [np.broadcast_to(x, (m, n, x.shape[1]))], []
    for w, b in layers[:-1]:
        a, slope = _activate(activation, inputs[-1] @ w + b[:, None, :])  # float32 in, float32 out
        inputs.append(a)
        slopes.append(slope)
    logits = inputs[-1] @ layers[-1][0] + layers[-1][1][:, None, :]
    delta = np.exp(logits - logits.max(axis=-1, keepdims=True))
    delta /= delta.sum(axis=-1, keepdims=True)
    delta -= y
    grad_sum_sq, row_sq = np.zeros(m), np.zeros((m, n))
    for k in reversed(range(len(layers))):
        a = inputs[k]
        row_sq += ((a * a).sum(-1, dtype=np.float64) + 1.0) * (delta * delta).sum(-1, dtype=np.float64)
        kernel, bias = (a.transpose(0, 2, 1) @ delta).astype(np.float64), delta.sum(axis=1, dtype=np.float64)
        grad_sum_sq += (kernel * kernel).sum(axis=(1, 2)) + (bias * bias).sum(-1)
        if k:
            delta = (delta @ layers[k][0].transpose(0, 2, 1)) * slopes[k - 1]
    grad_sq = grad_sum_sq / n ** 2
    return grad_sq, (row_sq.sum(axis=1) - n * grad_sq) / max(n - 1, 1)


def noise_if(measure: bool, weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray,
             activation: str) -> tuple[np.ndarray, np.ndarray]:
    """``gradient_noise`` at the points that measure it (clock.noise_points), NaN elsewhere."""
    if measure:
        return gradient_noise(weights, x, y, activation)
    nan = np.full(len(weights[0]), np.nan)
    return nan, nan


def two_batch_noise_scale(grad_fn: Callable[[np.ndarray], np.ndarray], n: int, b_small: int, b_big: int,
                          draws: int, rng: np.random.Generator) -> NoiseScale:
    """The unbiased two-batch estimator (module docstring) from ``draws`` pairs of batches;
    ``grad_fn(rows)`` is the mean gradient [P] over the given row indices."""
    if not (1 <= b_small < b_big <= n) or draws < 1:
        raise ValueError(f"need 1 <= b_small < b_big <= n and draws >= 1; got b_small={b_small}, "
                         f"b_big={b_big}, n={n}, draws={draws}")
    small_sq = big_sq = 0.0
    for _ in range(draws):
        # The small batch is the big one's first b_small rows: each is still a uniform draw
        # without replacement (all the formulas need), and the shared rows make the difference
        # |G_s|^2 - |G_b|^2 less noisy than two independent batches would.
        rows = rng.choice(n, size=b_big, replace=False)
        small_sq += _sq_norm(grad_fn(rows[:b_small]))
        big_sq += _sq_norm(grad_fn(rows))
    small_sq, big_sq = small_sq / draws, big_sq / draws
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return NoiseScale.of(big_sq - trace * (1.0 / b_big - 1.0 / n), trace)


def _sq_norm(v: np.ndarray) -> float:
    v = np.asarray(v, np.float64).ravel()
    return float(v @ v)


def choose_method(n_rows: int, n_params: int, budget: int = 5_000_000) -> str:
    """"exact" when the n_rows × n_params per-example gradients of one model fit in ``budget``
    floats (5M float64 = 40 MB, a pass over it takes milliseconds), else "two_batch". The exact
    estimator has no sampling noise, so it is preferred whenever it is affordable; the
    two-batch one only ever holds mean gradients (P floats) but needs many draws to settle."""
    return "exact" if n_rows * n_params <= budget else "two_batch"
