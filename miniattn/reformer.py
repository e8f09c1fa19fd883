"""Reformer (Kitaev, Kaiser and Levskaya, 2020): LSH attention, reversible layers, chunked FF.

Letters: B batch, H heads, N positions, D head width, Dv value width, C model
width, K hash rounds, c chunk length, nb buckets per round. L is the padded
length, the multiple of c at or above N. G counts the flattened leading
(batch, head) axes.

LSH attention. Queries and keys share one projection (shared QK), so a query
is most likely to attend the keys pointing in its own direction. Angular LSH
(``miniattn.core.hashing``) puts vectors at a small angle in the same bucket,
and attention is restricted to a few neighbours in bucket order:

    1. pad to L = c * ceil(N / c); padded positions are never attended
    2. hash every position in K rounds, sort the K L items by (round, bucket,
       position), and gather qk and v into that order
    3. split the sorted sequence into K L / c chunks of c items; each chunk
       attends to itself and to the previous chunk (chunk 0 wraps around to
       the last chunk), with scores s_ij = q_i . k_j / |k_j|: keys are
       normalised to unit length, queries are not, and no 1/sqrt(D) is
       applied (the query length acts as a learned temperature)
    4. masks: a key at a later original position than the query is removed
       when causal, padded and masked keys are removed, and a query's own key
       gets SELF_PENALTY subtracted from its score
    5. put each round's outputs o_r and log-sum-exps lse_r back in position
       order and combine the rounds with their softmax weights

           w_r = exp(lse_r - logsumexp_r lse_r),    o = sum_r w_r o_r

The self-penalty is finite on purpose. Next to any other allowed key with an
ordinary score, exp(-1e5) underflows to exactly 0. A query with no other key
(the first position under causal masking) still attends itself with weight 1
instead of producing a fully masked row.

A key met several times. Let n_ij count the windows (over all rounds, and
twice when a single chunk is its own previous chunk) in which query i meets
key j. Without deduplication (dedup=False, the default) the
combined output equals dense attention over the union of the windows with a
logit bias of +log n_ij: a key met twice counts twice. With dedup=True every
window subtracts log n_ij from that score, and the combined output equals
dense attention over the union with no bias. Tests check both identities.

Backward. Buckets and the sort are piecewise constant and treated as
constants. The gradient flows through the gathers (scatter-add backward,
duplicates accumulate), the key normalisation (dq += (I - k k^T) dk / |q|)
and the round weights (dlse_r = w_r (<do, o_r> - <do, o>)).

Reversible layers. Two residual streams (Y1, Y2) replace one:

    Y1 = X1 + F(X2),   F = LayerNorm -> LSH attention -> output projection -> dropout
    Y2 = X2 + G(Y1),   G = LayerNorm -> chunked feed-forward -> dropout

so the inputs can be recomputed from the outputs: X2 = Y2 - G(Y1), then
X1 = Y1 - F(X2). A stack starts from X1 = X2 = x and returns (Y1 + Y2) / 2. The backward walks the stack top down, recomputing each
layer's inputs and activations with the same buckets and dropout masks, so the
activation memory of the backward is that of one layer whatever the depth.

Complexity per head: hashing O(K N D nb), sorting O(K N log N) (O(K N) with
the compiled counting sort), attention O(K N c D) time and O(K N c) memory for
the chunk scores: linear in N for a fixed chunk length. With nb = 2 N / c the
hashing term grows as N^2 / c, but with a small constant (one matmul).
NOTE: factorised buckets, which keep hashing linear for very large nb, are
not implemented.
"""

from dataclasses import dataclass, replace

import numpy as np

from .core import kernels
from .core.hashing import check_n_buckets, check_rotations, draw_rotations, lsh_hash, lsh_sort
from .core.softmax import logsumexp_forward, softmax_forward
from .core.validate import (
    check_attention_inputs,
    check_float_array,
    check_generator,
    check_int,
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
from .transformer import merge_heads, split_heads

# Subtracted from a query's score on its own key: finite, so a lone query still attends itself.
SELF_PENALTY = 1e5


# --- gathers along the position axis -------------------------------------------------


def gather_positions(x, index, backend=None):
    """Return out[g, t] = x[g, index[g, t]] for x (G, L, D) and index (G, T)."""
    n_groups, length, width = x.shape
    flat_index = (index + length * np.arange(n_groups)[:, None]).ravel()  # (G T,)
    rows = kernels.gather_rows(x.reshape(-1, width), flat_index, backend=backend)  # (G T, D)
    return rows.reshape(index.shape + (width,))


def scatter_positions(grad, index, length, backend=None):
    """Backward of gather_positions: out[g, index[g, t]] += grad[g, t], duplicates added."""
    n_groups, _, width = grad.shape
    flat_index = (index + length * np.arange(n_groups)[:, None]).ravel()  # (G T,)
    rows = kernels.scatter_add_rows(grad.reshape(-1, width), flat_index, n_groups * length, backend=backend)
    return rows.reshape(n_groups, length, width)  # (G, L, D)


def look_back(chunks):
    """Attach each chunk's predecessor: (G, n, c, ...) -> (G, n, 2c, ...), previous first.

    Chunk 0's predecessor is the last chunk (wrap-around); with one chunk
    the chunk is its own predecessor and every item appears twice.
    """
    return np.concatenate([np.roll(chunks, 1, axis=1), chunks], axis=2)


def look_back_backward(dwindows, chunk_length):
    """Backward of look_back: add each window's first half back to the chunk it came from."""
    previous, current = dwindows[:, :, :chunk_length], dwindows[:, :, chunk_length:]
    return current + np.roll(previous, -1, axis=1)


# --- key normalisation ----------------------------------------------------------------


def normalize_forward(x):
    """Scale each row of x (..., D) to unit length. Returns (x / |x|, cache).

    NOTE: a zero row (the zero padding, or a zero input) stays zero; the
    division uses |x| = 1 there, where the map has no derivative anyway.
    """
    norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))  # (..., 1)
    safe_norm = np.where(norm > 0, norm, 1.0)
    unit = x / safe_norm  # (..., D)
    return unit, (unit, safe_norm)


def normalize_backward(dunit, cache):
    """dx = (I - u u^T) du / |x| for u = x / |x|: only the part of du across u survives."""
    unit, safe_norm = cache
    along = np.sum(unit * dunit, axis=-1, keepdims=True)  # (..., 1)
    return (dunit - unit * along) / safe_norm


# --- LSH attention ----------------------------------------------------------------------


def bucket_ids(buckets, n_buckets, length):
    """Turn per-round buckets (G, K, N) in [0, nb) into sort ids (G, K, L).

    Adds the round offset r (nb + 1) and gives the padded positions N..L-1
    their round's padding id, the same ids ``lsh_hash`` returns.
    """
    n_groups, n_rounds, n_positions = buckets.shape
    ids = np.full((n_groups, n_rounds, length), n_buckets, dtype=np.int64)  # (G, K, L)
    ids[:, :, :n_positions] = buckets
    ids += (n_buckets + 1) * np.arange(n_rounds, dtype=np.int64)[:, None]
    return ids


def window_counts_per_slot(undo, query_positions, key_positions, n_rounds, chunk_length):
    """Return n_ij for every (query, key) slot of the chunk windows, (G, n, c, 2c).

    n_ij counts the windows over all rounds in which query position i meets
    key position j. Item (r', j) lies in chunk undo // c. Query item (r, i)
    meets it once if they share a chunk and once if it lies in the previous
    chunk (wrapping).
    Memory stays linear in N: K^2 passes over the slots.
    """
    n_groups = undo.shape[0]
    n_chunks = query_positions.shape[1]
    length = undo.shape[1] // n_rounds
    chunk_of = (undo // chunk_length).reshape(n_groups, n_rounds, length)  # (G, K, L)
    counts = np.zeros(query_positions.shape + (key_positions.shape[-1],), dtype=np.int64)  # (G, n, c, 2c)
    flat_queries = query_positions.reshape(n_groups, -1)
    flat_keys = key_positions.reshape(n_groups, -1)
    for query_round in range(n_rounds):
        query_chunk = np.take_along_axis(chunk_of[:, query_round], flat_queries, axis=1)
        query_chunk = query_chunk.reshape(query_positions.shape)[..., None]  # (G, n, c, 1)
        for key_round in range(n_rounds):
            key_chunk = np.take_along_axis(chunk_of[:, key_round], flat_keys, axis=1)
            key_chunk = key_chunk.reshape(key_positions.shape)[:, :, None, :]  # (G, n, 1, 2c)
            counts += key_chunk == query_chunk
            counts += key_chunk == (query_chunk - 1) % n_chunks
    return counts


def _check_frozen_buckets(buckets, qk, n_buckets):
    """Check frozen bucket ids (..., K, N) in [0, nb) against qk (..., N, D); return them as an array."""
    buckets = np.asarray(buckets)
    if not np.issubdtype(buckets.dtype, np.integer):
        raise TypeError(f"buckets has dtype {buckets.dtype}; expected integer bucket ids")
    n_positions = qk.shape[-2]
    if buckets.ndim != qk.ndim or buckets.shape[:-2] != qk.shape[:-2] or buckets.shape[-1] != n_positions:
        raise ValueError(
            f"buckets has shape {buckets.shape}; expected {qk.shape[:-2] + ('K', n_positions)} "
            f"(leading axes of qk, rounds, positions)"
        )
    if buckets.shape[-2] < 1 or buckets.min() < 0 or buckets.max() >= n_buckets:
        raise ValueError(
            f"buckets must hold ids in [0, {n_buckets}) for at least one round, got shape "
            f"{buckets.shape} with values from {buckets.min(initial=0)} to {buckets.max(initial=0)}"
        )
    return buckets


def _broadcast_key_mask(key_mask, qk):
    """Check a boolean key mask and broadcast it to qk's (..., N)."""
    if not isinstance(key_mask, np.ndarray) or key_mask.dtype != np.bool_:
        raise TypeError(f"key_mask must be a boolean numpy.ndarray (..., N), got {type(key_mask).__name__}")
    try:
        return np.broadcast_to(key_mask, qk.shape[:-1])
    except ValueError:
        raise ValueError(
            f"key_mask has shape {key_mask.shape}; expected a shape broadcastable to {qk.shape[:-1]} (..., N)"
        ) from None


def _check_lsh_options(qk, v, n_buckets, chunk_length, rotations, buckets, key_mask):
    """Validate the inputs of lsh_attention_forward; return (buckets, key_mask), checked or None."""
    check_float_array("qk", qk, min_ndim=2)
    check_float_array("v", v, min_ndim=2)
    check_same_dtype(qk=qk, v=v)
    if v.shape[:-1] != qk.shape[:-1]:
        raise ValueError(
            f"v has shape {v.shape}; expected the leading axes and length of qk {qk.shape} (..., N, Dv)"
        )

    n_positions = qk.shape[-2]
    check_n_buckets(n_buckets)
    check_int("chunk_length", chunk_length)
    if not 1 <= chunk_length <= n_positions:
        raise ValueError(
            f"chunk_length={chunk_length} does not fit a sequence of N={n_positions} positions; "
            f"expected 1 <= chunk_length <= N (chunk_length=N gives a single chunk)"
        )

    if (rotations is None) == (buckets is None):
        raise ValueError("pass exactly one of rotations (to hash qk) and buckets (frozen bucket ids)")
    if rotations is not None:
        check_rotations(rotations, qk.shape[-1], n_buckets)
    else:
        buckets = _check_frozen_buckets(buckets, qk, n_buckets)

    if key_mask is not None:
        key_mask = _broadcast_key_mask(key_mask, qk)
    return buckets, key_mask


def lsh_attention_forward(
    qk,
    v,
    *,
    n_buckets,
    chunk_length,
    rotations=None,
    buckets=None,
    causal=False,
    dedup=False,
    key_mask=None,
    backend=None,
):
    """Shared-QK LSH attention of qk (..., N, D) with values v (..., N, Dv).

    Inputs:
    - qk: queries, which are also the keys after normalisation to unit length
    - v: values
    - n_buckets: nb, a positive even number of buckets per round
    - chunk_length: c, 1 <= c <= N; N is padded internally to a multiple of c
    - rotations: (K, D, nb / 2) random matrices to hash qk with (``draw_rotations``),
      or instead
    - buckets: frozen bucket ids (..., K, N) in [0, nb), e.g. cache["buckets"]
      of an earlier call (gradient checks and reversible layers use this)
    - causal: remove keys at later original positions than the query
    - dedup: subtract log n_ij so a key met in several windows counts once
    - key_mask: optional bool (..., N), False for keys that no query may attend
    - backend: "numpy" or "cython" for hashing, sorting and gathers (default: active)

    Returns (out, cache): out (..., N, Dv); the cache holds the buckets (..., K, N)
    under "buckets" and what the backward needs.
    """
    buckets, key_mask = _check_lsh_options(qk, v, n_buckets, chunk_length, rotations, buckets, key_mask)
    lead = qk.shape[:-2]
    n_positions, width = qk.shape[-2:]
    value_width = v.shape[-1]
    n_rounds = rotations.shape[0] if rotations is not None else buckets.shape[-2]
    length = chunk_length * -(-n_positions // chunk_length)
    n_chunks = n_rounds * length // chunk_length
    dtype = qk.dtype

    # 1. Pad to a multiple of the chunk length; padded keys are invalid.
    qk_padded = np.zeros((int(np.prod(lead)), length, width), dtype=dtype)  # (G, L, D)
    qk_padded[:, :n_positions] = qk.reshape(-1, n_positions, width)
    v_padded = np.zeros((qk_padded.shape[0], length, value_width), dtype=dtype)  # (G, L, Dv)
    v_padded[:, :n_positions] = v.reshape(-1, n_positions, value_width)
    valid = np.zeros((qk_padded.shape[0], length), dtype=bool)  # (G, L)
    valid[:, :n_positions] = True if key_mask is None else key_mask.reshape(-1, n_positions)

    # 2. Hash (or take the frozen buckets) and sort by (round, bucket, position).
    if rotations is not None:
        ids = lsh_hash(qk_padded[:, :n_positions], rotations, length=length, backend=backend)  # (G, K, L)
        offsets = (n_buckets + 1) * np.arange(n_rounds)[:, None]
        buckets = (ids[:, :, :n_positions] - offsets).reshape(lead + (n_rounds, n_positions))
    else:
        ids = bucket_ids(buckets.reshape(-1, n_rounds, n_positions), n_buckets, length)  # (G, K, L)
    sticker, undo = lsh_sort(ids, backend=backend)  # (G, K L) each
    sorted_positions = sticker % length  # (G, K L) original position of each sorted item

    # 3. Normalise the keys, then gather queries, keys and values into sorted order.
    unit_keys, normalize_cache = normalize_forward(qk_padded)  # (G, L, D)
    sorted_queries = gather_positions(qk_padded, sorted_positions, backend)  # (G, K L, D)
    sorted_keys = gather_positions(unit_keys, sorted_positions, backend)  # (G, K L, D)
    sorted_values = gather_positions(v_padded, sorted_positions, backend)  # (G, K L, Dv)

    # 4. Chunk, and attach the previous chunk to each chunk's keys and values.
    chunk_shape = (-1, n_chunks, chunk_length)
    queries = sorted_queries.reshape(chunk_shape + (width,))  # (G, n, c, D)
    keys = look_back(sorted_keys.reshape(chunk_shape + (width,)))  # (G, n, 2c, D)
    values = look_back(sorted_values.reshape(chunk_shape + (value_width,)))  # (G, n, 2c, Dv)
    query_positions = sorted_positions.reshape(chunk_shape)  # (G, n, c)
    key_positions = look_back(query_positions)  # (G, n, 2c)
    key_valid = look_back(np.take_along_axis(valid, sorted_positions, axis=1).reshape(chunk_shape))  # (G, n, 2c)

    # 5. Scores within each window, with the masks and the self-penalty.
    scores = queries @ np.swapaxes(keys, -1, -2)  # (G, n, c, D) @ (G, n, D, 2c) -> (G, n, c, 2c)
    allowed = np.broadcast_to(key_valid[:, :, None, :], scores.shape)  # (G, n, c, 2c)
    if causal:
        allowed = allowed & (key_positions[:, :, None, :] <= query_positions[..., None])
    scores -= dtype.type(SELF_PENALTY) * (key_positions[:, :, None, :] == query_positions[..., None])
    if dedup:
        counts = window_counts_per_slot(undo, query_positions, key_positions, n_rounds, chunk_length)
        scores -= np.log(counts).astype(dtype)

    # 6. Softmax within the window; keep each row's log-sum-exp for the round weights.
    np.copyto(scores, -np.inf, where=~allowed)  # removed keys: exp(-inf) = 0 exactly
    lse, (probs,) = logsumexp_forward(scores, allowed)  # (G, n, c) and (G, n, c, 2c)
    sorted_out = probs @ values  # (G, n, c, 2c) @ (G, n, 2c, Dv) -> (G, n, c, Dv)

    # 7. Put every round's output and log-sum-exp back in item order (r, t).
    round_out = gather_positions(sorted_out.reshape(-1, n_rounds * length, value_width), undo, backend)  # (G, K L, Dv)
    round_out = round_out.reshape(-1, n_rounds, length, value_width)  # (G, K, L, Dv)
    round_lse = np.take_along_axis(lse.reshape(-1, n_rounds * length), undo, axis=1)  # (G, K L)
    round_lse = round_lse.reshape(-1, n_rounds, length)  # (G, K, L)

    # 8. Combine the rounds with softmax weights of their log-sum-exps.
    lse_by_position = np.swapaxes(round_lse, 1, 2)  # (G, L, K)
    weights, _ = softmax_forward(lse_by_position, np.isfinite(lse_by_position))  # (G, L, K)
    weights = np.swapaxes(weights, 1, 2)  # (G, K, L); rows that saw no key get weight 0
    out_padded = np.sum(weights[..., None] * round_out, axis=1)  # (G, L, Dv)

    # 9. Drop the padding.
    out = out_padded[:, :n_positions].reshape(lead + (n_positions, value_width))  # (..., N, Dv)

    cache = {
        "buckets": buckets,
        "shapes": (lead, n_positions, length, n_rounds, chunk_length, width, value_width),
        "options": {"n_buckets": n_buckets, "causal": causal, "dedup": dedup},
        "valid": valid,
        "sorted_positions": sorted_positions,
        "undo": undo,
        "normalize_cache": normalize_cache,
        "queries": queries,
        "keys": keys,
        "values": values,
        "probs": probs,
        "sorted_out": sorted_out,
        "round_out": round_out,
        "weights": weights,
        "out_padded": out_padded,
        "backend": backend,
    }
    return out, cache


def lsh_attention_backward(dout, cache):
    """Backward of lsh_attention_forward. Returns (dqk, dv).

    Nothing is recomputed: the cache holds the sorted queries, windowed keys
    and values, the window probabilities, the per-round outputs and weights,
    and the sort permutations. Buckets are constants.
    """
    lead, n_positions, length, n_rounds, chunk_length, width, value_width = cache["shapes"]
    check_upstream("dout", dout, lead + (n_positions, value_width))
    sorted_positions, undo = cache["sorted_positions"], cache["undo"]
    queries, keys, values, probs = cache["queries"], cache["keys"], cache["values"], cache["probs"]
    weights, round_out, out_padded = cache["weights"], cache["round_out"], cache["out_padded"]
    n_groups = queries.shape[0]
    n_items = n_rounds * length
    backend = cache["backend"]

    # 9. out = out_padded[:, :N]: padded rows get no gradient.
    dout_padded = np.zeros_like(out_padded)  # (G, L, Dv)
    dout_padded[:, :n_positions] = dout.reshape(-1, n_positions, value_width)

    # 8. out_padded = sum_r w_r o_r with w = softmax_r(lse_r)
    dround_out = weights[..., None] * dout_padded[:, None]  # (G, K, L, Dv)
    round_dots = np.sum(dout_padded[:, None] * round_out, axis=-1)  # (G, K, L) <do, o_r>
    combined_dot = np.sum(dout_padded * out_padded, axis=-1)[:, None]  # (G, 1, L) <do, o>
    dround_lse = weights * (round_dots - combined_dot)  # (G, K, L)

    # 7. round_out = sorted_out[undo]: scatter back to sorted order (a permutation, so no overlaps).
    dsorted_out = scatter_positions(dround_out.reshape(n_groups, n_items, value_width), undo, n_items, backend)
    dsorted_out = dsorted_out.reshape(queries.shape[:3] + (value_width,))  # (G, n, c, Dv)
    dlse = scatter_positions(dround_lse.reshape(n_groups, n_items, 1), undo, n_items, backend)
    dlse = dlse.reshape(queries.shape[:3])  # (G, n, c)

    # 6. sorted_out = probs @ values, lse = logsumexp(scores): dS = P (dP - rowsum(dO O)) + P dlse
    dvalues = np.swapaxes(probs, -1, -2) @ dsorted_out  # (G, n, 2c, c) @ (G, n, c, Dv) -> (G, n, 2c, Dv)
    dprobs = dsorted_out @ np.swapaxes(values, -1, -2)  # (G, n, c, Dv) @ (G, n, Dv, 2c) -> (G, n, c, 2c)
    row_dot = np.sum(dsorted_out * cache["sorted_out"], axis=-1, keepdims=True)  # (G, n, c, 1)
    dscores = probs * (dprobs - row_dot + dlse[..., None])  # (G, n, c, 2c)

    # 5. scores = queries keys^T - penalties (the penalties and dedup counts are constants)
    dqueries = dscores @ keys  # (G, n, c, 2c) @ (G, n, 2c, D) -> (G, n, c, D)
    dkeys = np.swapaxes(dscores, -1, -2) @ queries  # (G, n, 2c, c) @ (G, n, c, D) -> (G, n, 2c, D)

    # 4. keys and values windows = [previous chunk, chunk]
    dsorted_keys = look_back_backward(dkeys, chunk_length).reshape(n_groups, n_items, width)
    dsorted_values = look_back_backward(dvalues, chunk_length).reshape(n_groups, n_items, value_width)
    dsorted_queries = dqueries.reshape(n_groups, n_items, width)

    # 3. Gathers by sorted position (each position appears once per round: scatter-add),
    #    then the unit keys: qk feeds both the query path and the key path (a fork).
    dqk_padded = scatter_positions(dsorted_queries, sorted_positions, length, backend)  # (G, L, D)
    dunit_keys = scatter_positions(dsorted_keys, sorted_positions, length, backend)  # (G, L, D)
    dqk_padded += normalize_backward(dunit_keys, cache["normalize_cache"])
    dv_padded = scatter_positions(dsorted_values, sorted_positions, length, backend)  # (G, L, Dv)

    # 2. Hashing and sorting are piecewise constant: no gradient.
    # 1. Drop the padding.
    dqk = dqk_padded[:, :n_positions].reshape(lead + (n_positions, width))
    dv = dv_padded[:, :n_positions].reshape(lead + (n_positions, value_width))
    return dqk, dv


def window_counts(cache):
    """Return n_ij (..., N, N): how many windows over all rounds show key j to query i.

    Counts every occurrence, including both copies when a single chunk is
    its own previous chunk; masks are not applied. Dense, O(N^2) memory: for
    tests, ``keys_seen`` and the benchmarks, not for the attention itself.
    """
    lead, n_positions, length, n_rounds, chunk_length = cache["shapes"][:5]
    positions = cache["sorted_positions"]  # (G, K L)
    n_groups = positions.shape[0]
    query_positions = positions.reshape(n_groups, -1, chunk_length)  # (G, n, c)
    key_positions = look_back(query_positions)  # (G, n, 2c)
    counts = np.zeros((n_groups, length, length), dtype=np.int64)  # (G, L, L)
    group = np.arange(n_groups)[:, None, None, None]
    np.add.at(counts, (group, query_positions[..., :, None], key_positions[:, :, None, :]), 1)
    return counts[:, :n_positions, :n_positions].reshape(lead + (n_positions, n_positions))


def allowed_keys(cache):
    """Return the boolean (..., N, N) mask of keys each query attended: seen, valid and causal."""
    lead, n_positions = cache["shapes"][:2]
    seen = window_counts(cache) > 0
    valid = cache["valid"][:, :n_positions].reshape(lead + (1, n_positions))
    seen &= valid
    if cache["options"]["causal"]:
        seen &= np.tri(n_positions, dtype=bool)
    return seen


# --- the attention method object -----------------------------------------------------------


# Chunk length of the method object when neither it nor nb is set: 64 positions,
# the default of the Hugging Face Reformer configuration (the paper's code uses 128).
DEFAULT_CHUNK_LENGTH = 64


class LSHAttention:
    """Reformer's shared-QK LSH attention as an attention method object.

    Shared QK: forward(q, k, v) attends with q as the queries and q / |q| as
    the keys. k takes no part: it must have q's shape, and backward returns a
    zero dk. A model that wants Reformer attention projects one shared
    query-key tensor and passes it as q. Rotations (K, D, nb / 2) are drawn
    from rng at the first forward, for that head width, and kept; every
    batch entry and head shares them. Only key padding masks, shaped
    (..., 1, M), can be honoured: any other mask raises.

    Sizes. By default the chunk length is fixed at DEFAULT_CHUNK_LENGTH and
    the bucket count grows with N, nb = 2 ceil(N / c), so that a chunk holds
    about two average buckets and each query attends 2c keys: the cost grows
    linearly in N, as in the paper. Setting n_buckets fixes nb instead, with
    c = 2N / nb; setting both fixes both. Rotations drawn for one nb are
    redrawn when a later call needs another nb (a different N).
    """

    name = "reformer"

    def __init__(self, rng=None, *, n_buckets=None, chunk_length=None, n_rounds=1, dedup=False, rotations=None, backend=None):
        if rotations is not None and n_buckets is None:
            n_buckets = 2 * np.shape(rotations)[-1]  # rotations (K, D, nb / 2) fix nb
        if n_buckets is not None:
            check_n_buckets(n_buckets)
        check_int("n_rounds", n_rounds, minimum=1)
        if chunk_length is not None:
            check_int("chunk_length", chunk_length, minimum=1)
        if rotations is None:
            rng = np.random.default_rng() if rng is None else rng
            check_generator("rng", rng)
        else:
            check_rotations(rotations, None, n_buckets, n_rounds)
        self.fixed_rotations = rotations is not None
        self.rng = rng
        self.n_buckets = n_buckets
        self.chunk_length = chunk_length
        self.n_rounds = n_rounds
        self.dedup = bool(dedup)
        self.rotations = rotations
        self.backend = backend

    def chunk_length_for(self, n_positions):
        """Return the chunk length for N positions: the set one, 2 N / nb for a set nb, else the default."""
        if self.chunk_length is not None:
            return self.chunk_length
        if self.n_buckets is None:
            return min(n_positions, DEFAULT_CHUNK_LENGTH)
        return int(min(n_positions, max(1, -(-2 * n_positions // self.n_buckets))))

    def buckets_for(self, n_positions):
        """Return nb for N positions: the set one, or 2 ceil(N / c) (two average buckets per chunk)."""
        if self.n_buckets is not None:
            return self.n_buckets
        return max(2, 2 * -(-n_positions // self.chunk_length_for(n_positions)))

    def forward(self, q, k, v, *, mask=None, causal=False):
        check_attention_inputs(q, k, v)
        if k.shape != q.shape:
            raise ValueError(f"LSH attention is self-attention with shared QK: k must have q's shape {q.shape}, got {k.shape}")
        key_mask = None
        if mask is not None:
            if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
                raise TypeError(f"mask must be a boolean numpy.ndarray, got {type(mask).__name__}")
            if mask.ndim < 2 or mask.shape[-2] != 1:
                raise ValueError(
                    f"mask has shape {mask.shape}; LSH attention honours only key padding masks "
                    f"of shape (..., 1, M), because each query sees keys chosen by hashing"
                )
            key_mask = mask[..., 0, :]
        n_buckets = self.buckets_for(q.shape[-2])
        expected_shape = (self.n_rounds, q.shape[-1], n_buckets // 2)
        if self.rotations is None or (not self.fixed_rotations and self.rotations.shape != expected_shape):
            self.rotations = draw_rotations(self.rng, self.n_rounds, q.shape[-1], n_buckets, dtype=q.dtype)
        return lsh_attention_forward(
            q, v,
            n_buckets=n_buckets,
            chunk_length=self.chunk_length_for(q.shape[-2]),
            rotations=self.rotations,
            causal=causal,
            dedup=self.dedup,
            key_mask=key_mask,
            backend=self.backend,
        )

    def backward(self, dout, cache):
        dq, dv = lsh_attention_backward(dout, cache)
        return dq, np.zeros_like(dq), dv

    def keys_seen(self, cache):
        return allowed_keys(cache)


def make_method(rng=None, **options):
    """Return LSHAttention(rng, **options): n_buckets, chunk_length, n_rounds, dedup, rotations, backend."""
    return LSHAttention(rng, **options)


# --- chunked feed-forward ------------------------------------------------------------------


def chunked_feed_forward_forward(x, w1, b1, w2, b2, *, n_chunks, activation="relu"):
    """Position-wise feed-forward over x (..., N, C), one chunk of positions at a time.

    The result equals feed_forward_forward exactly, because every position
    is computed independently; only one chunk's hidden layer (..., N / n, F)
    exists at a time in the forward. n_chunks need not divide N (the first
    N mod n_chunks chunks get one extra position). Returns (y, cache).
    """
    check_int("n_chunks", n_chunks, minimum=1)
    n_positions = x.shape[-2]
    if n_chunks > n_positions:
        raise ValueError(f"n_chunks={n_chunks} is invalid for N={n_positions} positions; expected 1 <= n_chunks <= N")
    sizes = [n_positions // n_chunks + (index < n_positions % n_chunks) for index in range(n_chunks)]
    bounds = [0] + np.cumsum(sizes).tolist()
    pieces, caches = [], []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        piece, piece_cache = feed_forward_forward(x[..., start:stop, :], w1, b1, w2, b2, activation)
        pieces.append(piece)  # (..., stop - start, C)
        caches.append(piece_cache)
    return np.concatenate(pieces, axis=-2), (bounds, caches)


def chunked_feed_forward_backward(dy, cache):
    """Backward of chunked_feed_forward_forward. Returns (dx, dW1, db1, dW2, db2)."""
    bounds, caches = cache
    dx_pieces = []
    totals = None
    for start, stop, piece_cache in zip(bounds[:-1], bounds[1:], caches):
        dx_piece, *dparams = feed_forward_backward(dy[..., start:stop, :], piece_cache)
        dx_pieces.append(dx_piece)
        totals = dparams if totals is None else [total + grad for total, grad in zip(totals, dparams)]
    return (np.concatenate(dx_pieces, axis=-2), *totals)


# --- reversible residual layers ----------------------------------------------------------

LAYER_PARAM_NAMES = (
    "ln1_gamma", "ln1_beta", "W_qk", "W_v", "W_o", "b_o",
    "ln2_gamma", "ln2_beta", "W1", "b1", "W2", "b2",
)


@dataclass
class ReformerLayer:
    """The parameters and settings of one reversible layer.

    params holds ln1_gamma, ln1_beta (C,), W_qk, W_v, W_o (C, C) and b_o (C,)
    for F, and ln2_gamma, ln2_beta (C,), W1 (C, F), b1 (F,), W2 (F, C) and
    b2 (C,) for G. rotations (K, D, nb / 2) are the layer's hashing
    directions: random but fixed, not trained.
    """

    params: dict
    rotations: np.ndarray
    n_heads: int
    n_buckets: int
    chunk_length: int
    causal: bool = False
    dedup: bool = False
    dropout: float = 0.0
    ff_chunks: int = 1
    activation: str = "relu"


def init_reformer_layer(
    width,
    n_heads,
    ff_width,
    rng,
    *,
    n_buckets,
    chunk_length,
    n_rounds=1,
    causal=False,
    dedup=False,
    dropout=0.0,
    ff_chunks=1,
    activation="relu",
    dtype=np.float64,
):
    """Draw a ReformerLayer: Glorot-uniform weights, unit LayerNorm gains, zero biases, rotations."""
    check_generator("rng", rng)
    check_int("width", width, minimum=1)
    check_int("n_heads", n_heads, minimum=1)
    check_int("ff_width", ff_width, minimum=1)
    check_real("dropout", dropout, minimum=0.0, maximum=1.0)
    if width % n_heads:
        raise ValueError(f"width={width} is not divisible by n_heads={n_heads}; expected width = n_heads * head width")

    def glorot(fan_in, fan_out):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(dtype)

    params = {
        "ln1_gamma": np.ones(width, dtype=dtype),
        "ln1_beta": np.zeros(width, dtype=dtype),
        "W_qk": glorot(width, width),
        "W_v": glorot(width, width),
        "W_o": glorot(width, width),
        "b_o": np.zeros(width, dtype=dtype),
        "ln2_gamma": np.ones(width, dtype=dtype),
        "ln2_beta": np.zeros(width, dtype=dtype),
        "W1": glorot(width, ff_width),
        "b1": np.zeros(ff_width, dtype=dtype),
        "W2": glorot(ff_width, width),
        "b2": np.zeros(width, dtype=dtype),
    }
    rotations = draw_rotations(rng, n_rounds, width // n_heads, n_buckets, dtype=dtype)
    return ReformerLayer(
        params, rotations, n_heads, n_buckets, chunk_length,
        causal=causal, dedup=dedup, dropout=dropout, ff_chunks=ff_chunks, activation=activation,
    )


def dropout_mask_from_seed(seed, shape, p, dtype):
    """Return the scaled keep-mask drawn from default_rng(seed), or None without dropout.

    Storing a seed instead of the mask keeps the stored state of a
    reversible stack small; the backward regenerates the identical mask.
    """
    if p == 0.0 or seed is None:
        return None
    keep = np.random.default_rng(seed).random(shape) >= p
    return keep.astype(dtype) / dtype.type(1.0 - p)


def attention_block_forward(x, layer, *, buckets=None, dropout_seed=None):
    """F(x) = dropout(LSHAttention(LayerNorm(x)) W_o + b_o) for x (B, N, C).

    buckets (B, H, K, N) freezes the hashing (the backward's recomputation
    passes the forward's); otherwise qk is hashed with layer.rotations.
    Returns (y, cache); cache["attention"]["buckets"] holds the buckets used.
    """
    params, n_heads = layer.params, layer.n_heads

    # 1. Normalise.
    normed, ln_cache = layer_norm_forward(x, params["ln1_gamma"], params["ln1_beta"])  # (B, N, C)

    # 2. One shared query-key projection and a value projection, split into heads.
    qk_flat, qk_cache = linear_forward(normed, params["W_qk"])  # (B, N, C)
    v_flat, v_cache = linear_forward(normed, params["W_v"])  # (B, N, C)
    qk, v = split_heads(qk_flat, n_heads), split_heads(v_flat, n_heads)  # (B, H, N, D)

    # 3. LSH attention in every head.
    hashing = {"rotations": layer.rotations} if buckets is None else {"buckets": buckets}
    heads, attention_cache = lsh_attention_forward(
        qk, v,
        n_buckets=layer.n_buckets,
        chunk_length=layer.chunk_length,
        causal=layer.causal,
        dedup=layer.dedup,
        **hashing,
    )  # (B, H, N, D)

    # 4. Merge the heads and project out.
    projected, out_cache = linear_forward(merge_heads(heads), params["W_o"], params["b_o"])  # (B, N, C)

    # 5. Dropout, with a mask regenerated from the seed.
    mask = dropout_mask_from_seed(dropout_seed, projected.shape, layer.dropout, projected.dtype)
    y, dropout_cache = dropout_forward(projected, layer.dropout, mask=mask)
    cache = {
        "layer_norm": ln_cache, "qk": qk_cache, "v": v_cache, "attention": attention_cache,
        "out": out_cache, "dropout": dropout_cache, "n_heads": n_heads,
    }
    return y, cache


def attention_block_backward(dy, cache):
    """Backward of attention_block_forward. Returns (dx, dparams) with F's six parameter gradients."""
    n_heads = cache["n_heads"]
    # 5. y = dropout(projected)
    dprojected = dropout_backward(dy, cache["dropout"])
    # 4. projected = merge(heads) W_o + b_o
    dmerged, dw_o, db_o = linear_backward(dprojected, cache["out"])
    # 3. heads = LSH attention(qk, v)
    dqk, dv = lsh_attention_backward(split_heads(dmerged, n_heads), cache["attention"])
    # 2. qk and v both read normed (a fork: their gradients add).
    dnormed, dw_qk, _ = linear_backward(merge_heads(dqk), cache["qk"])
    dnormed_v, dw_v, _ = linear_backward(merge_heads(dv), cache["v"])
    dnormed += dnormed_v
    # 1. normed = LayerNorm(x)
    dx, dgamma, dbeta = layer_norm_backward(dnormed, cache["layer_norm"])
    dparams = {"ln1_gamma": dgamma, "ln1_beta": dbeta, "W_qk": dw_qk, "W_v": dw_v, "W_o": dw_o, "b_o": db_o}
    return dx, dparams


def feed_forward_block_forward(x, layer, *, dropout_seed=None):
    """G(x) = dropout(ChunkedFF(LayerNorm(x))) for x (B, N, C). Returns (y, cache)."""
    params = layer.params
    # 1. Normalise.
    normed, ln_cache = layer_norm_forward(x, params["ln2_gamma"], params["ln2_beta"])  # (B, N, C)
    # 2. Feed-forward, a chunk of positions at a time.
    hidden, ff_cache = chunked_feed_forward_forward(
        normed, params["W1"], params["b1"], params["W2"], params["b2"],
        n_chunks=layer.ff_chunks, activation=layer.activation,
    )  # (B, N, C)
    # 3. Dropout, with a mask regenerated from the seed.
    mask = dropout_mask_from_seed(dropout_seed, hidden.shape, layer.dropout, hidden.dtype)
    y, dropout_cache = dropout_forward(hidden, layer.dropout, mask=mask)
    return y, {"layer_norm": ln_cache, "ff": ff_cache, "dropout": dropout_cache}


def feed_forward_block_backward(dy, cache):
    """Backward of feed_forward_block_forward. Returns (dx, dparams) with G's six parameter gradients."""
    # 3. y = dropout(hidden)
    dhidden = dropout_backward(dy, cache["dropout"])
    # 2. hidden = ChunkedFF(normed)
    dnormed, dw1, db1, dw2, db2 = chunked_feed_forward_backward(dhidden, cache["ff"])
    # 1. normed = LayerNorm(x)
    dx, dgamma, dbeta = layer_norm_backward(dnormed, cache["layer_norm"])
    return dx, {"ln2_gamma": dgamma, "ln2_beta": dbeta, "W1": dw1, "b1": db1, "W2": dw2, "b2": db2}


def _new_record(layer, rng):
    """Start a layer record: no buckets yet, and two dropout seeds (F, G) when dropout is on."""
    seeds = (None, None)
    if layer.dropout > 0.0:
        if rng is None:
            raise ValueError(f"dropout={layer.dropout} needs rng (a numpy.random.Generator) or a record to replay")
        check_generator("rng", rng)
        seeds = tuple(int(seed) for seed in rng.integers(0, 2**63 - 1, size=2))
    return {"buckets": None, "dropout_seeds": seeds}


def reversible_layer_forward(x1, x2, layer, *, rng=None, record=None):
    """Run one reversible layer: Y1 = X1 + F(X2), Y2 = X2 + G(Y1), for x1, x2 (B, N, C).

    record replays an earlier call's buckets and dropout masks; without it,
    buckets come from hashing and dropout seeds from rng. Returns
    (y1, y2, record); the record (buckets (B, H, K, N) and two seeds) is all
    the backward needs besides y1 and y2. No activation is kept.
    """
    record = _new_record(layer, rng) if record is None else record
    seed_f, seed_g = record["dropout_seeds"]

    # 1. Y1 = X1 + F(X2)
    f_out, f_cache = attention_block_forward(x2, layer, buckets=record["buckets"], dropout_seed=seed_f)
    y1 = x1 + f_out

    # 2. Y2 = X2 + G(Y1)
    g_out, _ = feed_forward_block_forward(y1, layer, dropout_seed=seed_g)
    y2 = x2 + g_out
    return y1, y2, {"buckets": f_cache["attention"]["buckets"], "dropout_seeds": record["dropout_seeds"]}


def reversible_layer_backward(y1, y2, dy1, dy2, layer, record):
    """Recompute a reversible layer's inputs from its outputs and backpropagate.

    Returns (x1, x2, dx1, dx2, dparams). F and G are recomputed with the
    recorded buckets and dropout masks: hashing the reconstructed X2 again
    could pick other buckets and give wrong gradients.
    """
    seed_f, seed_g = record["dropout_seeds"]

    # 2. Y2 = X2 + G(Y1): recompute G(Y1), recover X2, and send dY2 through G into dY1.
    g_out, g_cache = feed_forward_block_forward(y1, layer, dropout_seed=seed_g)
    x2 = y2 - g_out
    dg_in, dparams = feed_forward_block_backward(dy2, g_cache)
    dy1 = dy1 + dg_in
    del g_cache

    # 1. Y1 = X1 + F(X2): recompute F(X2) with the same buckets, recover X1, send dY1 through F.
    f_out, f_cache = attention_block_forward(x2, layer, buckets=record["buckets"], dropout_seed=seed_f)
    x1 = y1 - f_out
    df_in, f_grads = attention_block_backward(dy1, f_cache)
    dparams.update(f_grads)
    dx2 = dy2 + df_in
    dx1 = dy1
    return x1, x2, dx1, dx2, dparams


def reversible_stack_forward(x, layers, *, rng=None, records=None):
    """Run reversible layers on x (B, N, C) with X1 = X2 = x; out = (Y1 + Y2) / 2.

    Returns (out, cache). The cache holds the top outputs Y1, Y2 and one
    small record per layer (buckets, dropout seeds), never activations:
    the backward recomputes them layer by layer.
    """
    check_float_array("x", x, min_ndim=3)
    records = [None] * len(layers) if records is None else records
    if len(records) != len(layers):
        raise ValueError(f"got {len(records)} records for {len(layers)} layers")
    y1, y2 = x, x
    new_records = []
    for layer, record in zip(layers, records):
        y1, y2, record = reversible_layer_forward(y1, y2, layer, rng=rng, record=record)
        new_records.append(record)
    out = 0.5 * (y1 + y2)  # (B, N, C)
    return out, {"y1": y1, "y2": y2, "layers": layers, "records": new_records}


def reversible_stack_backward(dout, cache):
    """Backward of reversible_stack_forward. Returns (dx, dparams per layer, bottom-up)."""
    y1, y2, layers, records = cache["y1"], cache["y2"], cache["layers"], cache["records"]
    # out = (Y1 + Y2) / 2
    dy1 = dy2 = 0.5 * dout
    grads = []
    for layer, record in zip(reversed(layers), reversed(records)):
        y1, y2, dy1, dy2, dparams = reversible_layer_backward(y1, y2, dy1, dy2, layer, record)
        grads.append(dparams)
    # X1 = X2 = x (a fork: the two gradients add).
    return dy1 + dy2, grads[::-1]


def ordinary_stack_forward(x, layers, *, rng=None, records=None):
    """Run the network of reversible_stack_forward, keeping every activation for the backward.

    Returns (out, cache) with the same out; the cache holds F's and G's
    caches for every layer, so its memory grows with depth.
    """
    check_float_array("x", x, min_ndim=3)
    records = [None] * len(layers) if records is None else records
    if len(records) != len(layers):
        raise ValueError(f"got {len(records)} records for {len(layers)} layers")
    y1, y2 = x, x
    caches, new_records = [], []
    for layer, record in zip(layers, records):
        record = _new_record(layer, rng) if record is None else record
        seed_f, seed_g = record["dropout_seeds"]
        f_out, f_cache = attention_block_forward(y2, layer, buckets=record["buckets"], dropout_seed=seed_f)
        y1 = y1 + f_out
        g_out, g_cache = feed_forward_block_forward(y1, layer, dropout_seed=seed_g)
        y2 = y2 + g_out
        caches.append((f_cache, g_cache))
        new_records.append({"buckets": f_cache["attention"]["buckets"], "dropout_seeds": record["dropout_seeds"]})
    out = 0.5 * (y1 + y2)  # (B, N, C)
    return out, {"caches": caches, "records": new_records}


def ordinary_stack_backward(dout, cache):
    """Backward of ordinary_stack_forward from the stored caches. Returns (dx, dparams per layer)."""
    dy1 = dy2 = 0.5 * dout
    grads = []
    for f_cache, g_cache in reversed(cache["caches"]):
        # Y2 = X2 + G(Y1)
        dg_in, dparams = feed_forward_block_backward(dy2, g_cache)
        dy1 = dy1 + dg_in
        # Y1 = X1 + F(X2)
        df_in, f_grads = attention_block_backward(dy1, f_cache)
        dparams.update(f_grads)
        dy2 = dy2 + df_in
        grads.append(dparams)
    return dy1 + dy2, grads[::-1]


# --- gradient-check cases --------------------------------------------------------------------


def frozen_lsh_attention(qk, v, rotations, **options):
    """Return (forward, backward) for LSH attention with the buckets of (qk, rotations) frozen.

    The forward rehashes its input on every call and counts the calls whose
    buckets differ from the frozen ones in forward.moved_calls: a finite-difference
    step that moves a token to another bucket makes that count positive.
    """
    _, first = lsh_attention_forward(qk, v, rotations=rotations, **options)
    frozen = first["buckets"]

    def forward(qk, v):
        _, probe = lsh_attention_forward(qk, v, rotations=rotations, **options)
        if not np.array_equal(probe["buckets"], frozen):
            forward.moved_calls += 1
        return lsh_attention_forward(qk, v, buckets=frozen, **options)

    forward.moved_calls = 0
    return forward, lsh_attention_backward


def frozen_reversible_layer(x1, x2, layer, rng, param_names):
    """Return (forward, backward) of one reversible layer over (x1, x2, *params) with a frozen record.

    The record (buckets and dropout seeds) comes from one forward at the
    given inputs; the closures then vary x1, x2 and the named parameters.
    Like frozen_lsh_attention, forward.moved_calls counts the calls whose
    inputs would hash to other buckets than the frozen ones.
    """
    _, _, record = reversible_layer_forward(x1, x2, layer, rng=rng)

    def with_params(values):
        return replace(layer, params={**layer.params, **dict(zip(param_names, values))})

    def forward(x1, x2, *values):
        current = with_params(values)
        _, probe = attention_block_forward(x2, current, dropout_seed=record["dropout_seeds"][0])
        if not np.array_equal(probe["attention"]["buckets"], record["buckets"]):
            forward.moved_calls += 1
        y1, y2, _ = reversible_layer_forward(x1, x2, current, record=record)
        return (y1, y2), (y1, y2, current)

    forward.moved_calls = 0

    def backward(dout, cache):
        y1, y2, current = cache
        _, _, dx1, dx2, dparams = reversible_layer_backward(y1, y2, dout[0], dout[1], current, record)
        return (dx1, dx2, *(dparams[name] for name in param_names))

    return forward, backward


def gradcheck_cases(rng):
    """Small float64 cases for ``python -m miniattn gradcheck reformer``.

    Returns (label, forward, backward, inputs, names) tuples. Buckets and
    dropout masks are frozen at the first forward, because they are
    piecewise constant in the inputs.
    """
    cases = []
    for label, n_positions, chunk_length, n_rounds, causal, dedup in (
        ("LSH attention, 2 rounds, N=7, c=3", 7, 3, 2, False, False),
        ("LSH attention, causal, dedup, 3 rounds", 6, 2, 3, True, True),
    ):
        qk = rng.standard_normal((1, 2, n_positions, 4))
        v = rng.standard_normal((1, 2, n_positions, 3))
        rotations = draw_rotations(rng, n_rounds, 4, 4)
        options = {"n_buckets": 4, "chunk_length": chunk_length, "causal": causal, "dedup": dedup}
        forward, backward = frozen_lsh_attention(qk, v, rotations, **options)
        cases.append((label, forward, backward, [qk, v], ["qk", "v"]))

    x = rng.standard_normal((2, 5, 4))
    w1, b1 = rng.standard_normal((4, 6)), rng.standard_normal(6)
    w2, b2 = rng.standard_normal((6, 4)), rng.standard_normal(4)

    def ff_forward(x, w1, b1, w2, b2):
        return chunked_feed_forward_forward(x, w1, b1, w2, b2, n_chunks=3, activation="gelu")

    cases.append((
        "chunked feed-forward, 3 chunks of N=5", ff_forward, chunked_feed_forward_backward,
        [x, w1, b1, w2, b2], ["x", "W1", "b1", "W2", "b2"],
    ))

    layer = init_reformer_layer(4, 2, 8, rng, n_buckets=4, chunk_length=2, n_rounds=2, dropout=0.2, ff_chunks=2)
    x1, x2 = rng.standard_normal((1, 5, 4)), rng.standard_normal((1, 5, 4))
    names = ("W_qk", "W_v", "W_o", "ln1_gamma", "W1", "ln2_beta")
    forward, backward = frozen_reversible_layer(x1, x2, layer, rng, names)
    cases.append((
        "reversible layer, dropout 0.2", forward, backward,
        [x1, x2, *(layer.params[name] for name in names)], ["x1", "x2", *names],
    ))
    return cases
