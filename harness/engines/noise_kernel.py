"""The gradient noise scale of every member of a numba stack, in compiled loops: what
``noise.gradient_noise`` computes with NumPy (|G|^2 and tr(Σ) over all training rows, from
per-row gradient norms, Goodfellow's trick), for networks of one hidden layer in the kernels'
layout (``kernels``). 3x faster than the NumPy version on the default network (4.1 against
13.2 ms for 35 models and 500 rows), the geometric clock's ~40 measurements a group. The
passes run in float32 and the sums in float64, as there; the order of the sums differs, so the
two agree to ~1e-6 relative (tests/test_kernels.py), not bitwise.
"""
from __future__ import annotations

import numba
import numpy as np

from harness.engines.kernel_math import JIT, ONE, RELU, TANH, ZERO, f32, fmaf, relu, tanh


@numba.njit(**JIT)
def gradient_noise(W1s, W2s, B2s, x1, y, act):
    """(|G|^2 [M], tr(Σ) [M]) float64 of every model over the N rows of x1 [N, F+1] (ones column
    last) and y [N, C] one-hot; weights as kernels.train_steps takes them. The activation's
    derivative is noise._activate's (ReLU's is 0 at 0; sigmoid through tanh)."""
    M, F1, H = W1s.shape
    C, N = W2s.shape[1], x1.shape[0]
    a, slope, d1 = np.empty(H, f32), np.empty(H, f32), np.empty(H, f32)
    p, d2 = np.empty(C, f32), np.empty(C, f32)
    g1, g2, gb = np.empty((F1, H)), np.empty((C, H)), np.empty(C)  # the summed gradient, float64
    grad_sq, trace = np.empty(M), np.empty(M)
    half = f32(0.5)
    for m in range(M):
        g1[:] = 0.0
        g2[:] = 0.0
        gb[:] = 0.0
        row_sq = 0.0  # the sum over rows of each row's squared gradient norm
        for n in range(N):
            for h in range(H):
                a[h] = x1[n, 0] * W1s[m, 0, h]
            for f in range(1, F1):
                xf = x1[n, f]
                for h in range(H):
                    a[h] = fmaf(xf, W1s[m, f, h], a[h])
            if act == RELU:
                for h in range(H):
                    slope[h] = ONE if a[h] > ZERO else ZERO
                    a[h] = relu(a[h])
            elif act == TANH:
                for h in range(H):
                    a[h] = tanh(a[h])
                    slope[h] = ONE - a[h] * a[h]
            else:
                for h in range(H):
                    a[h] = half * (ONE + tanh(half * a[h]))
                    slope[h] = a[h] * (ONE - a[h])
            mx = ZERO
            for c in range(C):
                t = B2s[m, c]
                for h in range(H):
                    t = fmaf(a[h], W2s[m, c, h], t)
                p[c] = t
                mx = t if c == 0 or t > mx or t != t else mx  # NaN wins, as NumPy's max
            total = ZERO
            for c in range(C):
                p[c] = np.exp(p[c] - mx)
                total += p[c]
            # The output layer's row gradient is the outer product of a and d2 (with the bias):
            # its squared norm is (|a|^2 + 1)|d2|^2; the hidden layer's likewise from x and d1.
            a_sq, d2_sq = 0.0, 0.0
            for c in range(C):
                d2[c] = p[c] / total - y[n, c]
                d2_sq += np.float64(d2[c]) * d2[c]
            for h in range(H):
                a_sq += np.float64(a[h]) * a[h]
            row_sq += (a_sq + 1.0) * d2_sq
            for h in range(H):
                d1[h] = d2[0] * W2s[m, 0, h]
            for c in range(1, C):
                dc = d2[c]
                for h in range(H):
                    d1[h] = fmaf(dc, W2s[m, c, h], d1[h])
            x_sq, d1_sq = 0.0, 0.0
            for h in range(H):
                d1[h] = d1[h] * slope[h]
                d1_sq += np.float64(d1[h]) * d1[h]
            for f in range(F1 - 1):
                x_sq += np.float64(x1[n, f]) * x1[n, f]
            row_sq += (x_sq + 1.0) * d1_sq
            for c in range(C):
                dc = np.float64(d2[c])
                gb[c] += dc
                for h in range(H):
                    g2[c, h] += a[h] * dc
            for f in range(F1):  # the ones column last: the hidden bias's row
                xf = np.float64(x1[n, f])
                for h in range(H):
                    g1[f, h] += xf * d1[h]
        s = 0.0
        for f in range(F1):
            for h in range(H):
                s += g1[f, h] * g1[f, h]
        for c in range(C):
            s += gb[c] * gb[c]
            for h in range(H):
                s += g2[c, h] * g2[c, h]
        grad_sq[m] = s / (N * N)  # |G|^2 of the mean gradient
        trace[m] = (row_sq - N * grad_sq[m]) / max(N - 1, 1)
    return grad_sq, trace
