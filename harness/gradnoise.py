import numpy as np


def gradient_noise(weights, x, y, activation: str):
    """(|G|^2 [M], tr(Sigma) [M]) of the softmax cross-entropy over all rows (x [n,F], y [n,C]
    one-hot) for a stack of M MLPs, exactly, without forming the [M, n, P] per-example gradients.

    ``weights`` are Keras-ordered with a leading model axis: (W1 [M,F,H1], b1 [M,H1], ...,
    Wout [M,H,C], bout [M,C]). A dense layer's per-example gradient is the outer product of its
    input a_i and its output error d_i, so its squared norm is (|a_i|^2 + 1)|d_i|^2 with the bias;
    tr(Sigma) = (sum_i |g_i|^2 - n|G|^2) / (n - 1) then needs only one forward and one backward
    pass over the rows (Goodfellow 2015, "Efficient per-example gradient computations").
    Accumulated in float64: near a minimum |G|^2 is small against sum_i |g_i|^2."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    layers = [(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in zip(weights[::2], weights[1::2])]
    m, n = layers[0][0].shape[0], x.shape[0]
    inputs, pre = [np.broadcast_to(x, (m, *x.shape))], []
    for k, (w, b) in enumerate(layers):
        z = inputs[-1] @ w + b[:, None, :]
        pre.append(z)
        if k < len(layers) - 1:
            inputs.append(_act(activation, z))
    z = pre[-1]
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    delta = e / e.sum(axis=-1, keepdims=True) - y  # d loss_i / d logits_i, per row (not / n)
    grad_sq = np.zeros(m)
    row_sq = np.zeros((m, n))
    for k in range(len(layers) - 1, -1, -1):
        a = inputs[k]
        row_sq += ((a * a).sum(-1) + 1.0) * (delta * delta).sum(-1)
        gw = a.transpose(0, 2, 1) @ delta / n
        gb = delta.mean(axis=1)
        grad_sq += (gw * gw).sum(axis=(1, 2)) + (gb * gb).sum(-1)
        if k:
            delta = (delta @ layers[k][0].transpose(0, 2, 1)) * _act_grad(activation, pre[k - 1], a)
    trace = (row_sq.sum(-1) - n * grad_sq) / max(n - 1, 1)
    return grad_sq, trace


def _act(name: str, z):
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "tanh":
        return np.tanh(z)
    return 1.0 / (1.0 + np.exp(-z))


def _act_grad(name: str, z, a):
    # The derivatives TensorFlow uses: ReLU masks on z > 0; tanh 1 - a^2; sigmoid a(1 - a).
    if name == "relu":
        return (z > 0).astype(z.dtype)
    if name == "tanh":
        return 1.0 - a * a
    return a * (1.0 - a)
