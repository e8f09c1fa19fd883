"""Forward/backward pairs of the layers that models are assembled from.

Letters: B batch, N positions, C model width, F feed-forward width.
Every pair follows the package convention

    out, cache = name_forward(inputs..., options)
    grads = name_backward(dout, cache)       # one gradient per differentiable input

The layer classes in ``miniattn.nn`` are thin wrappers that own the parameters.
"""

import numpy as np

from ..core.validate import check_float_array, check_generator, check_real

# --- linear -----------------------------------------------------------------------


def linear_forward(x, weight, bias=None):
    """y = x W + b for x (..., C_in), W (C_in, C_out), b (C_out,). Returns (y, cache)."""
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"x has width {x.shape[-1]} but the weight has shape {weight.shape}; expected ({x.shape[-1]}, C_out)")
    y = x @ weight  # (..., C_in) @ (C_in, C_out) -> (..., C_out)
    if bias is not None:
        y = y + bias
    return y, (x, weight, bias is not None)


def linear_backward(dy, cache):
    """Returns (dx, dW, db); db is None when the forward had no bias."""
    x, weight, has_bias = cache
    dx = dy @ weight.T  # (..., C_out) @ (C_out, C_in) -> (..., C_in)
    dweight = x.reshape(-1, x.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])  # (C_in, C_out)
    dbias = dy.reshape(-1, dy.shape[-1]).sum(axis=0) if has_bias else None
    return dx, dweight, dbias


# --- layer normalisation -------------------------------------------------------------


def layer_norm_forward(x, gamma=None, beta=None, eps=1e-5):
    """Normalise the last axis to zero mean and unit variance, then scale and shift.

        x_hat = (x - mean) / sqrt(var + eps),   y = gamma * x_hat + beta

    gamma and beta (C,) are optional: without them this is the parameter-free
    normalisation that routing attention applies to queries and keys.
    Returns (y, cache).
    """
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    centered = x - mean  # (..., C)
    variance = np.mean(centered**2, axis=-1, keepdims=True)  # (..., 1)
    inverse_std = 1.0 / np.sqrt(variance + eps)  # (..., 1)
    x_hat = centered * inverse_std  # (..., C)
    y = x_hat
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return y, (x_hat, inverse_std, gamma, beta is not None)


def layer_norm_backward(dy, cache):
    """Returns (dx, dgamma, dbeta); dgamma and dbeta are None without parameters.

    With g = dy * gamma (the gradient reaching x_hat):
        dx = inverse_std * (g - mean(g) - x_hat * mean(g * x_hat))
    """
    x_hat, inverse_std, gamma, has_beta = cache
    reduce_axes = tuple(range(dy.ndim - 1))
    dgamma = np.sum(dy * x_hat, axis=reduce_axes) if gamma is not None else None
    dbeta = np.sum(dy, axis=reduce_axes) if has_beta else None
    dx_hat = dy * gamma if gamma is not None else dy  # (..., C)
    dx = inverse_std * (
        dx_hat
        - dx_hat.mean(axis=-1, keepdims=True)
        - x_hat * np.mean(dx_hat * x_hat, axis=-1, keepdims=True)
    )
    return dx, dgamma, dbeta


# --- activations -------------------------------------------------------------------


def relu_forward(x):
    """max(x, 0). Returns (y, cache)."""
    return np.maximum(x, 0), (x > 0,)


def relu_backward(dy, cache):
    """dx = dy where x > 0, else 0."""
    (positive,) = cache
    return dy * positive


# A Python float, not np.float64: under NumPy 2 promotion rules a float64 NumPy
# scalar would turn float32 activations into float64.
GELU_C = float(np.sqrt(2.0 / np.pi))


def gelu_forward(x):
    """GELU with the tanh approximation used by GPT-2 and BERT:

    gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    Returns (y, cache).
    """
    # x * x * x, not x**3: with NumPy 2.4, float32 x**3 of negative x measured about 60x slower.
    inner = GELU_C * (x + 0.044715 * (x * x * x))
    tanh_inner = np.tanh(inner)
    return 0.5 * x * (1.0 + tanh_inner), (x, tanh_inner)


def gelu_backward(dy, cache):
    """dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)), t = tanh(inner)."""
    x, tanh_inner = cache
    dinner = GELU_C * (1.0 + 3 * 0.044715 * (x * x))
    return dy * (0.5 * (1.0 + tanh_inner) + 0.5 * x * (1.0 - tanh_inner * tanh_inner) * dinner)


ACTIVATIONS = {"relu": (relu_forward, relu_backward), "gelu": (gelu_forward, gelu_backward)}


# --- position-wise feed-forward ---------------------------------------------------------


def feed_forward_forward(x, w1, b1, w2, b2, activation="relu"):
    """FF(x) = act(x W1 + b1) W2 + b2, applied at every position independently.

    x (..., C), W1 (C, F), W2 (F, C). Returns (y, cache).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is invalid; expected one of {', '.join(ACTIVATIONS)}")
    act_forward, _ = ACTIVATIONS[activation]

    # 1. Expand.
    hidden, cache_in = linear_forward(x, w1, b1)  # (..., F)
    # 2. Non-linearity.
    activated, cache_act = act_forward(hidden)  # (..., F)
    # 3. Project back.
    y, cache_out = linear_forward(activated, w2, b2)  # (..., C)
    return y, (cache_in, cache_act, cache_out, activation)


def feed_forward_backward(dy, cache):
    """Returns (dx, dW1, db1, dW2, db2)."""
    cache_in, cache_act, cache_out, activation = cache
    _, act_backward = ACTIVATIONS[activation]
    # 3. y = activated W2 + b2
    dactivated, dw2, db2 = linear_backward(dy, cache_out)
    # 2. activated = act(hidden)
    dhidden = act_backward(dactivated, cache_act)
    # 1. hidden = x W1 + b1
    dx, dw1, db1 = linear_backward(dhidden, cache_in)
    return dx, dw1, db1, dw2, db2


# --- dropout ---------------------------------------------------------------------------


def dropout_forward(x, p, rng=None, *, mask=None):
    """Inverted dropout: zero each entry with probability p and scale the rest by 1/(1-p).

    The keep-mask is drawn from rng (a numpy.random.Generator), or passed in
    as `mask` to replay an earlier draw (reversible layers recompute with it).
    p = 0 returns x unchanged. Returns (y, cache); cache holds the scaled mask.
    """
    check_real("p", p, minimum=0.0, maximum=1.0)
    if p == 1.0:
        raise ValueError("p=1.0 is invalid; dropout needs a keep probability above 0 (expected 0 <= p < 1)")
    if mask is None:
        if p == 0.0:
            return x, (None,)
        check_generator("rng", rng)
        mask = (rng.random(x.shape) >= p).astype(x.dtype) / x.dtype.type(1.0 - p)
    elif mask.shape != x.shape:
        raise ValueError(f"mask has shape {mask.shape}; expected {x.shape}")
    return x * mask, (mask,)


def dropout_backward(dy, cache):
    """dx = dy * scaled mask."""
    (mask,) = cache
    return dy if mask is None else dy * mask


# --- loss --------------------------------------------------------------------------------


def cross_entropy_forward(logits, targets, ignore_index=None):
    """Mean softmax cross-entropy of logits (..., V) against integer targets (...).

    Positions whose target equals ignore_index are left out of the mean.
    Returns (loss, cache), loss a Python float.
    """
    check_float_array("logits", logits, min_ndim=1)
    targets = np.asarray(targets)
    if not np.issubdtype(targets.dtype, np.integer):
        raise TypeError(f"targets has dtype {targets.dtype}; expected integer class indices")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets has shape {targets.shape}; expected {logits.shape[:-1]} to match logits {logits.shape}")
    vocab = logits.shape[-1]
    valid = np.ones(targets.shape, dtype=bool) if ignore_index is None else targets != ignore_index
    safe_targets = np.where(valid, targets, 0)
    if np.any((safe_targets < 0) | (safe_targets >= vocab)):
        raise ValueError(f"targets must lie in [0, {vocab}), got values from {targets.min()} to {targets.max()}")
    count = int(valid.sum())
    if count == 0:
        raise ValueError("every target equals ignore_index; the loss has no terms")

    row_max = logits.max(axis=-1, keepdims=True)  # (..., 1)
    shifted = logits - row_max
    log_norm = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # (..., 1)
    log_probs = shifted - log_norm  # (..., V)
    picked = np.take_along_axis(log_probs, safe_targets[..., None], axis=-1)[..., 0]  # (...)
    loss = float(-(picked * valid).sum() / count)
    return loss, (log_probs, safe_targets, valid, count)


def cross_entropy_backward(dloss, cache):
    """dlogits = (softmax(logits) - onehot(targets)) * dloss / count on valid positions."""
    log_probs, targets, valid, count = cache
    dlogits = np.exp(log_probs)  # (..., V) softmax
    np.put_along_axis(dlogits, targets[..., None], np.take_along_axis(dlogits, targets[..., None], axis=-1) - 1.0, axis=-1)
    dlogits *= (valid[..., None] * (dloss / count))
    return dlogits
