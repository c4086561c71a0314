"""The gradient noise scale (harness.noise): both estimators against a problem whose |G|^2 and
tr(Σ) are known in closed form, the finite-population correction against exhaustive enumeration,
and the MLP per-example gradients against finite differences and TensorFlow."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from harness.noise import (NoiseScale, choose_method, mlp_noise_scale, mlp_per_example_grads,
                           noise_from_per_example, noise_from_per_example_stacked,
                           two_batch_noise_scale)

ACTIVATIONS = ["relu", "tanh", "sigmoid"]


# --- least squares: the analytic noise scale ---------------------------------------------------
# Rows x ~ N(0, I_d), targets t = x·w* + ε with ε ~ N(0, σ²), loss ½(x·w - t)², so at w, with
# u = w - w*, g = x(x·u - ε). Then G = E[x xᵀ]u = u and, by Isserlis, E[|x|²(x·u)²] = (d+2)|u|²,
# so E|g|² = (d+2)|u|² + dσ² and tr(Σ) = E|g|² - |G|² = (d+1)|u|² + dσ².

D, SIGMA = 5, 1.0
U = np.array([0.5, -0.3, 0.2, 0.0, 0.1])  # w - w*


def analytic() -> NoiseScale:
    return NoiseScale.of(U @ U, (D + 1) * (U @ U) + D * SIGMA**2)


def least_squares_rows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x [n,d], residual x·u - ε [n]) sampled from the model above."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D))
    return x, x @ U - rng.normal(0.0, SIGMA, n)


def test_least_squares_moments_match_the_derivation():
    # The derivation itself, on a large sample: each moment within 2 % (sampling error < 0.5 %).
    x, r = least_squares_rows(400_000, seed=1)
    g = x * r[:, None]
    np.testing.assert_allclose(g.mean(axis=0), U, atol=0.01)
    assert np.mean(np.sum(g * g, axis=1)) == pytest.approx((D + 2) * (U @ U) + D * SIGMA**2, rel=0.02)


def test_exact_estimator_is_within_10_percent_of_analytic_b_simple():
    x, r = least_squares_rows(200_000)
    got = noise_from_per_example(x * r[:, None])
    want = analytic()  # |G|^2 = 0.39, tr(Σ) = 7.34, B_simple ≈ 18.8
    assert got.grad_sq == pytest.approx(want.grad_sq, rel=0.10)
    assert got.trace_sigma == pytest.approx(want.trace_sigma, rel=0.10)
    assert got.b_simple == pytest.approx(want.b_simple, rel=0.10)


def test_two_batch_estimator_is_within_10_percent_of_analytic_b_simple():
    x, r = least_squares_rows(200_000)

    def grad_fn(rows):
        return x[rows].T @ r[rows] / len(rows)

    # 8000 draws: over seeds B_simple comes out 18.5 ± 0.45, well inside the 10 % band.
    got = two_batch_noise_scale(grad_fn, len(r), b_small=16, b_big=512, draws=8000,
                                rng=np.random.default_rng(2))
    want = analytic()
    assert got.trace_sigma == pytest.approx(want.trace_sigma, rel=0.10)
    assert got.grad_sq == pytest.approx(want.grad_sq, rel=0.10)
    assert got.b_simple == pytest.approx(want.b_simple, rel=0.10)


# --- the finite-population correction ----------------------------------------------------------

def small_population(n: int = 8, p: int = 3, seed: int = 3) -> np.ndarray:
    """Per-example gradients whose mean is small next to their spread (|G|^2 = 0.12,
    tr(Σ) ≈ 4.1, B_simple ≈ 34), so the tr(Σ)/n term is far larger than the tolerances below."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, p))
    return g - g.mean(axis=0) + 0.2


@pytest.mark.parametrize("b", [1, 2, 3, 5, 8])
def test_mean_batch_gradient_norm_over_all_batches_is_finite_population_formula(b):
    g = small_population()
    n, exact = len(g), noise_from_per_example(g)
    batches = [g[list(rows)].mean(axis=0) for rows in itertools.combinations(range(n), b)]
    mean_sq = np.mean([v @ v for v in batches])
    assert mean_sq == pytest.approx(exact.grad_sq + exact.trace_sigma * (1 / b - 1 / n), rel=1e-12)


def test_two_batch_grad_sq_is_exact_when_the_big_batch_is_every_row():
    # With B_big = n, G_big = G, and the corrected |G|^2 = |G_big|^2 whatever tr(Σ) came out as;
    # the uncorrected formula would be low by tr(Σ)/n, here about 4× |G|^2.
    g = small_population()
    got = two_batch_noise_scale(lambda rows: g[rows].mean(axis=0), len(g), 2, len(g), draws=5,
                                rng=np.random.default_rng(0))
    assert got.grad_sq == pytest.approx(noise_from_per_example(g).grad_sq, rel=1e-12)


def test_two_batch_estimator_is_unbiased_on_a_small_population():
    g = small_population()
    exact = noise_from_per_example(g)
    assert exact.trace_sigma / len(g) > 2 * exact.grad_sq  # the correction is not negligible
    got = two_batch_noise_scale(lambda rows: g[rows].mean(axis=0), len(g), 2, 4, draws=40_000,
                                rng=np.random.default_rng(4))
    # Over seeds: tr(Σ) within ±1.2 %, |G|^2 within ±5 %; the uncorrected |G|^2 is off by 430 %.
    assert got.trace_sigma == pytest.approx(exact.trace_sigma, rel=0.03)
    assert got.grad_sq == pytest.approx(exact.grad_sq, rel=0.25)


def test_two_batch_rejects_batch_sizes_out_of_order():
    with pytest.raises(ValueError, match="b_small < b_big <= n"):
        two_batch_noise_scale(lambda rows: np.zeros(1), 10, 4, 4, 1, np.random.default_rng(0))


# --- the exact estimator's edges ----------------------------------------------------------------

def test_stacked_estimator_equals_the_single_one_model_by_model():
    grads = np.random.default_rng(5).standard_normal((4, 30, 7)) + np.arange(4)[:, None, None]
    grad_sq, trace = noise_from_per_example_stacked(grads)
    for m in range(4):
        single = noise_from_per_example(grads[m])
        assert (grad_sq[m], trace[m]) == pytest.approx((single.grad_sq, single.trace_sigma), rel=1e-12)
        # and both are the textbook sums
        assert single.trace_sigma == pytest.approx(np.var(grads[m], axis=0, ddof=1).sum(), rel=1e-12)


def test_b_simple_is_inf_at_zero_gradient_and_nan_for_non_finite_inputs():
    g = np.array([[1.0, -2.0], [-1.0, 2.0]])  # mean exactly zero
    assert noise_from_per_example(g).grad_sq == 0.0
    assert noise_from_per_example(g).b_simple == math.inf
    assert math.isnan(NoiseScale.of(math.nan, 1.0).b_simple)
    assert math.isnan(NoiseScale.of(1.0, math.inf).b_simple)
    assert NoiseScale.of(2.0, 3.0).b_simple == 1.5


def test_choose_method_switches_at_the_budget():
    assert choose_method(500, 303) == "exact"
    assert choose_method(1000, 5000) == "exact"
    assert choose_method(1001, 5000) == "two_batch"
    assert choose_method(10, 10, budget=99) == "two_batch"


# --- MLP per-example gradients ------------------------------------------------------------------

def random_mlp(sizes: list[int], m: int = 2, n: int = 6, seed: int = 0):
    """(weights with a model axis, x, one-hot y) for layer widths sizes = [F, H1, ..., C]."""
    rng = np.random.default_rng(seed)
    weights = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        weights += [rng.normal(0, 1.2 / np.sqrt(fan_in), (m, fan_in, fan_out)), rng.normal(0, 0.3, (m, fan_out))]
    x = rng.normal(0, 1.5, (n, sizes[0]))
    y = np.eye(sizes[-1])[rng.integers(0, sizes[-1], n)]
    return weights, x, y


def row_losses(weights, x, y, activation) -> np.ndarray:
    """Per-row loss [M, n], written independently of harness.noise: a plain loop per model."""
    act = {"relu": lambda z: np.maximum(z, 0), "tanh": np.tanh, "sigmoid": lambda z: 1 / (1 + np.exp(-z))}[activation]
    out = []
    for m in range(weights[0].shape[0]):
        a = x
        for k in range(0, len(weights), 2):
            z = a @ weights[k][m] + weights[k + 1][m]
            a = act(z) if k + 2 < len(weights) else z
        out.append(np.log(np.exp(a).sum(axis=1)) - (a * y).sum(axis=1))
    return np.array(out)


def finite_difference(loss, weights, eps=1e-6) -> np.ndarray:
    """d loss / d θ by central differences, θ flattened layer by layer (kernel, then bias);
    ``loss(weights)`` returns [M, ...], the result has the derivative on the last axis."""
    cols = []
    for k, w in enumerate(weights):
        for index in np.ndindex(w.shape[1:]):
            up, down = [v.copy() for v in weights], [v.copy() for v in weights]
            up[k][(slice(None), *index)] += eps
            down[k][(slice(None), *index)] -= eps
            cols.append((loss(up) - loss(down)) / (2 * eps))
    return np.stack(cols, axis=-1)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("sizes", [[3, 4, 3], [3, 5, 4, 3]], ids=["1-hidden", "2-hidden"])
def test_per_example_grads_match_finite_differences(sizes, activation):
    weights, x, y = random_mlp(sizes)
    got = mlp_per_example_grads(weights, x, y, activation)
    want = finite_difference(lambda w: row_losses(w, x, y, activation), weights)  # [M, n, P]
    assert got.shape == want.shape == (2, 6, sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:])))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mean_per_example_grad_is_the_full_batch_gradient_of_the_mean_loss(activation):
    weights, x, y = random_mlp([3, 5, 4, 3], n=9, seed=1)
    got = mlp_per_example_grads(weights, x, y, activation).mean(axis=1)
    want = finite_difference(lambda w: row_losses(w, x, y, activation).mean(axis=1), weights)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def test_relu_slope_at_exactly_zero_is_zero_as_in_tensorflow():
    # A zero input row with zero hidden biases puts every hidden unit at z = 0: TensorFlow's
    # ReluGrad passes nothing there, so the first layer's bias gradient is exactly zero.
    weights, _, _ = random_mlp([3, 4, 3])
    weights[1][:] = 0.0
    grads = mlp_per_example_grads(weights, np.zeros((1, 3)), np.eye(3)[:1], "relu")
    assert np.all(grads[:, 0, 12:16] == 0.0)  # b1 follows W1's 3×4 entries
    assert np.any(grads[:, 0, 16:] != 0.0)


def test_per_example_grads_stay_finite_for_huge_logits():
    weights, x, y = random_mlp([3, 4, 3], n=6)
    weights[-2] = weights[-2] * 1e4  # logits in the thousands: a naive exp overflows
    grads = mlp_per_example_grads(weights, x, y, "tanh")
    assert np.all(np.isfinite(grads))
    # softmax is one-hot at the largest logit, so the output bias gradient is onehot(argmax) - y
    bias = grads[:, :, -3:]
    assert np.all(np.isin(np.round(bias, 6), [-1.0, 0.0, 1.0]))
    np.testing.assert_allclose(bias.sum(axis=-1), 0.0, atol=1e-9)


def test_mlp_noise_scale_is_the_exact_estimator_on_the_per_example_grads():
    weights, x, y = random_mlp([2, 6, 3], m=3, n=20, seed=2)
    grad_sq, trace = mlp_noise_scale(weights, x, y, "relu")
    g = finite_difference(lambda w: row_losses(w, x, y, "relu"), weights)
    for m in range(3):
        want = noise_from_per_example(g[m])
        assert (grad_sq[m], trace[m]) == pytest.approx((want.grad_sq, want.trace_sigma), rel=1e-6)


def test_per_example_grads_match_tensorflow_row_by_row():
    keras = pytest.importorskip("keras")
    tf = pytest.importorskip("tensorflow")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(50, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    rng = np.random.default_rng(6)
    x = rng.normal(0, 3, (8, 2)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 8)]
    loss_fn = keras.losses.CategoricalCrossentropy()
    want = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = loss_fn(y[i:i + 1], model(x[i:i + 1]))
        grads = tape.gradient(loss, model.trainable_weights)
        want.append(np.concatenate([np.asarray(g).ravel() for g in grads]))
    weights = [np.asarray(w)[None] for w in model.get_weights()]
    got = mlp_per_example_grads(weights, x, y, "relu")[0]
    np.testing.assert_allclose(got, np.array(want), rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("hidden", [(50,), (7, 5)])
def test_gradient_noise_without_per_example_matrix_equals_exact(activation, hidden):
    """The engines' fast path (per-row norms, one backward pass) against the exact estimator on
    the full [M, n, P] per-example gradients, for stacks of one- and two-hidden-layer MLPs."""
    from harness.noise import gradient_noise, mlp_noise_scale

    rng = np.random.default_rng(7)
    sizes = (2, *hidden, 3)
    weights = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        weights += [rng.normal(0, 1 / np.sqrt(fan_in), (4, fan_in, fan_out)), rng.normal(0, 0.1, (4, fan_out))]
    x = rng.normal(0, 2, (300, 2))
    y = np.eye(3)[rng.integers(0, 3, 300)]
    fast_g, fast_t = gradient_noise(weights, x, y, activation)
    exact_g, exact_t = mlp_noise_scale(weights, x, y, activation)
    # float32 passes against the float64 reference: float32 rounding, nothing more
    np.testing.assert_allclose(fast_g, exact_g, rtol=2e-5)
    np.testing.assert_allclose(fast_t, exact_t, rtol=2e-5)
    assert np.all(exact_t / exact_g > 0.5)  # a real noise scale, not a degenerate zero case
