"""Scaled dot-product and multi-head attention (Vaswani et al., 2017).

Letters: B batch, H heads, N queries, M keys, D head width, C model width
(C = H * D), R query rows of one block.

Scaled dot-product attention of queries q (..., N, D) on keys k (..., M, D)
and values v (..., M, Dv):

    S = q k^T / sqrt(D) + bias              (..., N, M)
    P = softmax(S) over allowed keys         (..., N, M)
    O = P v                                  (..., N, Dv)

The mask is boolean, True where query i may attend key j. A causal mask is
aligned bottom-right when N != M: query i may attend key j when
j <= i + (M - N), because the queries are the last N positions of the keys
(see ``miniattn.core.masks``). A query row with no allowed key gets a zero
output row and zero gradients.

Backward, given dO (the forward's four lines undone in reverse):

    dV = P^T dO
    dP = dO V^T
    dS = P * (dP - rowsum(dO * O))           rowsum(dO * O) = rowsum(P * dP)
    dq = dS k / sqrt(D),   dk = dS^T q / sqrt(D),   dbias = dS

The code keeps P unnormalised: E = exp(S - row max) and its row sums l, so
P = E / l. Then O = (E V) / l, dV = E^T (dO / l) and
dS = E * ((dO / l) V^T - rowsum(dO * O) / l): every division by l happens
on an (N, Dv) array instead of the (N, M) one. With V1 = [V | 1], the values
with a column of ones appended (M, Dv + 1), one product gives both the
numerator and the row sums, E V1 = [E V | l], and one product gives dS / E,
[dO / l | -rowsum(dO * O) / l] V1^T. Each saves a pass over N x M; V1 is
used only when N > Dv + 1, where that pass costs more than the copy of V.
The query rows are processed in blocks (ROW_BLOCK), so that a block's
slice of S stays in cache through its passes.

Multi-head attention projects x_q (B, N, C) and x_kv (B, M, C) into H heads,
attends in each head, concatenates the heads and projects back:

    Q = x_q W_q + b_q,  K = x_kv W_k + b_k,  V = x_kv W_v + b_v     (B, *, C)
    head_h = Attention(Q_h, K_h, V_h)                               (B, N, D)
    Y = concat_h(head_h) W_o + b_o                                  (B, N, C)

Self-attention passes the same x as x_q and x_kv; encoder self-attention is
bidirectional, decoder self-attention is causal, and encoder-decoder
cross-attention takes queries from the decoder and keys and values from the
encoder output, with a source padding mask and no causal mask.

Complexity: O(N M D) time and O(N M) memory per head, because E is stored
for the backward.
"""

import numpy as np

from .core.masks import CAUSAL_ALIGNMENTS, causal_mask, combine_masks
from .core.softmax import exp_shifted_inplace
from .core.validate import (
    check_attention_inputs,
    check_choice,
    check_float_array,
    check_int,
    check_mask,
    check_real,
    check_upstream,
)


def reduce_to_shape(grad, shape):
    """Sum grad over the axes along which an array of `shape` was broadcast."""
    while grad.ndim > len(shape):
        grad = grad.sum(axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and grad.shape[axis] != 1:
            grad = grad.sum(axis=axis, keepdims=True)
    return grad


def build_allowed(n_queries, n_keys, mask=None, causal=False, causal_alignment="bottom_right"):
    """Return the combined boolean mask (padding/user mask AND causal), or None."""
    causal_part = causal_mask(n_queries, n_keys, causal_alignment) if causal else None
    return combine_masks(mask, causal_part)


# Query rows processed at a time. Each block's slice of the N x M arrays goes
# through all its passes (product, max, subtract, exp) while it is still in cache.
# Forward+backward at N = M = 2048, D = 64, float32 on 2 cores took 24.2 ms
# with blocks of 512 or 1,024 rows and 29.9 ms in one block.
ROW_BLOCK = 512


def row_slices(n_rows, block):
    """Split 0..n_rows-1 into consecutive slices of at most block rows."""
    return [slice(start, min(start + block, n_rows)) for start in range(0, n_rows, block)]


def query_rows(array, rows):
    """Return the query rows `rows` of an array broadcastable to (..., N, M).

    An array without a query axis of its own (fewer than 2 dimensions, or
    size 1 there) applies to every row and is returned as it is.
    """
    if array is None or array.ndim < 2 or array.shape[-2] == 1:
        return array
    return array[..., rows, :]


def attention_forward(
    q,
    k,
    v,
    *,
    mask=None,
    causal=False,
    scale=None,
    bias=None,
    causal_alignment="bottom_right",
    bias_grad=False,
):
    """Scaled dot-product attention softmax(q k^T * scale + bias) v.

    Inputs:
    - q: queries (..., N, D); k: keys (..., M, D); v: values (..., M, Dv)
    - mask: optional bool array broadcastable to (..., N, M), True = may attend
    - causal: also forbid keys in each query's future (bottom-right aligned)
    - scale: score scale, 1/sqrt(D) by default
    - bias: optional float logits added to the scores, broadcastable to (..., N, M)
    - causal_alignment: "bottom_right" (default) or "top_left"
    - bias_grad: make the backward also return the gradient of bias

    Returns (out, cache):
    - out: (..., N, Dv)
    - cache: a dict with q, k, v, the scaled queries, the unnormalised weights
      E = exp(S - row max) (..., N, M) and their row sums l (..., N, 1), out,
      the scale, the bias shape and the combined boolean mask "allowed" (None
      when every key is allowed). attention_probabilities(cache) returns P = E / l.
    """
    check_attention_inputs(q, k, v)
    n_queries, n_keys, width = q.shape[-2], k.shape[-2], q.shape[-1]
    scores_shape = q.shape[:-2] + (n_queries, n_keys)
    if mask is not None:
        check_mask(mask, scores_shape)
    check_choice("causal_alignment", causal_alignment, CAUSAL_ALIGNMENTS)
    if scale is None:
        scale = 1.0 / np.sqrt(width)
    check_real("scale", scale)
    if bias is not None:
        check_float_array("bias", bias)
        if np.broadcast_shapes(bias.shape, scores_shape) != scores_shape:
            raise ValueError(f"bias has shape {bias.shape}; expected a shape broadcastable to {scores_shape}")
    elif bias_grad:
        raise ValueError("bias_grad=True needs a bias array")

    allowed = build_allowed(n_queries, n_keys, mask, causal, causal_alignment)
    # Scaling q (N x D) instead of the scores (N x M) gives the same numbers
    # and saves a pass over N x M.
    q_scaled = q * q.dtype.type(scale)  # (..., N, D)
    k_transposed = np.swapaxes(k, -1, -2)  # (..., D, M)
    # V1 = [V | 1] copies V. The copy pays only when E, with N rows, is larger than
    # V1 with Dv + 1 columns, so it is skipped when each batch entry has one query.
    values_ones = np.concatenate([v, np.ones_like(v[..., :1])], axis=-1) if n_queries > v.shape[-1] + 1 else None
    weights = np.empty(scores_shape, dtype=q.dtype)  # E: (..., N, M)
    row_sums = np.empty(q.shape[:-1] + (1,), dtype=q.dtype)  # l: (..., N, 1)
    out = np.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)  # (..., N, Dv)

    row_block = ROW_BLOCK
    for rows in row_slices(n_queries, row_block):
        block = weights[..., rows, :]  # a view: the block is computed in place in E

        # 1. Scores of these queries against every key.
        np.matmul(q_scaled[..., rows, :], k_transposed, out=block)  # (..., R, D) @ (..., D, M) -> (..., R, M)
        if bias is not None:
            block += query_rows(bias, rows)

        # 2. Unnormalised weights E = exp(S - row max) over the allowed keys.
        exp_shifted_inplace(block, query_rows(allowed, rows))

        # 3. Output P V = (E V) / l, with E V and l = rowsum(E) from one product
        # E V1 when V1 is kept. Dividing the (R, Dv) product by l replaces a
        # division of the (R, M) block.
        if values_ones is not None:
            numerator_sums = block @ values_ones  # (..., R, M) @ (..., M, Dv + 1) -> (..., R, Dv + 1)
            numerator, block_sums = numerator_sums[..., :-1], numerator_sums[..., -1:]  # (..., R, Dv), l: (..., R, 1)
        else:
            numerator = block @ v  # (..., R, M) @ (..., M, Dv) -> (..., R, Dv)
            block_sums = np.sum(block, axis=-1, keepdims=True)  # l: (..., R, 1)
        block_sums[block_sums == 0] = 1.0  # a row with no allowed key keeps E = 0 and O = 0
        row_sums[..., rows, :] = block_sums
        out[..., rows, :] = numerator / block_sums

    cache = {
        "q": q, "k": k, "v": v, "q_scaled": q_scaled, "values_ones": values_ones,
        "weights": weights, "row_sums": row_sums,
        "out": out, "scale": scale, "bias_shape": bias.shape if bias_grad else None, "allowed": allowed,
        "row_block": row_block,
    }
    return out, cache


def attention_probabilities(cache):
    """Return the attention probabilities P = E / l (..., N, M) from an attention_forward cache."""
    return cache["weights"] / cache["row_sums"]


def attention_backward(dout, cache):
    """Backward of attention_forward.

    The cache contains the unnormalised weights E and their row sums l, so
    P = E / l, and nothing is recomputed. The division by l is moved onto
    the (N, Dv) side: with dO' = dO / l and r' = rowsum(dO * O) / l,

        dV = P^T dO = E^T dO',   dS = P * (dP - rowsum(dO * O)) = E * (dO' V^T - r').

    Returns (dq, dk, dv), or (dq, dk, dv, dbias) when the forward was called
    with bias_grad=True. Masked entries have E = 0, so they get no gradient,
    and fully masked rows get zero gradients.
    """
    weights, row_sums, out = cache["weights"], cache["row_sums"], cache["out"]
    check_upstream("dout", dout, out.shape)
    q, k, v, q_scaled = cache["q"], cache["k"], cache["v"], cache["q_scaled"]
    scale = q.dtype.type(cache["scale"])
    dout_scaled = dout / row_sums  # dO': (..., N, Dv)
    row_dot = np.sum(dout * out, axis=-1, keepdims=True) / row_sums  # r': (..., N, 1)
    values_ones = cache["values_ones"]
    if values_ones is not None:
        # [dO' | -r'] V1^T = dO' V^T - r' 1^T: the subtraction comes out of the product.
        left = np.concatenate([dout_scaled, -row_dot], axis=-1)  # (..., N, Dv + 1)
        right = np.swapaxes(values_ones, -1, -2)  # V1^T: (..., Dv + 1, M)
    else:
        left, right = dout_scaled, np.swapaxes(v, -1, -2)  # (..., N, Dv), (..., Dv, M)

    # 3. out = (E V) / l: dV = E^T dO', one product over all rows.
    dv = np.swapaxes(weights, -1, -2) @ dout_scaled  # (..., M, N) @ (..., N, Dv) -> (..., M, Dv)

    dq = np.empty_like(q)
    dk = None
    if cache["bias_shape"] is not None:
        dscores = np.empty_like(weights)  # every block of dS is kept for dbias
    else:
        dscores = np.empty(weights.shape[:-2] + (min(cache["row_block"], q.shape[-2]), k.shape[-2]), dtype=q.dtype)
    for rows in row_slices(q.shape[-2], cache["row_block"]):
        size = rows.stop - rows.start
        block = dscores[..., rows, :] if cache["bias_shape"] is not None else dscores[..., :size, :]

        # 2. dS = E * (dO' V^T - r') = E * ([dO' | -r'] V1^T), in place in the block.
        np.matmul(left[..., rows, :], right, out=block)  # (..., R, Dv [+ 1]) @ (..., Dv [+ 1], M) -> (..., R, M)
        if values_ones is None:
            block -= row_dot[..., rows, :]
        block *= weights[..., rows, :]

        # 1. S = q k^T * scale + bias: dq = dS k scale, dk = dS^T q scale (summed over blocks).
        np.matmul(block, k, out=dq[..., rows, :])  # (..., R, M) @ (..., M, D) -> (..., R, D)
        dq[..., rows, :] *= scale  # scaling the (R, D) result instead of k saves a copy of k
        dk_block = np.swapaxes(block, -1, -2) @ q_scaled[..., rows, :]  # (..., M, R) @ (..., R, D) -> (..., M, D)
        if dk is None:
            dk = dk_block
        else:
            dk += dk_block

    if cache["bias_shape"] is not None:
        return dq, dk, dv, reduce_to_shape(dscores, cache["bias_shape"])
    return dq, dk, dv


# --- multi-head attention -----------------------------------------------------


def init_mha_params(model_width, n_heads, rng, *, dtype=np.float64, kv_width=None):
    """Draw W_q, W_k, W_v, W_o (Glorot-uniform) and zero biases for multi-head attention.

    kv_width is the width of x_kv when it differs from model_width (cross-attention
    from an encoder of another width).
    """
    check_int("model_width", model_width, minimum=1)
    check_int("n_heads", n_heads, minimum=1)
    if model_width % n_heads:
        raise ValueError(
            f"model_width={model_width} is not divisible by n_heads={n_heads}; "
            f"expected model_width = n_heads * head_width"
        )
    kv_width = model_width if kv_width is None else kv_width

    def glorot(fan_in, fan_out):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(dtype)

    return {
        "W_q": glorot(model_width, model_width),
        "b_q": np.zeros(model_width, dtype=dtype),
        "W_k": glorot(kv_width, model_width),
        "b_k": np.zeros(model_width, dtype=dtype),
        "W_v": glorot(kv_width, model_width),
        "b_v": np.zeros(model_width, dtype=dtype),
        "W_o": glorot(model_width, model_width),
        "b_o": np.zeros(model_width, dtype=dtype),
    }


MHA_PARAM_NAMES = ("W_q", "b_q", "W_k", "b_k", "W_v", "b_v", "W_o", "b_o")


def split_heads(x, n_heads):
    """(B, N, C) -> (B, H, N, D)."""
    batch, length, width = x.shape
    return x.reshape(batch, length, n_heads, width // n_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, N, D) -> (B, N, C)."""
    batch, heads, length, width = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, length, heads * width)


def mha_forward(x_q, x_kv, params, *, n_heads, mask=None, causal=False, attention=None):
    """Multi-head attention of x_q (B, N, C) over x_kv (B, M, C_kv).

    Inputs:
    - params: dict with W_q (C, C), b_q (C,), W_k (C_kv, C), b_k, W_v (C_kv, C),
      b_v, W_o (C, C), b_o, as made by init_mha_params
    - n_heads: H; C must be divisible by H
    - mask: optional bool mask broadcastable to (B, H, N, M), e.g. padding_mask()
    - causal: decoder self-attention (bottom-right aligned when N != M)
    - attention: an attention method object with forward(q, k, v, mask=, causal=)
      and backward(dout, cache); dense scaled dot-product attention by default

    Returns (y, cache) with y (B, N, C).
    """
    check_float_array("x_q", x_q, min_ndim=3)
    check_float_array("x_kv", x_kv, min_ndim=3)
    if x_q.ndim != 3 or x_kv.ndim != 3:
        raise ValueError(f"x_q and x_kv must be (B, N, C), got {x_q.shape} and {x_kv.shape}")
    if x_q.shape[0] != x_kv.shape[0]:
        raise ValueError(f"x_q has batch {x_q.shape[0]} but x_kv has batch {x_kv.shape[0]}")
    missing = [name for name in MHA_PARAM_NAMES if name not in params]
    if missing:
        raise ValueError(f"params is missing {missing}; expected keys {list(MHA_PARAM_NAMES)}")
    check_int("n_heads", n_heads, minimum=1)
    width = params["W_q"].shape[1]
    if width % n_heads:
        raise ValueError(f"model width {width} is not divisible by n_heads={n_heads}")
    if params["W_q"].shape[0] != x_q.shape[-1]:
        raise ValueError(f"W_q has shape {params['W_q'].shape}; expected ({x_q.shape[-1]}, C) for x_q {x_q.shape}")
    if params["W_k"].shape[0] != x_kv.shape[-1] or params["W_v"].shape[0] != x_kv.shape[-1]:
        raise ValueError(
            f"W_k {params['W_k'].shape} and W_v {params['W_v'].shape} must have "
            f"{x_kv.shape[-1]} rows to match x_kv {x_kv.shape}"
        )
    attention = DenseAttention() if attention is None else attention

    # 1. Project into queries, keys and values, and split the heads.
    q = split_heads(x_q @ params["W_q"] + params["b_q"], n_heads)  # (B, H, N, D)
    k = split_heads(x_kv @ params["W_k"] + params["b_k"], n_heads)  # (B, H, M, D)
    v = split_heads(x_kv @ params["W_v"] + params["b_v"], n_heads)  # (B, H, M, D)

    # 2. Attend in every head.
    heads, attention_cache = attention.forward(q, k, v, mask=mask, causal=causal)  # (B, H, N, D)

    # 3. Concatenate the heads and project out.
    merged = merge_heads(heads)  # (B, N, C)
    y = merged @ params["W_o"] + params["b_o"]  # (B, N, C)

    cache = (x_q, x_kv, params, n_heads, attention, attention_cache, merged)
    return y, cache


def mha_backward(dy, cache):
    """Backward of mha_forward.

    Returns (dx_q, dx_kv, dparams). For self-attention, where x_q and x_kv are
    the same array, the caller adds dx_q and dx_kv (the input forks).
    """
    x_q, x_kv, params, n_heads, attention, attention_cache, merged = cache
    check_upstream("dy", dy, x_q.shape[:-1] + params["W_o"].shape[-1:])
    dparams = {}

    # 3. y = merged @ W_o + b_o
    dparams["W_o"] = merged.reshape(-1, merged.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])
    dparams["b_o"] = dy.sum(axis=(0, 1))
    dheads = split_heads(dy @ params["W_o"].T, n_heads)  # (B, H, N, D)

    # 2. heads = attention(q, k, v)
    dq, dk, dv = attention.backward(dheads, attention_cache)[:3]
    dq, dk, dv = merge_heads(dq), merge_heads(dk), merge_heads(dv)  # (B, *, C)

    # 1. q = x_q W_q + b_q; k and v both read x_kv (a fork: their gradients add).
    flat_q = x_q.reshape(-1, x_q.shape[-1])
    flat_kv = x_kv.reshape(-1, x_kv.shape[-1])
    dparams["W_q"] = flat_q.T @ dq.reshape(-1, dq.shape[-1])
    dparams["b_q"] = dq.sum(axis=(0, 1))
    dparams["W_k"] = flat_kv.T @ dk.reshape(-1, dk.shape[-1])
    dparams["b_k"] = dk.sum(axis=(0, 1))
    dparams["W_v"] = flat_kv.T @ dv.reshape(-1, dv.shape[-1])
    dparams["b_v"] = dv.sum(axis=(0, 1))
    dx_q = dq @ params["W_q"].T
    dx_kv = dk @ params["W_k"].T
    dx_kv += dv @ params["W_v"].T
    return dx_q, dx_kv, dparams


# --- positions ----------------------------------------------------------------


def sinusoidal_positions(length, width, *, dtype=np.float64):
    """Return the sinusoidal position encoding (length, width), interleaved as in the paper.

    PE[pos, 2i] = sin(pos / 10000^(2i / width)),  PE[pos, 2i + 1] = cos(pos / 10000^(2i / width))
    """
    check_int("length", length, minimum=0)
    check_int("width", width, minimum=2)
    if width % 2:
        raise ValueError(f"width={width} is invalid; the sinusoidal encoding needs an even width")
    positions = np.arange(length, dtype=np.float64)[:, None]  # (L, 1)
    inverse_frequency = 1.0 / 10000.0 ** (np.arange(0, width, 2) / width)  # (width / 2,)
    angles = positions * inverse_frequency  # (L, width / 2)
    encoding = np.empty((length, width))
    encoding[:, 0::2] = np.sin(angles)
    encoding[:, 1::2] = np.cos(angles)
    return encoding.astype(dtype)


# --- the method object ------------------------------------------------------------


class DenseAttention:
    """Exact scaled dot-product attention as an attention method object.

    Every method in miniattn offers the same three calls, so that
    MultiHeadAttention, the benchmark and the tour can run any of them:
    forward(q, k, v, mask=None, causal=False) -> (out, cache),
    backward(dout, cache) -> (dq, dk, dv), and keys_seen(cache), the boolean
    (..., N, M) set of keys each query attended (None means all keys).
    """

    name = "transformer"

    def __init__(self, *, scale=None, causal_alignment="bottom_right"):
        self.scale = scale
        self.causal_alignment = causal_alignment

    def forward(self, q, k, v, *, mask=None, causal=False):
        return attention_forward(
            q, k, v, mask=mask, causal=causal, scale=self.scale, causal_alignment=self.causal_alignment
        )

    def backward(self, dout, cache):
        return attention_backward(dout, cache)

    def keys_seen(self, cache):
        return cache["allowed"]


def make_method(rng=None, **options):
    """Return DenseAttention with the given options (rng is unused: nothing is random)."""
    return DenseAttention(**options)
