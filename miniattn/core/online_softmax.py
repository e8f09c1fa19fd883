"""Exact attention computed block by block with an online softmax.

Letters: B batch, H heads, N queries, M keys, D head width, Bq rows of a query
tile, Bk columns of a key tile.

Idea. Softmax attention O = softmax(S) V with S = s Q K^T needs every score of
a query row before it can normalise. The online softmax keeps three running
statistics per query row instead, and folds in one key tile at a time:

    S      = s Q_i K_j^T            (masked entries -inf)        (Bq, Bk)
    m_new  = max(m, rowmax(S))
    P~     = exp(S - m_new)
    alpha  = exp(m - m_new)          rescales what was summed under the old max
    l      = alpha l + rowsum(P~)
    acc    = alpha acc + P~ V_j
    m      = m_new

and finishes with O_i = acc / l and lse_i = m + log(l), the log-sum-exp of the
row's scores. A row whose maximum is still -inf has seen no allowed key; its
maximum is replaced by 0 before subtracting, because (-inf) - (-inf) is NaN,
and it ends with O = 0 and lse = -inf.

Merging. Two partial results (O_a, lse_a) and (O_b, lse_b) over disjoint key
sets combine into the result over their union:

    lse = logaddexp(lse_a, lse_b)
    O   = exp(lse_a - lse) O_a + exp(lse_b - lse) O_b

(0, -inf) is the identity, so a worker can start from it and merge partials
in any order.

Backward from the saved lse. With D_i = rowsum(dO_i * O_i) computed once, each
tile's probabilities are recomputed exactly as P = exp(S - lse) (no running
maximum, no renormalisation), and the dense gradient splits into tiles:

    dV_j += P^T dO_i
    dS    = P * (dO_i V_j^T - D_i)
    dQ_i += s dS K_j,      dK_j += s dS^T Q_i

Complexity: O(N M D) time like dense attention, but O(N D) memory plus one
(Bq, Bk) score tile per batch entry: no (N, M) array is ever made.

Which keys a query may attend is described by a BlockMask from the global
index of every row and column, so the same tile loops serve single-process
blockwise attention and every worker of Ring Attention.
"""

from typing import NamedTuple

import numpy as np

from .masks import CAUSAL_ALIGNMENTS
from .validate import check_attention_inputs, check_choice, check_int, check_mask, check_real, check_upstream

DEFAULT_BLOCK_SIZE = 256


# --- which keys each query may attend ------------------------------------------------


class BlockMask:
    """The allowed (query, key) pairs of one attention call, produced tile by tile.

    - query_index: (n,) int global index of each local query row, -1 for a
      padding row (padding rows attend nothing)
    - key_index: (m,) int global index of each local key, -1 for padding
    - causal_offset: None for bidirectional attention; otherwise global key j
      is allowed for global query i when j <= i + causal_offset (M - N for
      bottom-right alignment, 0 for top-left)
    - mask: None or a bool array (..., n or 1, m or 1) in local coordinates,
      True where a query may attend a key; a size-1 axis broadcasts (key
      padding is (B, 1, 1, m))
    """

    def __init__(self, query_index, key_index, *, causal_offset=None, mask=None):
        self.query_index = np.asarray(query_index)
        self.key_index = np.asarray(key_index)
        self.causal_offset = causal_offset
        self.mask = mask

    def tile(self, rows, cols):
        """Return the bool tile (..., r, c) of allowed pairs, or None when all are allowed."""
        query_index = self.query_index[rows]  # (r,)
        key_index = self.key_index[cols]  # (c,)
        allowed = (query_index[:, None] >= 0) & (key_index[None, :] >= 0)  # (r, c)
        if self.causal_offset is not None:
            allowed &= key_index[None, :] <= query_index[:, None] + self.causal_offset
        if self.mask is not None:
            mask_rows = rows if self.mask.shape[-2] > 1 else slice(None)
            mask_cols = cols if self.mask.shape[-1] > 1 else slice(None)
            return allowed & self.mask[..., mask_rows, mask_cols]
        return None if allowed.all() else allowed

    def is_empty(self, rows, cols):
        """Return True when padding or causality leave no allowed pair in the tile.

        The general mask is not inspected: a tile it empties is still
        computed, and its rows simply get probability 0.
        """
        query_index = self.query_index[rows]
        key_index = self.key_index[cols]
        query_index = query_index[query_index >= 0]
        key_index = key_index[key_index >= 0]
        if query_index.size == 0 or key_index.size == 0:
            return True
        if self.causal_offset is None:
            return False
        return key_index.min() > query_index.max() + self.causal_offset

    def allowed_count(self):
        """Return the number of allowed (query, key) pairs ignoring the general mask."""
        query_index = self.query_index[self.query_index >= 0]
        key_index = self.key_index[self.key_index >= 0]
        if self.causal_offset is None:
            return int(query_index.size * key_index.size)
        limits = query_index + self.causal_offset  # (n,) largest allowed key per query
        return int(np.searchsorted(np.sort(key_index), limits, side="right").sum())


def mask_with_two_axes(mask):
    """Return mask (None, or broadcastable to (..., N, M)) with at least two axes.

    The axes are not expanded: a key-padding mask stays (B, 1, 1, M), so no
    worker or tile ever makes it (N, M).
    """
    if mask is None:
        return None
    return mask.reshape((1,) * max(0, 2 - mask.ndim) + mask.shape)


def tile_ranges(length, block):
    """Return the slices [0, block), [block, 2 block), ... covering range(length)."""
    return [slice(start, min(start + block, length)) for start in range(0, length, block)]


# --- merging partial results ------------------------------------------------------------


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Combine attention results over two disjoint key sets into one.

    Inputs: out_a, out_b (..., N, Dv) normalised partial outputs; lse_a, lse_b
    (..., N) their log-sum-exps, -inf where a row saw no allowed key.
    Returns (out, lse) over the union of the key sets. (0, -inf) is the
    identity, and the result does not depend on the order of the arguments.
    """
    lse = np.logaddexp(lse_a, lse_b)  # (..., N); logaddexp(-inf, -inf) = -inf
    lse_safe = np.where(np.isneginf(lse), 0.0, lse)  # empty rows: avoid (-inf) - (-inf)
    weight_a = np.exp(lse_a - lse_safe)[..., None]  # (..., N, 1)
    weight_b = np.exp(lse_b - lse_safe)[..., None]  # (..., N, 1)
    out = weight_a * out_a  # (..., N, Dv)
    out += weight_b * out_b
    return out.astype(out_a.dtype, copy=False), lse.astype(lse_a.dtype, copy=False)


def empty_partial(q, v):
    """Return the merge identity (zeros (..., N, Dv), -inf (..., N)) for queries q."""
    out = np.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)  # (..., N, Dv)
    lse = np.full(q.shape[:-1], -np.inf, dtype=q.dtype)  # (..., N)
    return out, lse


# --- the tile loops, shared by blockwise and ring attention ------------------------------------


def partial_attention_forward(q, k, v, block_mask, *, scale, query_block, key_block):
    """Attention of q over the keys k, v only, with running statistics per query tile.

    Inputs: q (..., n, D), k (..., m, D), v (..., m, Dv), a BlockMask over
    (n, m), the score scale and the tile sizes.
    Returns (out, lse): out (..., n, Dv) normalised over these keys and
    lse (..., n) their log-sum-exp; rows with no allowed key get 0 and -inf.
    """
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    dtype = q.dtype
    out = np.zeros(q.shape[:-1] + v.shape[-1:], dtype=dtype)  # (..., n, Dv)
    lse = np.full(q.shape[:-1], -np.inf, dtype=dtype)  # (..., n)
    scale = dtype.type(scale)

    for rows in tile_ranges(n_queries, query_block):
        q_tile = q[..., rows, :]  # (..., Bq, D)
        row_max = np.full(q_tile.shape[:-1], -np.inf, dtype=dtype)  # m: (..., Bq)
        row_sum = np.zeros(q_tile.shape[:-1], dtype=dtype)  # l: (..., Bq)
        acc = np.zeros(q_tile.shape[:-1] + v.shape[-1:], dtype=dtype)  # (..., Bq, Dv)

        for cols in tile_ranges(n_keys, key_block):
            if block_mask.is_empty(rows, cols):
                continue  # wholly in the future, or padding only

            # 1. Scores of this tile, masked entries -inf.
            scores = q_tile @ np.swapaxes(k[..., cols, :], -1, -2)  # (..., Bq, D) @ (..., D, Bk) -> (..., Bq, Bk)
            scores *= scale
            allowed = block_mask.tile(rows, cols)
            if allowed is not None:
                np.copyto(scores, -np.inf, where=~np.broadcast_to(allowed, scores.shape))

            # 2. New running maximum; rows still at -inf use 0 so exp() sees no NaN.
            new_max = np.maximum(row_max, scores.max(axis=-1))  # (..., Bq)
            safe_max = np.where(np.isneginf(new_max), 0.0, new_max).astype(dtype, copy=False)

            # 3. Unnormalised probabilities of the tile, in place: P~ = exp(S - m_new).
            scores -= safe_max[..., None]
            np.exp(scores, out=scores)  # (..., Bq, Bk), 0 on masked entries

            # 4. Rescale what was accumulated under the old maximum, then add the tile.
            alpha = np.exp(row_max - safe_max)  # (..., Bq), 0 while the row was empty
            row_sum = alpha * row_sum + scores.sum(axis=-1)
            acc *= alpha[..., None]
            acc += scores @ v[..., cols, :]  # (..., Bq, Bk) @ (..., Bk, Dv) -> (..., Bq, Dv)
            row_max = new_max

        # 5. Normalise the tile's rows; rows that saw no key keep O = 0 and lse = -inf.
        seen = row_sum > 0  # (..., Bq)
        out[..., rows, :] = acc / np.where(seen, row_sum, 1.0)[..., None]
        with np.errstate(divide="ignore"):
            lse[..., rows] = np.where(seen, row_max + np.log(np.where(seen, row_sum, 1.0)), -np.inf)
    return out, lse


def partial_attention_backward(dout, q, k, v, lse, delta, block_mask, *, scale, query_block, key_block):
    """Gradients of one (query block, key block) pair, recomputed from the saved lse.

    Inputs: dout (..., n, Dv); q (..., n, D); k, v (..., m, D/Dv); lse (..., n)
    the log-sum-exp over ALL keys the queries attend (not only these);
    delta (..., n) = rowsum(dO * O) of the full output; the BlockMask, scale
    and tile sizes of the forward.
    Returns (dq, dk, dv): this key block's contribution to dq, and the full
    gradient of these keys and values from these queries. Because lse and
    delta are global, contributions from different key blocks simply add.
    """
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    dtype = q.dtype
    scale = dtype.type(scale)
    dq = np.zeros_like(q)  # (..., n, D)
    dk = np.zeros(q.shape[:-2] + k.shape[-2:], dtype=dtype)  # (..., m, D)
    dv = np.zeros(q.shape[:-2] + v.shape[-2:], dtype=dtype)  # (..., m, Dv)
    lse_safe = np.where(np.isneginf(lse), 0.0, lse).astype(dtype, copy=False)  # rows with no key: S = -inf anyway

    for rows in tile_ranges(n_queries, query_block):
        q_tile, dout_tile = q[..., rows, :], dout[..., rows, :]  # (..., Bq, D), (..., Bq, Dv)
        lse_tile, delta_tile = lse_safe[..., rows, None], delta[..., rows, None]  # (..., Bq, 1)
        for cols in tile_ranges(n_keys, key_block):
            if block_mask.is_empty(rows, cols):
                continue
            k_tile, v_tile = k[..., cols, :], v[..., cols, :]  # (..., Bk, D), (..., Bk, Dv)

            # 1-3. Recompute the exact probabilities P = exp(S - lse); masked entries give 0.
            probs = q_tile @ np.swapaxes(k_tile, -1, -2)  # (..., Bq, Bk)
            probs *= scale
            allowed = block_mask.tile(rows, cols)
            if allowed is not None:
                np.copyto(probs, -np.inf, where=~np.broadcast_to(allowed, probs.shape))
            probs -= lse_tile
            np.exp(probs, out=probs)

            # 4. acc += P V_j  ->  dV_j += P^T dO_i, dP = dO_i V_j^T
            dv[..., cols, :] += np.swapaxes(probs, -1, -2) @ dout_tile  # (..., Bk, Bq) @ (..., Bq, Dv)
            dscores = dout_tile @ np.swapaxes(v_tile, -1, -2)  # dP: (..., Bq, Dv) @ (..., Dv, Bk) -> (..., Bq, Bk)

            # 3. P = softmax(S)  ->  dS = P * (dP - D_i), in place
            dscores -= delta_tile
            dscores *= probs

            # 1. S = s Q_i K_j^T  ->  dQ_i += s dS K_j, dK_j += s dS^T Q_i
            dq[..., rows, :] += (dscores @ k_tile) * scale  # (..., Bq, Bk) @ (..., Bk, D)
            dk[..., cols, :] += (np.swapaxes(dscores, -1, -2) @ q_tile) * scale  # (..., Bk, Bq) @ (..., Bq, D)
    return dq, dk, dv


def output_delta(dout, out):
    """Return D = rowsum(dO * O) (..., N), the softmax backward's row term."""
    return np.sum(dout * out, axis=-1)


# --- single-process blockwise attention --------------------------------------------------------


class BlockwiseCache(NamedTuple):
    """Saved state of blockwise attention for its backward: inputs, output and lse, never P."""

    q: np.ndarray  # (..., N, D)
    k: np.ndarray  # (..., M, D)
    v: np.ndarray  # (..., M, Dv)
    out: np.ndarray  # (..., N, Dv)
    lse: np.ndarray  # (..., N)
    block_mask: BlockMask
    scale: float
    query_block: int
    key_block: int


def check_block_sizes(query_block, key_block):
    """Check that both tile sizes are integers >= 1."""
    check_int("query_block", query_block, minimum=1)
    check_int("key_block", key_block, minimum=1)


def causal_offset_for(n_queries, n_keys, causal, causal_alignment):
    """Return the causal offset M - N (bottom-right), 0 (top-left) or None (bidirectional)."""
    check_choice("causal_alignment", causal_alignment, CAUSAL_ALIGNMENTS)
    if not causal:
        return None
    return n_keys - n_queries if causal_alignment == "bottom_right" else 0


def blockwise_attention_forward(
    q,
    k,
    v,
    *,
    mask=None,
    causal=False,
    scale=None,
    query_block=DEFAULT_BLOCK_SIZE,
    key_block=DEFAULT_BLOCK_SIZE,
    causal_alignment="bottom_right",
):
    """Exact attention softmax(s q k^T) v computed tile by tile (online softmax).

    Inputs:
    - q: queries (..., N, D); k: keys (..., M, D); v: values (..., M, Dv)
    - mask: optional bool array broadcastable to (..., N, M), True = may attend
      (for example key padding from padding_mask)
    - causal: forbid keys in each query's future, bottom-right aligned
    - scale: score scale s, 1/sqrt(D) by default
    - query_block, key_block: tile sizes Bq, Bk >= 1; they need not divide N or M
    - causal_alignment: "bottom_right" (default) or "top_left"

    Returns (out, cache): out (..., N, Dv); cache is a BlockwiseCache holding
    q, k, v, out and lse (..., N), the log-sum-exp of each row's allowed scores
    (-inf for a row that may attend nothing, whose output is 0).
    """
    check_attention_inputs(q, k, v)
    check_block_sizes(query_block, key_block)
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    if mask is not None:
        check_mask(mask, q.shape[:-2] + (n_queries, n_keys))
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1])
    check_real("scale", scale)
    offset = causal_offset_for(n_queries, n_keys, causal, causal_alignment)

    block_mask = BlockMask(
        np.arange(n_queries), np.arange(n_keys), causal_offset=offset, mask=mask_with_two_axes(mask)
    )
    out, lse = partial_attention_forward(
        q, k, v, block_mask, scale=scale, query_block=query_block, key_block=key_block
    )
    return out, BlockwiseCache(q, k, v, out, lse, block_mask, scale, query_block, key_block)


def blockwise_attention_backward(dout, cache):
    """Backward of blockwise_attention_forward: returns (dq, dk, dv).

    The cache holds q, k, v, out and lse; each tile's probabilities are
    recomputed from lse, so the backward also never makes an (N, M) array.
    """
    q, k, v, out, lse, block_mask, scale, query_block, key_block = cache
    check_upstream("dout", dout, out.shape)
    delta = output_delta(dout, out)  # (..., N)
    return partial_attention_backward(
        dout, q, k, v, lse, delta, block_mask, scale=scale, query_block=query_block, key_block=key_block
    )
