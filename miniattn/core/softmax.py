"""Numerically stable softmax and log-sum-exp over the last axis, with masks.

    softmax(x)_j   = exp(x_j - max_x) / sum_k exp(x_k - max_x)
    logsumexp(x)   = max_x + log sum_k exp(x_k - max_x)

Subtracting the row maximum keeps every exponent <= 0, so float32 logits of
magnitude 1e4 do not overflow. A boolean ``allowed`` mask (True where an entry
takes part) removes entries exactly: they get probability 0, not a tiny one.

Fully masked rows follow one rule everywhere in miniattn: probabilities 0,
log-sum-exp -inf, gradient 0, never NaN. The row maximum of such a row is
-inf, and it is replaced by 0 before subtracting, because (-inf) - (-inf) is
NaN.

Backward, with p = softmax(x) and upstream gradient dp:
    dx = p * (dp - sum_j dp_j p_j)
and for lse = logsumexp(x) with upstream dlse:
    dx = p * dlse
"""

import numpy as np


def stable_row_max(x, allowed=None):
    """Return the row maximum over allowed entries (..., 1), 0 for empty rows."""
    if allowed is not None:
        x = np.where(allowed, x, -np.inf)
    row_max = np.max(x, axis=-1, keepdims=True)  # (..., 1)
    row_max[~np.isfinite(row_max)] = 0.0
    return row_max


def exp_shifted_inplace(scores, allowed=None):
    """Overwrite scores (..., M) with exp(scores - row max) over allowed entries; return it.

    Disallowed entries are set to -inf first, so exp() turns them into exact
    zeros, and a row with no allowed entry becomes all zeros. Dividing each
    row by its sum gives the softmax.
    """
    if allowed is not None:
        np.copyto(scores, -np.inf, where=~allowed)
    row_max = np.max(scores, axis=-1, keepdims=True)  # (..., 1)
    row_max[~np.isfinite(row_max)] = 0.0  # empty row: avoid (-inf) - (-inf) = NaN
    scores -= row_max
    np.exp(scores, out=scores)  # exponents <= 0 on allowed entries, exp(-inf) = 0 elsewhere
    return scores


def softmax_inplace(scores, allowed=None):
    """Overwrite scores (..., M) with their softmax over the last axis; return it.

    Disallowed entries get probability 0, and a row with no allowed entry
    becomes all zeros. Working in place keeps the peak memory of attention at
    one (N, M) array per batch entry instead of several.
    """
    exp_shifted_inplace(scores, allowed)
    row_sum = np.sum(scores, axis=-1, keepdims=True)  # (..., 1)
    row_sum[row_sum == 0] = 1.0  # an empty row stays 0 instead of 0/0
    scores /= row_sum
    return scores


def softmax_forward(x, allowed=None):
    """Softmax over the last axis of x, restricted to allowed entries.

    Inputs:
    - x: float array (..., M)
    - allowed: optional bool array broadcastable to x.shape; False entries get
      probability 0. A row with no allowed entry gets all zeros.

    Returns (p, cache):
    - p: array like x whose allowed entries in each row sum to 1 (or 0)
    - cache: (p,), all the backward needs
    """
    p = softmax_inplace(np.array(x, copy=True), allowed)  # (..., M)
    return p, (p,)


def softmax_backward(dp, cache):
    """Gradient of softmax_forward: dx = p * (dp - sum_j dp_j p_j).

    The cache holds p; masked entries have p = 0 and so get dx = 0.
    """
    (p,) = cache
    row_dot = np.sum(dp * p, axis=-1, keepdims=True)  # (..., 1)
    return p * (dp - row_dot)


def logsumexp_forward(x, allowed=None):
    """Log-sum-exp over the last axis of x, restricted to allowed entries.

    Returns (lse, cache): lse has shape x.shape[:-1] and is -inf on rows with
    no allowed entry; the cache holds the softmax p, since d lse / dx = p.
    """
    row_max = stable_row_max(x, allowed)  # (..., 1)
    shifted = np.exp(x - row_max)
    if allowed is not None:
        shifted = np.where(allowed, shifted, 0.0)
    row_sum = shifted.sum(axis=-1, keepdims=True)  # (..., 1)
    with np.errstate(divide="ignore"):
        lse = (row_max + np.log(row_sum))[..., 0]  # log 0 = -inf on empty rows
    safe_sum = np.where(row_sum == 0, 1.0, row_sum)
    p = (shifted / safe_sum).astype(x.dtype, copy=False)
    return lse.astype(x.dtype, copy=False), (p,)


def logsumexp_backward(dlse, cache):
    """Gradient of logsumexp_forward: dx = p * dlse[..., None]."""
    (p,) = cache
    return p * dlse[..., None]


def logsumexp(x, allowed=None):
    """Return logsumexp over the last axis (no cache), -inf on empty rows."""
    lse, _ = logsumexp_forward(x, allowed)
    return lse
