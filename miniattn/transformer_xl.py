"""Transformer-XL (Dai et al., 2019): segment recurrence and relative positional attention.

Letters: B batch, H heads, N queries (the current segment), M keys
(memory + segment), Mem = M - N the memory length, D head width, C model
width (C = H * D), P rows of relative position embeddings, F feed-forward
width, T total sequence length, L layers.

Idea. A long sequence is cut into segments of N positions. Each layer keeps
the hidden states it saw last as a memory of at most mem_len positions, and
the next segment attends to [memory ; segment]. The memory is a constant
(stop-gradient), so training never back-propagates into earlier segments,
but a layer can still reach mem_len positions back, and the last position of
a segment reaches at least (N - 1) + L * mem_len positions back through L
layers (exactly that when mem_len is a multiple of N). Absolute positions would give a cached state the
same position as a new one, so the scores use relative distances instead.

Relative positional attention. Query i is at absolute position i + Mem, so
it is (i + Mem) - j positions after key j. With sinusoids R of the distances
and per-head biases u and v (the paper's global content and position
biases):

    q = x W_q,  k = [mem ; x] W_k,  v = [mem ; x] W_v               (B, H, *, D)
    r = R W_r,  R[t] = [sin(d_t f), cos(d_t f)],  f_c = 10000^(-2c / C)
    d_t = M - 1 - t for t = 0 .. P - 1   (descending distances)       (H, P, D)
    AC[i, j] = (q_i + u) . k_j         terms (a) content and (c) content bias
    BD_raw[i, t] = (q_i + v) . r_t                                    (B, H, N, P)
    BD[i, j] = BD_raw[i, j + N - 1 - i]  (the relative shift)
             = (q_i + v) . r at distance (i + Mem) - j
                                       terms (b) position and (d) position bias
    S = (AC + BD) / sqrt(D),  A = softmax of S over keys j <= i + Mem,  O = A v

A clamp length clamps every distance to [-clamp_len, clamp_len]. Causal
attention needs P = M rows (distances M - 1 .. 0). Bidirectional attention
needs P = M + N - 1 rows (distances M - 1 .. -(N - 1)): the same index
j + N - 1 - i then reaches every key.

The relative shift comes in two forms. The pad/reshape form of the paper's
code (pad a zero column on the left, view (N, M + 1) as (M + 1, N), drop the
first row, view as (N, M)) needs P = M and leaves entries of the next row
above the causal diagonal, so it is valid only under the causal mask. The
explicit gather form reads BD_raw[i, j + N - 1 - i] and writes 0 where that
index leaves [0, P). The forward uses the gather form by default
(shift="gather"), for causal and bidirectional attention; shift="pad_reshape"
runs the pad/reshape form instead (causal only) and gives the same result.

Backward (the shift is linear, so its backward is its adjoint):

    dS = A * (dA - rowsum(dO * O)),   dAC = dBD = dS / sqrt(D)
    dBD_raw = shift_adjoint(dBD)       (a scatter-add into BD_raw)
    d(q + u) = dAC k,    dk = dAC^T (q + u),   du = sum_{B, N} d(q + u)
    d(q + v) = dBD_raw r,  dr = sum_B dBD_raw^T (q + v),  dv_bias = sum_{B, N} d(q + v)
    dq = d(q + u) + d(q + v),   dW_r = R^T dr

Segment recurrence. After a segment, layer l's memory becomes the last
mem_len positions of [memory ; input of layer l] up to end = Mem + N - ext_len
(the ext_len last positions are left out). The keys and values of the memory
are computed with W_k and W_v, so those weights get gradients from the memory
rows although the memory itself gets none.

Complexity per layer and segment: O(N M D) time per head and O(N (M + P))
memory for the scores. The memory cache stores O(L mem_len C) numbers.
"""

from dataclasses import dataclass

import numpy as np

from .core.kernels import scatter_add_rows
from .core.masks import causal_mask, combine_masks
from .core.softmax import softmax_inplace
from .core.validate import (
    check_attention_inputs,
    check_choice,
    check_float_array,
    check_generator,
    check_int,
    check_mask,
    check_real,
    check_same_dtype,
    check_upstream,
)
from .nn.functional import (
    dropout_backward,
    dropout_forward,
    feed_forward_backward,
    feed_forward_forward,
    layer_norm_backward,
    layer_norm_forward,
    linear_backward,
    linear_forward,
)
from .transformer import merge_heads, reduce_to_shape, split_heads

SHIFTS = ("gather", "pad_reshape")
NORM_PLACEMENTS = ("post", "pre")


# --- relative positions ---------------------------------------------------------------


def relative_distances(n_queries, n_keys, *, causal=True, clamp_len=None):
    """Return the descending distances d_t (P,) that the rows of R encode.

    Causal: M - 1, ..., 0 (P = M). Bidirectional: M - 1, ..., -(N - 1)
    (P = M + N - 1). clamp_len clamps each distance to [-clamp_len, clamp_len].
    """
    check_int("n_queries", n_queries, minimum=1)
    check_int("n_keys", n_keys, minimum=n_queries)
    lowest = 0 if causal else -(n_queries - 1)
    distances = np.arange(n_keys - 1, lowest - 1, -1)  # (P,)
    if clamp_len is not None:
        check_int("clamp_len", clamp_len, minimum=0)
        distances = np.clip(distances, -clamp_len, clamp_len)
    return distances


def sinusoid_embeddings(distances, width, *, dtype=np.float64):
    """Return [sin(d f), cos(d f)] (P, width) for distances d (P,), f_c = 10000^(-2c / width).

    The sines fill the first half of each row and the cosines the second, as in
    the Transformer-XL code (not interleaved as in the 2017 Transformer).
    """
    check_int("width", width, minimum=2)
    if width % 2:
        raise ValueError(f"width={width} is invalid; the sinusoid embedding needs an even width")
    inverse_frequency = 1.0 / 10000.0 ** (np.arange(0, width, 2) / width)  # (width / 2,)
    angles = np.asarray(distances, dtype=np.float64)[:, None] * inverse_frequency  # (P, width / 2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(dtype)  # (P, width)


def relative_positions(n_queries, n_keys, width, *, causal=True, clamp_len=None, dtype=np.float64):
    """Return R (P, width), the sinusoids of the distances from relative_distances()."""
    distances = relative_distances(n_queries, n_keys, causal=causal, clamp_len=clamp_len)
    return sinusoid_embeddings(distances, width, dtype=dtype)


def n_position_rows(n_queries, n_keys, causal):
    """Return P, the rows of R that relative attention needs: M causal, M + N - 1 otherwise."""
    return n_keys if causal else n_keys + n_queries - 1


# --- the relative shift -------------------------------------------------------------------


def rel_shift(x):
    """Shift BD_raw (..., N, M) into BD (..., N, M) by padding and reshaping (causal only).

    Pad one zero column on the left, view the (N, M + 1) rows as (M + 1, N),
    drop the first row and view the rest as (N, M). The result equals
    x[i, j + N - 1 - i] for j <= i + M - N and is 0 at j = i + M - N + 1;
    further right it contains entries of row i + 1, which the causal mask removes.
    """
    *lead, n_queries, n_keys = x.shape
    if n_keys < n_queries:
        raise ValueError(f"rel_shift needs M >= N, got x of shape {x.shape}")
    padded = np.concatenate([np.zeros((*lead, n_queries, 1), dtype=x.dtype), x], axis=-1)  # (..., N, M + 1)
    padded = padded.reshape(*lead, n_keys + 1, n_queries)  # (..., M + 1, N)
    return padded[..., 1:, :].reshape(*lead, n_queries, n_keys)  # (..., N, M)


def rel_shift_adjoint(g):
    """Adjoint of rel_shift: <rel_shift(x), g> = <x, rel_shift_adjoint(g)> for every x, g.

    Undo the steps in reverse: flatten g row-major, put back the dropped first
    row as N zeros, view as (N, M + 1) and drop the padded column.
    """
    *lead, n_queries, n_keys = g.shape
    flat = g.reshape(*lead, n_queries * n_keys)  # (..., N M)
    flat = np.concatenate([np.zeros((*lead, n_queries), dtype=g.dtype), flat], axis=-1)  # (..., N (M + 1))
    return flat.reshape(*lead, n_queries, n_keys + 1)[..., 1:]  # (..., N, M)


def rel_shift_index(n_queries, n_keys, n_positions):
    """Return the flat source index (N * M,) of the gather form of the shift.

    Entry (i, j) of BD reads entry (i, j + N - 1 - i) of BD_raw (..., N, P),
    flattened as i * P + j + N - 1 - i. Where j + N - 1 - i falls outside
    [0, P) it reads index N * P instead, one zero appended after the last entry.
    """
    rows = np.arange(n_queries)[:, None]  # (N, 1)
    cols = np.arange(n_keys)[None, :]  # (1, M)
    column = cols + (n_queries - 1) - rows  # (N, M)
    valid = (column >= 0) & (column < n_positions)  # (N, M)
    return np.where(valid, rows * n_positions + column, n_queries * n_positions).ravel()  # (N M,)


def rel_shift_gather(x, n_keys):
    """Shift BD_raw (..., N, P) into BD (..., N, M) by an explicit gather.

    BD[i, j] = x[i, j + N - 1 - i] where 0 <= j + N - 1 - i < P, else 0. With
    P = M this is the causal shift (0 above the diagonal j = i + M - N). With
    P = M + N - 1 every (i, j) is covered (bidirectional).
    """
    *lead, n_queries, n_positions = x.shape
    source = rel_shift_index(n_queries, n_keys, n_positions)  # (N M,)
    flat = x.reshape(-1, n_queries * n_positions)  # (B H, N P)
    flat = np.concatenate([flat, np.zeros((flat.shape[0], 1), dtype=x.dtype)], axis=1)  # (B H, N P + 1)
    return np.take(flat, source, axis=1).reshape(*lead, n_queries, n_keys)  # (..., N, M)


def rel_shift_gather_adjoint(g, n_positions, *, backend=None):
    """Adjoint of rel_shift_gather: scatter-add g (..., N, M) back into (..., N, P).

    Each (i, j) adds g[i, j] to the entry it read, and entries that read the
    appended zero are dropped. Runs kernels.scatter_add_rows on the chosen
    backend, with the flat positions as rows and batch and heads as columns.
    """
    *lead, n_queries, n_keys = g.shape
    source = rel_shift_index(n_queries, n_keys, n_positions)  # (N M,)
    columns = np.ascontiguousarray(g.reshape(-1, n_queries * n_keys).T)  # (N M, B H)
    dx = scatter_add_rows(columns, source, n_queries * n_positions + 1, backend=backend)  # (N P + 1, B H)
    return dx[:-1].T.reshape(*lead, n_queries, n_positions)  # (..., N, P)


# --- relative positional attention ------------------------------------------------------------


def relative_mask(n_queries, n_keys, *, causal=True, window=None, mask=None):
    """Return the allowed keys (bool, broadcastable to (..., N, M)), or None for all keys.

    causal: key j is allowed for query i when j <= i + M - N (the queries are the
    last N keys). window: query i also needs j > i + M - N - window, so it attends at
    most `window` keys (the same_length option). mask: an extra mask ANDed in.
    """
    query_pos = np.arange(n_queries)[:, None] + (n_keys - n_queries)  # (N, 1)
    key_pos = np.arange(n_keys)[None, :]  # (1, M)
    causal_part = causal_mask(n_queries, n_keys) if causal else None
    window_part = None
    if window is not None:
        check_int("window", window, minimum=1)
        window_part = key_pos > query_pos - window  # (N, M)
    return combine_masks(mask, causal_part, window_part)


def relative_scores(q, k, r, u, v_bias, *, shift="gather"):
    """Return (AC, BD, BD_raw, q + u, q + v), the unscaled score terms and their left factors.

    AC and BD are (..., H, N, M), BD_raw is (..., H, N, P), q + u and q + v are
    (..., H, N, D). AC = (a) + (c) and BD = (b) + (d) in the four terms that
    score_terms() returns one by one.
    """
    n_keys = k.shape[-2]

    # 1. Content: AC = (q + u) k^T
    q_u = q + u[:, None, :]  # (..., H, N, D)
    content = q_u @ np.swapaxes(k, -1, -2)  # (..., H, N, D) @ (..., H, D, M) -> (..., H, N, M)

    # 2. Position: BD_raw = (q + v) r^T, then shift column t = j + N - 1 - i under key j.
    q_v = q + v_bias[:, None, :]  # (..., H, N, D)
    position_raw = q_v @ np.swapaxes(r, -1, -2)  # (..., H, N, D) @ (H, D, P) -> (..., H, N, P)
    if shift == "gather":
        position = rel_shift_gather(position_raw, n_keys)  # (..., H, N, M)
    else:
        position = rel_shift(position_raw)  # (..., H, N, M)
    return content, position, position_raw, q_u, q_v


def score_terms(q, k, r, u, v_bias):
    """Return the paper's four unscaled score terms as a dict of (..., H, N, M) arrays.

    "a" content q.k, "b" content-position q.r, "c" global content bias u.k,
    "d" global position bias v.r. The position terms are shifted, so key j of
    query i reads r at distance (i + M - N) - j (0 outside the rows of r).
    """
    n_keys = k.shape[-2]
    u_rows = np.broadcast_to(u[:, None, :], q.shape)  # (..., H, N, D), u repeated for every query
    v_rows = np.broadcast_to(v_bias[:, None, :], q.shape)  # (..., H, N, D)
    term_a = q @ np.swapaxes(k, -1, -2)  # (..., H, N, M)
    term_c = u_rows @ np.swapaxes(k, -1, -2)  # (..., H, N, M)
    term_b = rel_shift_gather(q @ np.swapaxes(r, -1, -2), n_keys)  # (..., H, N, P) -> (..., H, N, M)
    term_d = rel_shift_gather(v_rows @ np.swapaxes(r, -1, -2), n_keys)  # (..., H, N, M)
    return {"a": term_a, "b": term_b, "c": term_c, "d": term_d}


def check_relative_inputs(q, k, v, r, u, v_bias, causal, shift):
    """Check shapes and dtypes of relative attention's inputs; return (H, N, M, D, P)."""
    check_attention_inputs(q, k, v)
    if q.ndim < 3:
        raise ValueError(f"q has shape {q.shape}; expected (..., H, N, D) with a heads axis")
    for name, array in (("r", r), ("u", u), ("v_bias", v_bias)):
        check_float_array(name, array, min_ndim=2)
    check_same_dtype(q=q, r=r, u=u, v_bias=v_bias)

    n_heads, n_queries, width = q.shape[-3], q.shape[-2], q.shape[-1]
    n_keys = k.shape[-2]
    if n_keys < n_queries:
        raise ValueError(
            f"k has M={n_keys} keys but q has N={n_queries} queries; the queries are the last N "
            f"of the M keys, so the memory length M - N={n_keys - n_queries} must be >= 0"
        )
    for name, array in (("u", u), ("v_bias", v_bias)):
        if array.shape != (n_heads, width):
            raise ValueError(f"{name} has shape {array.shape}; expected (H, D) = {(n_heads, width)}")

    n_positions = n_position_rows(n_queries, n_keys, causal)
    if r.ndim != 3 or r.shape[0] != n_heads or r.shape[2] != width:
        raise ValueError(f"r has shape {r.shape}; expected (H, P, D) with H={n_heads}, D={width}")
    if r.shape[1] != n_positions:
        kind = "causal attention needs P = M" if causal else "bidirectional attention needs P = M + N - 1"
        raise ValueError(
            f"r has P={r.shape[1]} position rows, which do not cover M={n_keys} keys and N={n_queries} "
            f"queries; {kind} = {n_positions} rows (distances {n_keys - 1} down to "
            f"{0 if causal else -(n_queries - 1)})"
        )

    check_choice("shift", shift, SHIFTS)
    if shift == "pad_reshape" and not causal:
        raise ValueError(
            "shift='pad_reshape' is valid only for causal attention, because it leaves entries of the "
            "next row above the diagonal; use shift='gather' for causal=False"
        )
    return n_heads, n_queries, n_keys, width, n_positions


def relative_attention_forward(q, k, v, r, u, v_bias, *, causal=True, mask=None, window=None, shift="gather"):
    """Relative positional attention softmax((AC + BD) / sqrt(D)) v.

    Inputs:
    - q: queries (..., H, N, D), the last N of the M key positions
    - k, v: keys and values (..., H, M, D), memory first
    - r: projected relative embeddings R W_r per head (H, P, D), rows for the
      descending distances of relative_distances(N, M, causal=causal)
    - u, v_bias: global content and position biases (H, D)
    - causal: allow key j for query i only when j <= i + M - N
    - mask: optional extra bool mask broadcastable to (..., H, N, M)
    - window: optional int, each query attends at most this many keys (same_length)
    - shift: "gather" (default) or "pad_reshape" (causal only)

    Returns (out, cache): out (..., H, N, D); cache holds the inputs of the
    products, the probabilities and the mask.
    """
    n_heads, n_queries, n_keys, width, n_positions = check_relative_inputs(q, k, v, r, u, v_bias, causal, shift)
    if mask is not None:
        check_mask(mask, q.shape[:-1] + (n_keys,))
    if window is not None and not causal:
        raise ValueError(f"window={window} needs causal=True; the window limits how far back a query attends")
    scale = q.dtype.type(1.0 / np.sqrt(width))

    # 1-2. Content term AC and shifted position term BD.
    content, position, _, q_u, q_v = relative_scores(q, k, r, u, v_bias, shift=shift)

    # 3. Scores and probabilities over the allowed keys.
    scores = content + position  # (..., H, N, M)
    scores *= scale
    allowed = relative_mask(n_queries, n_keys, causal=causal, window=window, mask=mask)
    probs = softmax_inplace(scores, allowed)  # (..., H, N, M)

    # 4. Output: probability-weighted sum of the values.
    out = probs @ v  # (..., H, N, M) @ (..., H, M, D) -> (..., H, N, D)

    cache = (k, v, r, q_u, q_v, probs, out, scale, shift, n_positions, allowed)
    return out, cache


def relative_attention_backward(dout, cache):
    """Backward of relative_attention_forward.

    The cache contains k, v, r, q + u, q + v, the probabilities, the output and
    the mask; nothing is recomputed. Returns (dq, dk, dv, dr, du, dv_bias).
    Masked keys have probability 0, so the garbage that the pad/reshape shift
    leaves above the diagonal gets no gradient.
    """
    k, v, r, q_u, q_v, probs, out, scale, shift, n_positions, _ = cache
    check_upstream("dout", dout, out.shape)

    # 4. out = probs @ v
    dv = np.swapaxes(probs, -1, -2) @ dout  # (..., H, M, N) @ (..., H, N, D) -> (..., H, M, D)
    dscores = dout @ np.swapaxes(v, -1, -2)  # dP: (..., H, N, D) @ (..., H, D, M) -> (..., H, N, M)

    # 3. probs = softmax(scale * (content + position)): one gradient for both terms.
    dscores -= np.sum(dout * out, axis=-1, keepdims=True)
    dscores *= probs
    dscores *= scale  # d content = d position, (..., H, N, M)

    # 2. position = shift(q_v @ r^T): the shift's adjoint, then the product.
    if shift == "gather":
        dposition_raw = rel_shift_gather_adjoint(dscores, n_positions)  # (..., H, N, P)
    else:
        dposition_raw = rel_shift_adjoint(dscores)  # (..., H, N, P)
    dq_v = dposition_raw @ r  # (..., H, N, P) @ (H, P, D) -> (..., H, N, D)
    dr = reduce_to_shape(np.swapaxes(dposition_raw, -1, -2) @ q_v, r.shape)  # (H, P, D), r is shared over batch
    dv_bias = dq_v.reshape(-1, *dq_v.shape[-3:]).sum(axis=(0, 2))  # (H, D): summed over batch and queries

    # 1. content = q_u @ k^T
    dq_u = dscores @ k  # (..., H, N, M) @ (..., H, M, D) -> (..., H, N, D)
    dk = np.swapaxes(dscores, -1, -2) @ q_u  # (..., H, M, N) @ (..., H, N, D) -> (..., H, M, D)
    du = dq_u.reshape(-1, *dq_u.shape[-3:]).sum(axis=(0, 2))  # (H, D)

    # q feeds both q + u and q + v (a fork): the gradients add.
    dq = dq_u + dq_v
    return dq, dk, dv, dr, du, dv_bias


def xl_attention_forward(q, k, v, w_r, u, v_bias, *, causal=True, clamp_len=None, mask=None, window=None, shift="gather"):
    """Relative attention with the positions built here: R from the distances, r = R W_r.

    Inputs as relative_attention_forward, with w_r (C_r, H * D) in place of r;
    C_r is the width of the sinusoids R (even). Returns (out, cache), out (..., H, N, D).
    """
    check_float_array("w_r", w_r, min_ndim=2)
    if q.ndim < 3:
        raise ValueError(f"q has shape {q.shape}; expected (..., H, N, D) with a heads axis")
    n_heads, n_queries, width = q.shape[-3], q.shape[-2], q.shape[-1]
    n_keys = k.shape[-2]
    if w_r.ndim != 2 or w_r.shape[1] != n_heads * width:
        raise ValueError(f"w_r has shape {w_r.shape}; expected (C_r, H * D) with H * D = {n_heads * width}")
    if n_keys < n_queries:
        raise ValueError(
            f"k has M={n_keys} keys but q has N={n_queries} queries; the memory length "
            f"M - N={n_keys - n_queries} must be >= 0"
        )

    # 1. Sinusoids of the descending distances, projected and split into heads.
    positions = relative_positions(
        n_queries, n_keys, w_r.shape[0], causal=causal, clamp_len=clamp_len, dtype=q.dtype
    )  # (P, C_r)
    r_flat, r_cache = linear_forward(positions, w_r)  # (P, C_r) @ (C_r, H D) -> (P, H D)
    r = r_flat.reshape(-1, n_heads, width).transpose(1, 0, 2)  # (H, P, D)

    # 2. Relative attention.
    out, attention_cache = relative_attention_forward(
        q, k, v, r, u, v_bias, causal=causal, mask=mask, window=window, shift=shift
    )
    return out, (attention_cache, r_cache)


def xl_attention_backward(dout, cache):
    """Backward of xl_attention_forward. Returns (dq, dk, dv, dw_r, du, dv_bias)."""
    attention_cache, r_cache = cache

    # 2. Relative attention.
    dq, dk, dv, dr, du, dv_bias = relative_attention_backward(dout, attention_cache)

    # 1. r = split_heads(R W_r); R is a constant.
    dr_flat = dr.transpose(1, 0, 2).reshape(dr.shape[1], -1)  # (P, H D)
    _, dw_r, _ = linear_backward(dr_flat, r_cache)
    return dq, dk, dv, dw_r, du, dv_bias


# --- the recurrent layer ----------------------------------------------------------------------


@dataclass(frozen=True)
class XLConfig:
    """Options of the recurrent decoder, shared by all layers.

    - n_heads: H; the model width C must be divisible by H
    - mem_len: positions of memory kept per layer after each segment (>= 0)
    - ext_len: trailing positions of a segment left out of the memory (>= 0)
    - clamp_len: clamp relative distances to at most this (None: no clamp)
    - same_length: each query attends at most mem_len keys (needs mem_len >= 1)
    - norm: "post" (LayerNorm after each residual sum, the paper's default) or
      "pre" (LayerNorm before attention and feed-forward; the memory is
      normalised again with the segment)
    - dropout: probability on the attention and feed-forward outputs
    - activation: "relu" or "gelu" in the feed-forward
    - shift: "gather" or "pad_reshape", the form of the relative shift
    """

    n_heads: int
    mem_len: int
    ext_len: int = 0
    clamp_len: int = None
    same_length: bool = False
    norm: str = "post"
    dropout: float = 0.0
    activation: str = "relu"
    shift: str = "gather"

    def __post_init__(self):
        check_int("n_heads", self.n_heads, minimum=1)
        check_int("mem_len", self.mem_len, minimum=0)
        check_int("ext_len", self.ext_len, minimum=0)
        if self.clamp_len is not None:
            check_int("clamp_len", self.clamp_len, minimum=0)
        if self.same_length and self.mem_len < 1:
            raise ValueError(f"same_length=True needs mem_len >= 1, got mem_len={self.mem_len}")
        check_choice("norm", self.norm, NORM_PLACEMENTS)
        check_real("dropout", self.dropout, minimum=0.0, maximum=1.0)
        check_choice("shift", self.shift, SHIFTS)


LAYER_PARAM_NAMES = (
    "W_q", "W_k", "W_v", "W_r", "W_o", "u", "v",
    "norm1_gamma", "norm1_beta", "W_1", "b_1", "W_2", "b_2", "norm2_gamma", "norm2_beta",
)


def init_layer_params(model_width, n_heads, inner_width, rng, *, dtype=np.float64):
    """Draw one layer's parameters: Glorot-uniform weights, u and v ~ N(0, 0.02^2), unit norms.

    Projections have no bias, as in the Transformer-XL code. u and v are kept
    per layer (the reference code can also share them across layers).
    """
    check_int("model_width", model_width, minimum=2)
    check_int("n_heads", n_heads, minimum=1)
    check_int("inner_width", inner_width, minimum=1)
    check_generator("rng", rng)
    if model_width % n_heads:
        raise ValueError(f"model_width={model_width} is not divisible by n_heads={n_heads}")
    head_width = model_width // n_heads

    def glorot(fan_in, fan_out):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(dtype)

    return {
        "W_q": glorot(model_width, model_width),
        "W_k": glorot(model_width, model_width),
        "W_v": glorot(model_width, model_width),
        "W_r": glorot(model_width, model_width),
        "W_o": glorot(model_width, model_width),
        "u": (0.02 * rng.standard_normal((n_heads, head_width))).astype(dtype),
        "v": (0.02 * rng.standard_normal((n_heads, head_width))).astype(dtype),
        "norm1_gamma": np.ones(model_width, dtype=dtype),
        "norm1_beta": np.zeros(model_width, dtype=dtype),
        "W_1": glorot(model_width, inner_width),
        "b_1": np.zeros(inner_width, dtype=dtype),
        "W_2": glorot(inner_width, model_width),
        "b_2": np.zeros(model_width, dtype=dtype),
        "norm2_gamma": np.ones(model_width, dtype=dtype),
        "norm2_beta": np.zeros(model_width, dtype=dtype),
    }


def check_layer_inputs(h, mem, params, config):
    """Check the segment h (B, N, C), the memory (B, Mem, C) and the parameter names."""
    check_float_array("h", h, min_ndim=3)
    check_float_array("mem", mem, min_ndim=3)
    if h.ndim != 3:
        raise ValueError(f"h has shape {h.shape}; expected (B, N, C)")
    if mem.ndim != 3 or mem.shape[0] != h.shape[0] or mem.shape[2] != h.shape[2]:
        raise ValueError(
            f"mem has shape {mem.shape}; expected (B, Mem, C) = ({h.shape[0]}, Mem, {h.shape[2]}) "
            f"to match the segment h {h.shape}"
        )
    check_same_dtype(h=h, mem=mem)
    missing = [name for name in LAYER_PARAM_NAMES if name not in params]
    if missing:
        raise ValueError(f"params is missing {missing}; expected the keys of init_layer_params()")
    if h.shape[2] % config.n_heads:
        raise ValueError(f"model width {h.shape[2]} is not divisible by n_heads={config.n_heads}")


def layer_forward(h, mem, params, config, *, mask=None, rng=None):
    """Apply one Transformer-XL decoder layer to a segment h with the layer's memory.

    Inputs:
    - h: the segment's input to this layer (B, N, C)
    - mem: this layer's memory (B, Mem, C), a constant; Mem may be 0
    - params: dict as made by init_layer_params
    - config: XLConfig
    - mask: optional extra bool mask broadcastable to (B, H, N, Mem + N)
    - rng: numpy.random.Generator for dropout (needed when config.dropout > 0)

    Returns (out, cache), out (B, N, C).
    """
    check_layer_inputs(h, mem, params, config)
    n_heads, pre_norm = config.n_heads, config.norm == "pre"
    mem_length = mem.shape[1]

    # 1. Keys and values read [memory ; segment]; the memory is a constant.
    joined = np.concatenate([mem, h], axis=1)  # (B, M, C)
    norm1_cache = None
    if pre_norm:
        joined, norm1_cache = layer_norm_forward(joined, params["norm1_gamma"], params["norm1_beta"])
    query_input = joined[:, mem_length:]  # (B, N, C)

    # 2. Projections, split into heads.
    q_flat, q_cache = linear_forward(query_input, params["W_q"])  # (B, N, C)
    k_flat, k_cache = linear_forward(joined, params["W_k"])  # (B, M, C)
    v_flat, v_cache = linear_forward(joined, params["W_v"])  # (B, M, C)
    q, k, v = split_heads(q_flat, n_heads), split_heads(k_flat, n_heads), split_heads(v_flat, n_heads)

    # 3. Relative positional attention, causal with the memory in front.
    window = config.mem_len if config.same_length else None
    heads, attention_cache = xl_attention_forward(
        q, k, v, params["W_r"], params["u"], params["v"],
        causal=True, clamp_len=config.clamp_len, mask=mask, window=window, shift=config.shift,
    )  # (B, H, N, D)

    # 4. Output projection, dropout and the residual sum (then LayerNorm when post-norm).
    attended, o_cache = linear_forward(merge_heads(heads), params["W_o"])  # (B, N, C)
    # NOTE: dropout acts on the attention and feed-forward outputs only; the reference
    # code also drops attention probabilities and embeddings, which this layer leaves out.
    attended, drop1_cache = dropout_forward(attended, config.dropout, rng)
    hidden = h + attended  # (B, N, C)
    if not pre_norm:
        hidden, norm1_cache = layer_norm_forward(hidden, params["norm1_gamma"], params["norm1_beta"])

    # 5. Position-wise feed-forward with its residual sum.
    ff_input, norm2_cache = hidden, None
    if pre_norm:
        ff_input, norm2_cache = layer_norm_forward(hidden, params["norm2_gamma"], params["norm2_beta"])
    ff_out, ff_cache = feed_forward_forward(
        ff_input, params["W_1"], params["b_1"], params["W_2"], params["b_2"], config.activation
    )  # (B, N, C)
    ff_out, drop2_cache = dropout_forward(ff_out, config.dropout, rng)
    out = hidden + ff_out  # (B, N, C)
    if not pre_norm:
        out, norm2_cache = layer_norm_forward(out, params["norm2_gamma"], params["norm2_beta"])

    cache = (
        pre_norm, n_heads, mem_length, norm1_cache, q_cache, k_cache, v_cache,
        attention_cache, o_cache, drop1_cache, norm2_cache, ff_cache, drop2_cache,
    )
    return out, cache


def layer_backward(dout, cache):
    """Backward of layer_forward. Returns (dh, dparams).

    The memory is a stop-gradient constant: the gradient reaching its rows of
    [memory ; segment] is dropped, but W_k, W_v (and the pre-norm LayerNorm)
    still collect their gradients from those rows.
    """
    (
        pre_norm, n_heads, mem_length, norm1_cache, q_cache, k_cache, v_cache,
        attention_cache, o_cache, drop1_cache, norm2_cache, ff_cache, drop2_cache,
    ) = cache
    dparams = {}

    # 5. out = hidden + ff_out (then LayerNorm when post-norm)
    if not pre_norm:
        dout, dparams["norm2_gamma"], dparams["norm2_beta"] = layer_norm_backward(dout, norm2_cache)
    dhidden = dout.copy()  # the residual branch; hidden also feeds the feed-forward (a fork)
    dff_out = dropout_backward(dout, drop2_cache)
    dff_input, dparams["W_1"], dparams["b_1"], dparams["W_2"], dparams["b_2"] = feed_forward_backward(
        dff_out, ff_cache
    )
    if pre_norm:
        dff_input, dparams["norm2_gamma"], dparams["norm2_beta"] = layer_norm_backward(dff_input, norm2_cache)
    dhidden += dff_input

    # 4. hidden = h + dropout(merge_heads(heads) W_o) (then LayerNorm when post-norm)
    if not pre_norm:
        dhidden, dparams["norm1_gamma"], dparams["norm1_beta"] = layer_norm_backward(dhidden, norm1_cache)
    dh = dhidden.copy()  # the residual branch
    dattended = dropout_backward(dhidden, drop1_cache)
    dmerged, dparams["W_o"], _ = linear_backward(dattended, o_cache)

    # 3. heads = relative attention(q, k, v; W_r, u, v)
    dq, dk, dv, dparams["W_r"], dparams["u"], dparams["v"] = xl_attention_backward(
        split_heads(dmerged, n_heads), attention_cache
    )

    # 2. q = query_input W_q, k = joined W_k, v = joined W_v; joined feeds all three (a fork).
    dquery_input, dparams["W_q"], _ = linear_backward(merge_heads(dq), q_cache)
    djoined, dparams["W_k"], _ = linear_backward(merge_heads(dk), k_cache)
    djoined_v, dparams["W_v"], _ = linear_backward(merge_heads(dv), v_cache)
    djoined += djoined_v
    djoined[:, mem_length:] += dquery_input

    # 1. joined = [mem ; h] (LayerNorm first when pre-norm). Stop-gradient: drop the memory rows.
    if pre_norm:
        djoined, dparams["norm1_gamma"], dparams["norm1_beta"] = layer_norm_backward(djoined, norm1_cache)
    dh += djoined[:, mem_length:]
    return dh, dparams


# --- memory and the multi-layer decoder ----------------------------------------------------------


def empty_memory(n_layers, batch, model_width, *, dtype=np.float64):
    """Return n_layers memories of length 0, (B, 0, C) each, for the first segment."""
    return [np.zeros((batch, 0, model_width), dtype=dtype) for _ in range(n_layers)]


def update_memory(mem, hidden, mem_len, ext_len=0):
    """Return the next memory (B, <= mem_len, C) from the memory and the layer input of a segment.

    Keep [mem ; hidden][beg:end] with end = Mem + max(0, N - ext_len) and
    beg = max(0, end - mem_len): the last mem_len positions, leaving out the
    ext_len trailing positions of the segment. The copy is a constant for the
    next segment (stop-gradient).
    """
    check_int("mem_len", mem_len, minimum=0)
    check_int("ext_len", ext_len, minimum=0)
    if mem.shape[0] != hidden.shape[0] or mem.shape[2] != hidden.shape[2]:
        raise ValueError(
            f"mem has shape {mem.shape} but the hidden states have shape {hidden.shape}; "
            f"expected the same batch and width"
        )
    end = mem.shape[1] + max(0, hidden.shape[1] - ext_len)
    begin = max(0, end - mem_len)
    return np.concatenate([mem, hidden], axis=1)[:, begin:end].copy()  # (B, end - begin, C)


def decoder_forward(x, mems, params, config, *, mask=None, rng=None):
    """Run the layers on one segment x (B, N, C) with their memories.

    Inputs:
    - x: input embeddings of the segment (B, N, C)
    - mems: one memory (B, Mem, C) per layer, all of the same length Mem
    - params: one parameter dict per layer (init_layer_params)
    - config: XLConfig
    - mask, rng: as layer_forward

    Returns (out, new_mems, cache): out (B, N, C); new_mems from update_memory()
    on each layer's input (the input embeddings for the first layer).
    """
    if len(mems) != len(params):
        raise ValueError(f"got {len(mems)} memories for {len(params)} layers; expected one per layer")
    lengths = {mem.shape[1] for mem in mems}
    if len(lengths) > 1:
        raise ValueError(f"the memories have lengths {sorted(lengths)}; expected one length for every layer")

    # 1. Layers in order; each keeps its input for the next memory.
    layer_inputs, caches = [], []
    hidden = x
    for mem, layer_params in zip(mems, params):
        layer_inputs.append(hidden)
        hidden, layer_cache = layer_forward(hidden, mem, layer_params, config, mask=mask, rng=rng)
        caches.append(layer_cache)

    # 2. New memories (constants: nothing here is differentiated).
    new_mems = [
        update_memory(mem, layer_input, config.mem_len, config.ext_len)
        for mem, layer_input in zip(mems, layer_inputs)
    ]
    return hidden, new_mems, caches


def decoder_backward(dout, cache):
    """Backward of decoder_forward. Returns (dx, dparams), dparams one dict per layer."""
    dparams = []
    for layer_cache in reversed(cache):
        dout, layer_dparams = layer_backward(dout, layer_cache)
        dparams.append(layer_dparams)
    return dout, dparams[::-1]


def process_segments(x, params, config, segment_len, *, mems=None, rng=None):
    """Run the decoder over a long sequence x (B, T, C), segment by segment.

    Each segment of segment_len positions (the last may be shorter) attends to
    the memories left by the previous one. Returns (out, mems, caches):
    out (B, T, C), the final memories and one (start, stop, decoder cache)
    per segment.
    """
    check_float_array("x", x, min_ndim=3)
    check_int("segment_len", segment_len, minimum=1)
    if mems is None:
        mems = empty_memory(len(params), x.shape[0], x.shape[2], dtype=x.dtype)
    outputs, caches = [], []
    for start in range(0, x.shape[1], segment_len):
        stop = min(start + segment_len, x.shape[1])
        out, mems, cache = decoder_forward(x[:, start:stop], mems, params, config, rng=rng)
        outputs.append(out)
        caches.append((start, stop, cache))
    return np.concatenate(outputs, axis=1), mems, caches


def process_segments_backward(dout, caches):
    """Backward of process_segments. Returns (dx, dparams) with dparams summed over segments.

    Each segment's backward stops at its memory, so the gradient of a segment's
    output reaches only that segment's inputs (truncated back-propagation).
    """
    dx_parts, total = [], None
    for start, stop, cache in caches:
        dx, dparams = decoder_backward(dout[:, start:stop], cache)
        dx_parts.append(dx)
        if total is None:
            total = [dict(layer) for layer in dparams]
        else:
            for layer_total, layer in zip(total, dparams):
                for name, grad in layer.items():
                    layer_total[name] = layer_total[name] + grad
    return np.concatenate(dx_parts, axis=1), total


def recurrence_mask(total_len, segment_len, mem_len, *, same_length=False):
    """Return the (T, T) mask of one pass that equals segment recurrence (ext_len = 0).

    Position i in the segment starting at s may attend j when
    s - mem_len <= j <= i (and j > i - mem_len with same_length). With
    mem_len = segment_len this is j <= i and seg(j) >= seg(i) - 1.
    """
    check_int("total_len", total_len, minimum=1)
    check_int("segment_len", segment_len, minimum=1)
    check_int("mem_len", mem_len, minimum=0)
    rows = np.arange(total_len)[:, None]  # (T, 1)
    cols = np.arange(total_len)[None, :]  # (1, T)
    segment_start = (rows // segment_len) * segment_len  # (T, 1)
    allowed = (cols <= rows) & (cols >= segment_start - mem_len)  # (T, T)
    if same_length:
        allowed &= cols > rows - mem_len
    return allowed


# --- the method object ------------------------------------------------------------------------


class RelativePositionAttention:
    """Transformer-XL relative positional attention as an attention method object.

    forward(q, k, v, mask=None, causal=False) treats the first M - N keys as
    memory (query i sits at key position i + M - N) and adds the relative
    position terms to the content scores:

    - causal=True: key j is allowed for query i when j <= i + M - N, with R
      over the distances M - 1 .. 0 (the paper's decoder).
    - causal=False: bidirectional relative attention over all M keys, with R
      over the distances M - 1 .. -(N - 1) and the explicit gather shift (the
      pad/reshape shift is rejected here because it mixes rows).

    The parameters u, v_bias (H, D) and W_r (C_r, H * D), C_r = position_width
    or H * D, are made on the first call for each (H, D): drawn from rng
    (init="random") or all zero (init="zeros", which reduces the method to
    dense attention). backward() returns (dq, dk, dv) and stores the
    parameter gradients in self.grads.
    """

    name = "transformer_xl"

    def __init__(self, rng=None, *, init="random", clamp_len=None, shift="gather", window=None, position_width=None):
        check_choice("init", init, ("random", "zeros"))
        check_choice("shift", shift, SHIFTS)
        if clamp_len is not None:
            check_int("clamp_len", clamp_len, minimum=0)
        if window is not None:
            check_int("window", window, minimum=1)
        if position_width is not None:
            check_int("position_width", position_width, minimum=2)
            if position_width % 2:
                raise ValueError(f"position_width={position_width} is invalid; expected an even width")
        if rng is None:
            rng = np.random.default_rng(0)
        check_generator("rng", rng)
        self.rng = rng
        self.init = init
        self.clamp_len = clamp_len
        self.shift = shift
        self.window = window
        self.position_width = position_width
        self.params = {}  # (H, D) -> {"u", "v_bias", "W_r"}
        self.grads = None

    def parameters(self, n_heads, head_width, dtype=np.float64):
        """Return the dict of u, v_bias and W_r for H heads of width D, made on first use."""
        key = (n_heads, head_width)
        if key not in self.params:
            position_width = self.position_width or n_heads * head_width
            if position_width % 2:
                position_width += 1  # the sinusoids come in sin/cos pairs
            shape = (position_width, n_heads * head_width)
            if self.init == "zeros":
                u, v_bias, w_r = np.zeros((n_heads, head_width)), np.zeros((n_heads, head_width)), np.zeros(shape)
            else:
                u = 0.02 * self.rng.standard_normal((n_heads, head_width))
                v_bias = 0.02 * self.rng.standard_normal((n_heads, head_width))
                w_r = self.rng.standard_normal(shape) / np.sqrt(position_width)
            self.params[key] = {"u": u, "v_bias": v_bias, "W_r": w_r}
        return {name: value.astype(dtype, copy=False) for name, value in self.params[key].items()}

    def forward(self, q, k, v, *, mask=None, causal=False):
        check_attention_inputs(q, k, v)
        if q.ndim < 3:
            raise ValueError(f"q has shape {q.shape}; expected (..., H, N, D) with a heads axis")
        params = self.parameters(q.shape[-3], q.shape[-1], q.dtype)
        shift = self.shift if causal else "gather"
        return xl_attention_forward(
            q, k, v, params["W_r"], params["u"], params["v_bias"],
            causal=causal, clamp_len=self.clamp_len, mask=mask, window=self.window, shift=shift,
        )

    def backward(self, dout, cache):
        dq, dk, dv, dw_r, du, dv_bias = xl_attention_backward(dout, cache)
        self.grads = {"u": du, "v_bias": dv_bias, "W_r": dw_r}
        return dq, dk, dv

    def keys_seen(self, cache):
        attention_cache, _ = cache
        return attention_cache[-1]


def make_method(rng=None, **options):
    """Return RelativePositionAttention; options: init, clamp_len, shift, window, position_width."""
    return RelativePositionAttention(rng, **options)


# --- gradient-check cases -------------------------------------------------------------------


def _attention_case(rng, label, *, n_queries, n_keys, causal, shift="gather", clamp_len=None):
    """Build a float64 case for xl_attention_forward over q, k, v, W_r, u, v."""
    batch, n_heads, width = 2, 2, 3
    shapes = [
        (batch, n_heads, n_queries, width), (batch, n_heads, n_keys, width), (batch, n_heads, n_keys, width),
        (4, n_heads * width), (n_heads, width), (n_heads, width),
    ]
    # Scores of order 1 keep the softmax soft, so no gradient entry drowns in finite-difference round-off.
    inputs = [0.5 * rng.standard_normal(shape) for shape in shapes]

    def forward(q, k, v, w_r, u, v_bias):
        return xl_attention_forward(q, k, v, w_r, u, v_bias, causal=causal, clamp_len=clamp_len, shift=shift)

    return (label, forward, xl_attention_backward, inputs, ["q", "k", "v", "W_r", "u", "v_bias"])


def _layer_case(rng, label, config, *, n_queries, mem_length):
    """Build a float64 case for layer_forward over the segment and every parameter, memory fixed."""
    batch, width, inner = 2, 4, 6
    params = init_layer_params(width, config.n_heads, inner, rng)
    params["u"] = rng.standard_normal(params["u"].shape)  # away from 0, so the bias paths are exercised
    params["v"] = rng.standard_normal(params["v"].shape)
    params["norm1_gamma"] = 1.0 + 0.1 * rng.standard_normal(width)
    params["norm2_beta"] = 0.1 * rng.standard_normal(width)
    h = rng.standard_normal((batch, n_queries, width))
    mem = rng.standard_normal((batch, mem_length, width))  # a constant input
    names = list(LAYER_PARAM_NAMES)

    def forward(h, *values):
        return layer_forward(h, mem, dict(zip(names, values)), config)

    def backward(dout, cache):
        dh, dparams = layer_backward(dout, cache)
        return (dh, *(dparams[name] for name in names))

    return (label, forward, backward, [h] + [params[name] for name in names], ["h"] + names)


def gradcheck_cases(rng):
    """Return small float64 cases (label, forward, backward, inputs, names) with N != M."""
    return [
        _attention_case(rng, "causal, N=3, M=5 (memory 2)", n_queries=3, n_keys=5, causal=True),
        _attention_case(rng, "causal pad/reshape shift, N=4, M=7", n_queries=4, n_keys=7, causal=True,
                        shift="pad_reshape"),
        _attention_case(rng, "causal, clamp_len=2, N=3, M=6", n_queries=3, n_keys=6, causal=True, clamp_len=2),
        _attention_case(rng, "bidirectional, N=3, M=5", n_queries=3, n_keys=5, causal=False),
        _layer_case(rng, "layer post-norm, N=3, memory 4", XLConfig(n_heads=2, mem_len=4),
                    n_queries=3, mem_length=4),
        _layer_case(rng, "layer pre-norm, same_length, N=3, memory 2",
                    XLConfig(n_heads=2, mem_len=3, same_length=True, norm="pre"), n_queries=3, mem_length=2),
    ]
