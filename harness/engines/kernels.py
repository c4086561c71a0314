"""numba kernels for the fused engine: every member of a group trained in compiled loops (scored:
``score_kernels``), with the NumPy path's arithmetic (``stack.Stack``) rounding for rounding.

Why compiled loops: the NumPy path issues ~25 ufunc and matmul calls per step for the whole
stack; at small batches each call does little work, and their fixed cost dominates (1.4 µs per
model-update at batch size 1 with 35 models, against ~0.2 µs here).

Layout (``kernel_stack.NumbaStack`` holds it; ``fused._Stack`` keeps one [M, P] array): one contiguous array per
tensor, W1b [M, F+1, H] (the bias as row F, x carries a ones column), W2T [M, C, H] (W2
transposed, so every inner loop runs over contiguous hidden units), b2 [M, C], and the same for
the momenta. No array views inside the loops: each view costs numba a reference-count pair.

**Summation order.** Floats are not associative, so equal results need the same order of
additions as the libraries behind the NumPy path. With ``exact=True`` the kernel sums as
OpenBLAS 0.3's SkylakeX kernels do on the default network (2 features, 3 classes):
  z1 = x1 @ W1b           sequential FMA over the F+1 inputs (bias last), any batch size;
  logits, batch 1         sgemv's 3-column path (C = 3 only): pairs of hidden units, t + fma(a_k,
                          w_k, a_k+1*w_k+1), then the H%4 tail by FMA; C != 3 falls to the next rule;
  logits, batch > 1       16 FMA lanes (lane = unit mod 16) reduced by adjacent pairs for rows in
                          the batch's whole 4-row blocks and by halves for the rest; + b2 apart
                          (from WIDE_BATCH rows on, the same sums for all rows at once);
  da1 = p @ W2^T          sequential FMA over classes; at batch 1 with C = 3, sgemv_t's tail
                          blocks for units from H&~7 up;
  dW1b, dW2, db2          sequential over the batch rows (FMA, plain adds for db2);
  softmax, SGD            as stack.Stack.step, with NumPy's float32 exp ported (kernel_math).
``exact=False`` is one fixed order, whatever the BLAS: the batch > 1 rules for every row and
batch size, sequential FMA for da1. Where the exact order is not the BLAS's own (another CPU or
BLAS, or other shapes: see tests/test_kernels.py for which are bit-identical here) both orders
differ from the NumPy path only in float32 rounding, as the NumPy path differs from Keras.
"""
from __future__ import annotations

import numba
import numpy as np

from harness.engines.kernel_math import (ADAM, JIT, ONE, RELU, SGD, TANH, ZERO, f32, fmaf, np_expf, relu, relu_grad,
                                         sigmoid, sigmoid_grad, tanh, tanh_grad)


# One parameter's update by optimizers.apply's rule, rounding as it rounds: the new weight and
# states from the weight, its gradient and the states the rule keeps (SGD: its velocity v;
# Adam: m as v and its v as s; RMSprop: its v as s). Scalar functions, each called from loops of
# its own (train_steps picks the optimizer outside the loops, so they stay vectorizable, and
# touch only the states the rule keeps).

@numba.njit(**JIT)
def _sgd(w, g, v, rate, mu, nesterov):
    ge = g * rate
    v = v * mu - ge
    return w + (v * mu - ge if nesterov else v), v


@numba.njit(**JIT)
def _adam(w, g, v, s, alpha, keep_1, keep_2, eps):
    v = v + (g - v) * keep_1
    s = s + (g * g - s) * keep_2
    return w - (v * alpha) / (np.sqrt(s) + eps), v, s


@numba.njit(**JIT)
def _rmsprop(w, g, s, rate, keep_rho, eps, rho):
    s = s * rho + (g * g) * keep_rho
    return w - (g * rate) / np.sqrt(s + eps), s


# From this batch size on, a batch's logits are summed for all its rows at once (vectorized over
# the rows) rather than a row at a time: 129 -> 104 ns per model-row at 32 rows, 133 -> 115 at
# 16; slower below (186 against 144 at 8).
WIDE_BATCH = 16


@numba.njit(**JIT)
def train_steps(W1s, W2s, B2s, V1s, V2s, VBs, S1s, S2s, SBs, lr, hp, opt, nesterov, x1, y, rows, batch, s0, s1,
                logits, act, exact):
    """Steps s0..s1-1 of one epoch for every model m: batch s is rows[m, s*batch:(s+1)*batch] of
    x1 [N, F+1] (ones column last) and y [N, C] one-hot; updates the weights and the optimizer's
    states (V*, S*: optimizers.apply's first and second) in place and writes each row's
    pre-update logits to logits [M, N, C]. lr [M, R] float32: step s's rate (Adam: its alpha) is
    lr[m, s], or lr[m, 0] when R is 1. hp [M, 6] float32 per model: momentum, l2, 1 - beta_1,
    1 - beta_2 (RMSprop: 1 - rho), epsilon, rho; the L2 penalty's gradient l2 * (2 W) joins the
    kernels' as in stack.Stack. opt: SGD, ADAM or RMSPROP; nesterov: SGD's Nesterov form.
    One function with its phases inline, not one per phase: numba reference-counts every array
    handed to a call, and those atomics cost ~0.1 µs per model-update, half the budget."""
    M, N = rows.shape
    F1, H, C = W1s.shape[1], W1s.shape[2], W2s.shape[1]
    xb, yb = np.empty((batch, F1), f32), np.empty((batch, C), f32)
    z1, a1, dz = np.empty((batch, H), f32), np.empty((batch, H), f32), np.empty((batch, H), f32)
    p, e, lanes = np.empty((C, batch), f32), np.empty((C, batch), f32), np.empty(16, f32)
    # The wide logits' layout, [unit or lane, row]; a row length that is a multiple of 1 KiB maps
    # every unit's row to the same cache sets (bs 256: 207 ns per model-row, 139 padded by 16).
    stride = batch + 16 if batch % 256 == 0 else batch
    a1T, part = np.empty((H, stride), f32), np.empty((16, stride), f32)
    mxv, tot = np.empty(batch, f32), np.empty(batch, f32)
    gW1, gW2, gb2 = np.empty((F1, H), f32), np.empty((C, H), f32), np.empty(C, f32)
    t2, t4, t8 = H & ~1, H & ~3, H & ~7
    gemv = exact and C == 3
    two = f32(2.0)
    penalised = False  # as stack.Stack: every member's kernels take the penalty term once any has one
    for m in range(M):
        penalised = penalised or hp[m, 1] != ZERO  # sgemv's small-matrix paths, emulated for 3 classes only
    for s in range(s0, s1):
        i0 = s * batch
        b = min(batch, N - i0)
        inv_b = ONE / f32(b)
        blocks = (b // 4) * 4  # rows in whole 4-row blocks: their logits reduce pairwise
        wide = b >= WIDE_BATCH
        inline = opt == SGD and b == 1 and not penalised
        for m in range(M):
            for r in range(b):  # gather the batch, so the loops below read contiguous rows
                row = rows[m, i0 + r]
                for f in range(F1):
                    xb[r, f] = x1[row, f]
                for c in range(C):
                    yb[r, c] = y[row, c]
            for r in range(b):
                # hidden layer: sequential FMA over the inputs
                if F1 == 3 and act == RELU:  # two features and relu: one pass, z1 and a1 stored once
                    x0, x1r, x2 = xb[r, 0], xb[r, 1], xb[r, 2]
                    for h in range(H):
                        v = fmaf(x2, W1s[m, 2, h], fmaf(x1r, W1s[m, 1, h], x0 * W1s[m, 0, h]))
                        z1[r, h] = v
                        a1[r, h] = relu(v)
                else:
                    for h in range(H):
                        z1[r, h] = xb[r, 0] * W1s[m, 0, h]
                    for f in range(1, F1):
                        xf = xb[r, f]
                        for h in range(H):
                            z1[r, h] = fmaf(xf, W1s[m, f, h], z1[r, h])
                    # one loop per activation, not a branch per unit: the loop then vectorizes
                    if act == RELU:
                        for h in range(H):
                            a1[r, h] = relu(z1[r, h])
                    elif act == TANH:
                        for h in range(H):
                            a1[r, h] = tanh(z1[r, h])
                    else:
                        for h in range(H):
                            a1[r, h] = sigmoid(z1[r, h])
                # logits
                if gemv and b == 1:
                    for c in range(C):
                        t = ZERO
                        for k in range(0, t4, 2):
                            t = t + fmaf(a1[r, k], W2s[m, c, k], a1[r, k + 1] * W2s[m, c, k + 1])
                        for k in range(t4, H):
                            t = fmaf(a1[r, k], W2s[m, c, k], t)
                        p[c, r] = t + B2s[m, c]
                elif wide:
                    for h in range(H):
                        a1T[h, r] = a1[r, h]
                else:
                    for c in range(C):
                        for l in range(16):
                            lanes[l] = ZERO
                        for k0 in range(0, H - 15, 16):  # lane l sums units k0 + l: one 16-wide vector FMA
                            for l in range(16):
                                lanes[l] = fmaf(a1[r, k0 + l], W2s[m, c, k0 + l], lanes[l])
                        k0 = H - H % 16
                        for l in range(H % 16):
                            lanes[l] = fmaf(a1[r, k0 + l], W2s[m, c, k0 + l], lanes[l])
                        # The 16 partial sums reduced as the BLAS kernel does (module docstring);
                        # inline, not a function: numba would reference-count the array passed.
                        if exact and r < blocks:
                            for l in range(8):
                                lanes[l] = lanes[2 * l] + lanes[2 * l + 1]
                            for l in range(4):
                                lanes[l] = lanes[2 * l] + lanes[2 * l + 1]
                            lanes[0] = lanes[0] + lanes[1]
                            lanes[1] = lanes[2] + lanes[3]
                        else:
                            for l in range(8):
                                lanes[l] = lanes[l] + lanes[l + 8]
                            for l in range(4):
                                lanes[l] = lanes[l] + lanes[l + 4]
                            lanes[0] = lanes[0] + lanes[2]
                            lanes[1] = lanes[1] + lanes[3]
                        p[c, r] = (lanes[0] + lanes[1]) + B2s[m, c]
                if not wide:
                    for c in range(C):
                        logits[m, i0 + r, c] = p[c, r]
            if wide:
                # The batch's logits at once, the loops over its rows vectorized: lane l of a row sums
                # units l, l+16, ... in order, the lanes then reduced as above, bit for bit.
                for c in range(C):
                    for l in range(16):
                        for r in range(b):
                            part[l, r] = ZERO
                        k = l
                        while k + 48 < H:  # four of the lane's units per pass over the rows, in order
                            w0, w1, w2, w3 = W2s[m, c, k], W2s[m, c, k + 16], W2s[m, c, k + 32], W2s[m, c, k + 48]
                            for r in range(b):
                                part[l, r] = fmaf(a1T[k + 48, r], w3, fmaf(a1T[k + 32, r], w2, fmaf(
                                    a1T[k + 16, r], w1, fmaf(a1T[k, r], w0, part[l, r]))))
                            k += 64
                        if k + 32 < H:
                            w0, w1, w2 = W2s[m, c, k], W2s[m, c, k + 16], W2s[m, c, k + 32]
                            for r in range(b):
                                part[l, r] = fmaf(a1T[k + 32, r], w2, fmaf(a1T[k + 16, r], w1, fmaf(
                                    a1T[k, r], w0, part[l, r])))
                        elif k + 16 < H:
                            w0, w1 = W2s[m, c, k], W2s[m, c, k + 16]
                            for r in range(b):
                                part[l, r] = fmaf(a1T[k + 16, r], w1, fmaf(a1T[k, r], w0, part[l, r]))
                        elif k < H:
                            w0 = W2s[m, c, k]
                            for r in range(b):
                                part[l, r] = fmaf(a1T[k, r], w0, part[l, r])
                    bc, top = B2s[m, c], blocks if exact else 0
                    for r in range(top):
                        p[c, r] = (((part[0, r] + part[1, r]) + (part[2, r] + part[3, r]))
                                   + ((part[4, r] + part[5, r]) + (part[6, r] + part[7, r]))
                                   + (((part[8, r] + part[9, r]) + (part[10, r] + part[11, r]))
                                      + ((part[12, r] + part[13, r]) + (part[14, r] + part[15, r])))) + bc
                    for r in range(top, b):
                        p[c, r] = ((((part[0, r] + part[8, r]) + (part[4, r] + part[12, r]))
                                    + ((part[2, r] + part[10, r]) + (part[6, r] + part[14, r])))
                                   + (((part[1, r] + part[9, r]) + (part[5, r] + part[13, r]))
                                      + ((part[3, r] + part[11, r]) + (part[7, r] + part[15, r])))) + bc
                    for r in range(b):
                        logits[m, i0 + r, c] = p[c, r]
            # dLoss/dlogits = (softmax - y) / b, the softmax shifted by the row max as TF does;
            # a class at a time over the batch's rows, so that the loops vectorize
            for r in range(b):
                mxv[r] = p[0, r]
            for c in range(1, C):
                for r in range(b):
                    v = p[c, r]
                    mxv[r] = mxv[r] if (mxv[r] >= v or mxv[r] != mxv[r]) else v  # np.maximum: NaN wins
            for c in range(C):
                for r in range(b):
                    e[c, r] = np_expf(p[c, r] - mxv[r])
            for r in range(b):
                tot[r] = e[0, r]
            for c in range(1, C):
                for r in range(b):
                    tot[r] = tot[r] + e[c, r]
            for c in range(C):
                for r in range(b):
                    q = e[c, r] / tot[r] - yb[r, c]
                    p[c, r] = q * inv_b if b > 1 else q  # the NumPy path skips * 1/1 at batch 1
            top = t8 if gemv and b == 1 else H  # sgemv_t's tail blocks: the units from t8, below
            for r in range(b):
                # da1 = p @ W2^T, then through the activation
                if C == 3 and act == RELU:  # one pass for the three classes and the relu
                    p0, p1, p2 = p[0, r], p[1, r], p[2, r]
                    for h in range(top):
                        dz[r, h] = relu_grad(z1[r, h], fmaf(p2, W2s[m, 2, h], fmaf(p1, W2s[m, 1, h], p0 * W2s[m, 0, h])))
                else:
                    for h in range(top):
                        dz[r, h] = p[0, r] * W2s[m, 0, h]
                    for c in range(1, C):
                        pc = p[c, r]
                        for h in range(top):
                            dz[r, h] = fmaf(pc, W2s[m, c, h], dz[r, h])
                    if act == RELU:
                        for h in range(top):
                            dz[r, h] = relu_grad(z1[r, h], dz[r, h])
                    elif act == TANH:
                        for h in range(top):
                            dz[r, h] = tanh_grad(a1[r, h], dz[r, h])
                    else:
                        for h in range(top):
                            dz[r, h] = sigmoid_grad(a1[r, h], dz[r, h])
                for h in range(top, H):  # batch 1, 3 classes: sgemv_t sums them in other orders here
                    w0, w1, w2 = W2s[m, 0, h], W2s[m, 1, h], W2s[m, 2, h]
                    if t4 <= h < t2:
                        d = (w0 * p[0, r] + w1 * p[1, r]) + w2 * p[2, r]
                    else:
                        d = fmaf(w2, p[2, r], fmaf(w0, p[0, r], w1 * p[1, r]))
                    if act == RELU:
                        dz[r, h] = relu_grad(z1[r, h], d)
                    elif act == TANH:
                        dz[r, h] = tanh_grad(a1[r, h], d)
                    else:
                        dz[r, h] = sigmoid_grad(a1[r, h], d)
            if not inline:  # (else the update takes the gradient inline)
                # weight gradients, sequential over the batch rows; up to four rows per pass, so that
                # a gradient row is loaded and stored once per four rows (bs 500: 94 ns per
                # model-row, 103 at two rows per pass)
                for c in range(C):
                    for h in range(H):
                        gW2[c, h] = a1[0, h] * p[c, 0]
                    acc = p[c, 0]
                    for r in range(1, b):
                        acc = acc + p[c, r]
                    gb2[c] = acc
                    r = 1
                    while r + 3 < b:  # four rows per pass, in row order
                        p0, p1, p2, p3 = p[c, r], p[c, r + 1], p[c, r + 2], p[c, r + 3]
                        for h in range(H):
                            gW2[c, h] = fmaf(a1[r + 3, h], p3, fmaf(a1[r + 2, h], p2, fmaf(
                                a1[r + 1, h], p1, fmaf(a1[r, h], p0, gW2[c, h]))))
                        r += 4
                    if r + 1 < b:
                        p0, p1 = p[c, r], p[c, r + 1]
                        for h in range(H):
                            gW2[c, h] = fmaf(a1[r + 1, h], p1, fmaf(a1[r, h], p0, gW2[c, h]))
                        r += 2
                    if r < b:
                        p0 = p[c, r]
                        for h in range(H):
                            gW2[c, h] = fmaf(a1[r, h], p0, gW2[c, h])
                for f in range(F1):
                    for h in range(H):
                        gW1[f, h] = xb[0, f] * dz[0, h]
                    r = 1
                    while r + 3 < b:
                        x0, x1r, x2, x3 = xb[r, f], xb[r + 1, f], xb[r + 2, f], xb[r + 3, f]
                        for h in range(H):
                            gW1[f, h] = fmaf(x3, dz[r + 3, h], fmaf(x2, dz[r + 2, h], fmaf(
                                x1r, dz[r + 1, h], fmaf(x0, dz[r, h], gW1[f, h]))))
                        r += 4
                    if r + 1 < b:
                        x0, x1r = xb[r, f], xb[r + 1, f]
                        for h in range(H):
                            gW1[f, h] = fmaf(x1r, dz[r + 1, h], fmaf(x0, dz[r, h], gW1[f, h]))
                        r += 2
                    if r < b:
                        x0 = xb[r, f]
                        for h in range(H):
                            gW1[f, h] = fmaf(x0, dz[r, h], gW1[f, h])
                # The penalty's gradient joins the kernels' (not b1's, the last row of W1b)
                pen = hp[m, 1]
                if penalised:
                    for f in range(F1 - 1):
                        for h in range(H):
                            gW1[f, h] = gW1[f, h] + (W1s[m, f, h] * two) * pen
                    for c in range(C):
                        for h in range(H):
                            gW2[c, h] = gW2[c, h] + (W2s[m, c, h] * two) * pen
            # The optimizer's rule (optimizers.apply), chosen outside the loops
            rate = lr[m, s if lr.shape[1] > 1 else 0]
            mu, ka, kb, eps, rho = hp[m, 0], hp[m, 2], hp[m, 3], hp[m, 4], hp[m, 5]
            if inline:
                # one row's gradient is a product: taken inline by the update, no gradient arrays
                for f in range(F1):
                    xf = xb[0, f]
                    for h in range(H):
                        W1s[m, f, h], V1s[m, f, h] = _sgd(W1s[m, f, h], xf * dz[0, h], V1s[m, f, h], rate, mu, nesterov)
                for c in range(C):
                    pc = p[c, 0]
                    for h in range(H):
                        W2s[m, c, h], V2s[m, c, h] = _sgd(W2s[m, c, h], a1[0, h] * pc, V2s[m, c, h], rate, mu, nesterov)
                    B2s[m, c], VBs[m, c] = _sgd(B2s[m, c], pc, VBs[m, c], rate, mu, nesterov)
            elif opt == SGD:
                for f in range(F1):
                    for h in range(H):
                        W1s[m, f, h], V1s[m, f, h] = _sgd(W1s[m, f, h], gW1[f, h], V1s[m, f, h], rate, mu, nesterov)
                for c in range(C):
                    for h in range(H):
                        W2s[m, c, h], V2s[m, c, h] = _sgd(W2s[m, c, h], gW2[c, h], V2s[m, c, h], rate, mu, nesterov)
                    B2s[m, c], VBs[m, c] = _sgd(B2s[m, c], gb2[c], VBs[m, c], rate, mu, nesterov)
            elif opt == ADAM:
                for f in range(F1):
                    for h in range(H):
                        W1s[m, f, h], V1s[m, f, h], S1s[m, f, h] = _adam(
                            W1s[m, f, h], gW1[f, h], V1s[m, f, h], S1s[m, f, h], rate, ka, kb, eps)
                for c in range(C):
                    for h in range(H):
                        W2s[m, c, h], V2s[m, c, h], S2s[m, c, h] = _adam(
                            W2s[m, c, h], gW2[c, h], V2s[m, c, h], S2s[m, c, h], rate, ka, kb, eps)
                    B2s[m, c], VBs[m, c], SBs[m, c] = _adam(B2s[m, c], gb2[c], VBs[m, c], SBs[m, c], rate, ka, kb, eps)
            else:
                for f in range(F1):
                    for h in range(H):
                        W1s[m, f, h], S1s[m, f, h] = _rmsprop(W1s[m, f, h], gW1[f, h], S1s[m, f, h], rate, kb, eps, rho)
                for c in range(C):
                    for h in range(H):
                        W2s[m, c, h], S2s[m, c, h] = _rmsprop(W2s[m, c, h], gW2[c, h], S2s[m, c, h], rate, kb, eps, rho)
                    B2s[m, c], SBs[m, c] = _rmsprop(B2s[m, c], gb2[c], SBs[m, c], rate, kb, eps, rho)
