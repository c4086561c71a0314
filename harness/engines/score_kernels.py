"""numba kernels that score a stack: every member on a whole split (``evaluate``, the clock's
points), and each member's running epoch loss and accuracy from the logits the training steps
wrote (``epoch_scores``, the epoch records), in the layout of ``kernels.train_steps``.

The epoch's scores equal the NumPy path's (``stack.Stack.epoch_scores``) bit for bit: the same
max, NumPy's float32 exp and log (the ports in kernel_math), class sums in class order. For a
full.yaml group (35 models, 200 epochs) 0.16 s of ufunc passes over [M, N, 3] become 0.05 s.
"""
from __future__ import annotations

import numba
import numpy as np

from harness.engines.kernel_math import JIT, RELU, TANH, ZERO, f32, fmaf, np_expf, np_logf, relu, sigmoid, tanh


@numba.njit(**JIT)
def _softmax_rows(lg, mx, ex, total):
    """The softmax's parts for logits lg [C, N], a class at a time over the rows (so the loops
    vectorize): lg shifted in place by each row's max (NumPy's maximum: NaN wins), ex [C, N] its
    exp, total [N] the sum of ex over the classes in class order."""
    C, N = lg.shape
    for n in range(N):
        mx[n] = lg[0, n]
    for c in range(1, C):
        for n in range(N):
            v = lg[c, n]
            mx[n] = mx[n] if (mx[n] >= v or mx[n] != mx[n]) else v
    for c in range(C):
        for n in range(N):
            lg[c, n] = lg[c, n] - mx[n]
            ex[c, n] = np_expf(lg[c, n])
    for n in range(N):
        total[n] = ex[0, n]
    for c in range(1, C):
        for n in range(N):
            total[n] = total[n] + ex[c, n]


@numba.njit(**JIT)
def _argmax_rows(ex, total, best, index):
    """index [N]: each row's class of highest probability ex / total, the first on ties, with
    NumPy's NaN rule (stack.argmax_classes); best [N] is scratch."""
    C, N = ex.shape
    for n in range(N):
        best[n] = ex[0, n] / total[n]
        index[n] = 0
    for c in range(1, C):
        for n in range(N):
            pc = ex[c, n] / total[n]
            index[n] = c if pc > best[n] else index[n]
            best[n] = best[n] if (best[n] >= pc or best[n] != best[n]) else pc


@numba.njit(**JIT)
def evaluate(W1s, W2s, B2s, x1T, y, labels, act):
    """(loss [M] float32, accuracy [M] float64) of every model on all N rows: x1T [F+1, N] (the
    ones row last), y [N, C] one-hot, labels [N] its class ids. Every loop runs over the rows,
    contiguous, so it vectorizes (the softmax too: np_expf and np_logf have no branches); the sums
    run in another order than the NumPy path's matmuls: the loss agrees to ~1e-7 relative, not
    bitwise. Accuracy takes the argmax of the softmax probabilities with NumPy's
    tie and NaN rules (stack.argmax_classes), as the NumPy path does."""
    M, F1, H = W1s.shape
    C, N = W2s.shape[1], x1T.shape[1]
    z, lg, ex = np.empty((4, N), f32), np.empty((C, N), f32), np.empty((C, N), f32)
    mx, total, lse = np.empty(N, f32), np.empty(N, f32), np.empty(N, f32)
    row_loss, best, index = np.empty(N, f32), np.empty(N, f32), np.empty(N, np.int64)
    loss, accuracy = np.empty(M, f32), np.empty(M, np.float64)
    for m in range(M):
        for c in range(C):
            for n in range(N):
                lg[c, n] = ZERO
        # Four hidden units for all rows at a time, then their terms of the logits in one pass per
        # class (in unit order): each pass stores its rows once, not once per unit.
        for h0 in range(0, H, 4):
            units = min(4, H - h0)
            for j in range(units):
                h = h0 + j
                if F1 == 3 and act == RELU:  # two features and relu: one pass
                    w0, w1, w2 = W1s[m, 0, h], W1s[m, 1, h], W1s[m, 2, h]
                    for n in range(N):
                        z[j, n] = relu(fmaf(x1T[2, n], w2, fmaf(x1T[1, n], w1, x1T[0, n] * w0)))
                    continue
                w = W1s[m, 0, h]
                for n in range(N):
                    z[j, n] = x1T[0, n] * w
                for f in range(1, F1):
                    w = W1s[m, f, h]
                    for n in range(N):
                        z[j, n] = fmaf(x1T[f, n], w, z[j, n])
                if act == RELU:
                    for n in range(N):
                        z[j, n] = relu(z[j, n])
                elif act == TANH:
                    for n in range(N):
                        z[j, n] = tanh(z[j, n])
                else:
                    for n in range(N):
                        z[j, n] = sigmoid(z[j, n])
            for c in range(C):
                if units == 4:
                    w0, w1, w2, w3 = W2s[m, c, h0], W2s[m, c, h0 + 1], W2s[m, c, h0 + 2], W2s[m, c, h0 + 3]
                    for n in range(N):
                        lg[c, n] = fmaf(z[3, n], w3, fmaf(z[2, n], w2, fmaf(z[1, n], w1, fmaf(z[0, n], w0, lg[c, n]))))
                else:
                    for j in range(units):
                        w = W2s[m, c, h0 + j]
                        for n in range(N):
                            lg[c, n] = fmaf(z[j, n], w, lg[c, n])
        # The softmax and its log a class at a time over all rows, then each row's loss and argmax.
        for c in range(C):
            b = B2s[m, c]
            for n in range(N):
                lg[c, n] = lg[c, n] + b
        _softmax_rows(lg, mx, ex, total)
        for n in range(N):
            lse[n] = np_logf(total[n])
            row_loss[n] = ZERO
        for c in range(C):
            for n in range(N):
                row_loss[n] = row_loss[n] + y[n, c] * (lse[n] - lg[c, n])
        _argmax_rows(ex, total, best, index)
        total_loss, right = 0.0, 0
        for n in range(N):
            total_loss += row_loss[n]
            right += index[n] == labels[n]
        loss[m] = total_loss / N
        accuracy[m] = right / N
    return loss, accuracy


@numba.njit(**JIT)
def epoch_scores(logits, rows, y, labels, loss):
    """From the pre-update logits [M, N, C] of an epoch's rows (member m's row n is training row
    rows[m, n] of y [N_train, C] one-hot, class ids labels [N_train]): each row's cross-entropy
    into loss [M, N] (stack.softmax_xent's: the sum over classes, in class order, of
    y * (log of the row's sum of exp - the logit shifted by the row's max); 0 * inf is NaN there
    too), and returns each member's rows right [M] (the argmax of the softmax probabilities,
    first on ties, as stack.argmax_classes)."""
    M, N, C = logits.shape
    lg, ex = np.empty((C, N), f32), np.empty((C, N), f32)  # a class at a time over the rows: vectorized
    mx, tot, best, index = np.empty(N, f32), np.empty(N, f32), np.empty(N, f32), np.empty(N, np.int64)
    right = np.zeros(M, np.int64)
    for m in range(M):
        for n in range(N):
            for c in range(C):
                lg[c, n] = logits[m, n, c]
        _softmax_rows(lg, mx, ex, tot)
        _argmax_rows(ex, tot, best, index)
        for n in range(N):
            right[m] += index[n] == labels[rows[m, n]]
            tot[n] = np_logf(tot[n])
        for n in range(N):
            row = rows[m, n]
            acc = y[row, 0] * (tot[n] - lg[0, n])
            for c in range(1, C):
                acc = acc + y[row, c] * (tot[n] - lg[c, n])
            loss[m, n] = acc
    return right
