"""Blockwise Parallel Transformer layer (Liu and Abbeel, 2023).

Letters: B batch, H heads, N positions, D head width, C model width
(C = H D), F feed-forward width, Bq query block length.

Idea. A Transformer layer is attention followed by a position-wise
feed-forward network. Both can run one query block at a time: the block's
queries attend every key with the online softmax (never an (N, N) score
matrix), and the block's attention output goes straight through the output
projection, the residual and the feed-forward network, so the (N, F) hidden
activation of the feed-forward network never exists for all positions at
once either. Ring Attention runs exactly this per-block computation on each
worker.

The layer, for query block i (rows of x):

    Q, K, V = x W_q + b_q, x W_k + b_k, x W_v + b_v        (B, H, N, D), all positions
    A_i     = blockwise attention(Q_i, K, V)                 (B, H, Bq, D)
    h_i     = x_i + concat_heads(A_i) W_o + b_o              (B, Bq, C)
    y_i     = h_i + FF(h_i),  FF(h) = act(h W_1 + b_1) W_2 + b_2

It equals the dense layer exactly: blocks change only the order of sums.

Backward, per query block in reverse: the feed-forward network is recomputed
from the saved h_i, attention is recomputed from the saved log-sum-exp, and
the gradients of K and V add up over the query blocks.

Complexity: O(N^2 C + N C F) time like the dense layer; memory O(N C) for
the saved activations plus one (Bq, Bk) score tile per head and one (Bq, F)
hidden block, instead of O(H N^2 + N F).
"""

import numpy as np

from .core.online_softmax import (
    DEFAULT_BLOCK_SIZE,
    BlockMask,
    output_delta,
    partial_attention_backward,
    partial_attention_forward,
    tile_ranges,
)
from .core.validate import check_int, check_layer_inputs
from .nn.functional import ACTIVATIONS, feed_forward_backward, feed_forward_forward, linear_backward, linear_forward
from .transformer import MHA_PARAM_NAMES, merge_heads, split_heads

FF_PARAM_NAMES = ("W_1", "b_1", "W_2", "b_2")
LAYER_PARAM_NAMES = MHA_PARAM_NAMES + FF_PARAM_NAMES


def init_layer_params(model_width, n_heads, ff_width, rng, *, dtype=np.float64):
    """Draw the attention and feed-forward parameters of one layer (Glorot-uniform weights).

    Biases are small random values rather than zeros, so that a gradient
    check also exercises them.
    """
    check_int("model_width", model_width, minimum=1)
    check_int("n_heads", n_heads, minimum=1)
    check_int("ff_width", ff_width, minimum=1)
    if model_width % n_heads:
        raise ValueError(f"model_width={model_width} is not divisible by n_heads={n_heads}")

    def glorot(fan_in, fan_out):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(dtype)

    params = {}
    for name in ("q", "k", "v", "o"):
        params[f"W_{name}"] = glorot(model_width, model_width)
        params[f"b_{name}"] = (0.1 * rng.standard_normal(model_width)).astype(dtype)
    params["W_1"] = glorot(model_width, ff_width)
    params["b_1"] = (0.1 * rng.standard_normal(ff_width)).astype(dtype)
    params["W_2"] = glorot(ff_width, model_width)
    params["b_2"] = (0.1 * rng.standard_normal(model_width)).astype(dtype)
    return params


def blockwise_transformer_forward(x, params, *, n_heads, causal=False, block_size=DEFAULT_BLOCK_SIZE, activation="relu"):
    """One Transformer layer computed query block by query block.

    Inputs:
    - x: (B, N, C)
    - params: dict with W_q, b_q, W_k, b_k, W_v, b_v, W_o, b_o (as for
      multi-head attention) and W_1 (C, F), b_1 (F,), W_2 (F, C), b_2 (C,)
    - n_heads: H, C must be divisible by H
    - causal: self-attention with a causal mask
    - block_size: Bq, the query block length and the key tile length (>= 1)
    - activation: "relu" or "gelu"

    Returns (y, cache): y (B, N, C); the cache holds x, the parameters,
    Q, K, V, the attention output A (B, H, N, D), its lse (B, H, N) and the
    residual stream h (B, N, C), all O(N C).
    """
    check_layer_inputs(x, params, LAYER_PARAM_NAMES, n_heads)
    check_int("block_size", block_size, minimum=1)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is invalid; expected one of {', '.join(ACTIVATIONS)}")
    width = x.shape[-1]
    length = x.shape[1]
    scale = 1.0 / np.sqrt(width // n_heads)

    # 1. Queries, keys and values of every position.
    q = split_heads(linear_forward(x, params["W_q"], params["b_q"])[0], n_heads)  # (B, H, N, D)
    k = split_heads(linear_forward(x, params["W_k"], params["b_k"])[0], n_heads)  # (B, H, N, D)
    v = split_heads(linear_forward(x, params["W_v"], params["b_v"])[0], n_heads)  # (B, H, N, D)

    attention = np.zeros_like(q)  # A: (B, H, N, D)
    lse = np.zeros(q.shape[:-1], dtype=x.dtype)  # (B, H, N)
    residual = np.zeros_like(x)  # h: (B, N, C)
    y = np.zeros_like(x)  # (B, N, C)
    for rows in tile_ranges(length, block_size):
        # 2. Blockwise attention of this query block over all keys.
        block_mask = query_block_mask(rows, length, causal)
        attention[..., rows, :], lse[..., rows] = partial_attention_forward(
            q[..., rows, :], k, v, block_mask, scale=scale, query_block=block_size, key_block=block_size
        )

        # 3. Output projection and residual for these rows only.
        projected, _ = linear_forward(merge_heads(attention[..., rows, :]), params["W_o"], params["b_o"])  # (B, Bq, C)
        residual[:, rows] = x[:, rows] + projected

        # 4. Feed-forward network and residual on the block: the (B, Bq, F) hidden block is freed after it.
        ff_out, _ = feed_forward_forward(
            residual[:, rows], params["W_1"], params["b_1"], params["W_2"], params["b_2"], activation
        )
        y[:, rows] = residual[:, rows] + ff_out

    cache = (x, params, n_heads, causal, block_size, activation, scale, q, k, v, attention, lse, residual)
    return y, cache


def query_block_mask(rows, length, causal):
    """Return the BlockMask of query rows `rows` over all `length` keys of self-attention."""
    return BlockMask(np.arange(length)[rows], np.arange(length), causal_offset=0 if causal else None)


def blockwise_transformer_backward(dy, cache):
    """Backward of blockwise_transformer_forward: returns (dx, dparams).

    Per query block the feed-forward network is recomputed from the saved
    residual stream h and attention from the saved lse; nothing of size
    (N, N) or (N, F) is stored.
    """
    x, params, n_heads, causal, block_size, activation, scale, q, k, v, attention, lse, residual = cache
    length = x.shape[1]
    dparams = {name: np.zeros_like(params[name]) for name in LAYER_PARAM_NAMES}
    dx = np.zeros_like(x)  # (B, N, C)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)  # (B, H, N, D)

    for rows in tile_ranges(length, block_size):
        # 4. y_i = h_i + FF(h_i): recompute FF on the block. h_i forks, so its gradients add.
        _, ff_cache = feed_forward_forward(
            residual[:, rows], params["W_1"], params["b_1"], params["W_2"], params["b_2"], activation
        )
        dresidual, dw1, db1, dw2, db2 = feed_forward_backward(dy[:, rows], ff_cache)
        dresidual += dy[:, rows]  # (B, Bq, C)
        for name, grad in zip(FF_PARAM_NAMES, (dw1, db1, dw2, db2)):
            dparams[name] += grad

        # 3. h_i = x_i + concat_heads(A_i) W_o + b_o
        dx[:, rows] += dresidual
        _, out_cache = linear_forward(merge_heads(attention[..., rows, :]), params["W_o"], params["b_o"])
        dmerged, dw_o, db_o = linear_backward(dresidual, out_cache)
        dparams["W_o"] += dw_o
        dparams["b_o"] += db_o
        dattention = split_heads(dmerged, n_heads)  # (B, H, Bq, D)

        # 2. A_i = blockwise attention(Q_i, K, V), recomputed from the saved lse.
        delta = output_delta(dattention, attention[..., rows, :])  # (B, H, Bq)
        dq_block, dk_part, dv_part = partial_attention_backward(
            dattention, q[..., rows, :], k, v, lse[..., rows], delta, query_block_mask(rows, length, causal),
            scale=scale, query_block=block_size, key_block=block_size,
        )
        dq[..., rows, :] = dq_block
        dk += dk_part
        dv += dv_part

    # 1. Q, K, V = x W + b: x feeds three projections and the residual, so dx accumulates (a fork).
    for name, grad in (("q", dq), ("k", dk), ("v", dv)):
        _, projection_cache = linear_forward(x, params[f"W_{name}"], params[f"b_{name}"])
        dx_part, dweight, dbias = linear_backward(merge_heads(grad), projection_cache)
        dx += dx_part
        dparams[f"W_{name}"] += dweight
        dparams[f"b_{name}"] += dbias
    return dx, dparams
