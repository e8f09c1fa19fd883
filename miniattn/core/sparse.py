"""Attention over per-query key index lists (CSR layout), forward and backward.

Letters: E leading (batch, head) entries, N queries, M keys, D query/key
width, Dv value width, T listed (query, key) pairs, nnz in the whole pattern.

Each query i attends only the keys listed for it. The lists are stored in
compressed sparse row (CSR) form, one pattern shared by every leading entry:

    keys of query i   = indices[indptr[i] : indptr[i + 1]]
    bias of that pair = bias[indptr[i] : indptr[i + 1]]      (optional)

For the pairs t listed for query i (j_t = indices[t]):

    s_t   = scale * q_i . k_{j_t} + bias_t                  scale = 1/sqrt(D)
    lse_i = log sum_t exp(s_t)
    p_t   = exp(s_t - lse_i)
    o_i   = sum_t p_t v_{j_t}

A key listed c times for one query takes part c times, so it acts as a single
key with logit bias log(sum of exp(bias) over its c entries), log c without a
bias. ``csr_to_dense`` builds the dense mask and bias that express this.
A query with an empty list gets a zero output row, lse = -inf and zero
gradients.

Backward, with dO given; probabilities are recomputed from the saved lse:

    Delta_i = dO_i . o_i                   (= sum_t p_t dp_t)
    dp_t    = dO_i . v_{j_t}
    ds_t    = p_t (dp_t - Delta_i)
    dq_i    = scale * sum_t ds_t k_{j_t}
    dk_j   += scale * ds_t q_i             scatter-add over every t with j_t = j
    dv_j   += p_t dO_i                      scatter-add, so repeated keys accumulate

Complexity: O(E nnz D) time. The NumPy reference gathers the listed keys and
values of a chunk of rows at a time, so its memory is O(E nnz) for the scores
plus O(chunk D) for the gathered rows. The compiled kernel
(``csrc/sparse_attention.pxi``) never copies keys: it scores, applies an
online softmax and accumulates one query row at a time, in O(E N) extra
memory for the forward and O(E nnz) for the backward.

Backends follow ``miniattn.core.kernels``: "cython" when the extension is
built, "numpy" otherwise; every entry point takes ``backend=``.
"""

import numpy as np

from .kernels import resolve_backend
from .validate import check_attention_inputs, check_float_array, check_int, check_mask, check_real, check_upstream

# Rows are processed in chunks of about this many (leading entry, pair) items
# in the NumPy reference, which bounds the gathered (T, D) copies.
REFERENCE_CHUNK_ITEMS = 1 << 18


# --- CSR patterns ----------------------------------------------------------


def check_csr(indptr, indices, n_queries, n_keys):
    """Check a CSR pattern and return (indptr, indices) as C-contiguous int64.

    Raises TypeError for non-integer arrays and ValueError when indptr does
    not have N + 1 non-decreasing entries from 0 to len(indices), when an
    index lies outside [0, n_keys), or when a row's indices are not sorted
    in non-decreasing order.
    """
    arrays = {}
    for name, array in (("indptr", indptr), ("indices", indices)):
        array = np.asarray(array)
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"{name} must be an integer array, got dtype {array.dtype}")
        if array.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
        arrays[name] = np.ascontiguousarray(array, dtype=np.int64)
    indptr, indices = arrays["indptr"], arrays["indices"]

    if indptr.shape[0] != n_queries + 1:
        raise ValueError(
            f"indptr has {indptr.shape[0]} entries; expected N + 1 = {n_queries + 1} for N = {n_queries} queries"
        )
    if indptr[0] != 0:
        raise ValueError(f"indptr[0] = {indptr[0]}; expected 0")
    steps = np.diff(indptr)
    if np.any(steps < 0):
        row = int(np.argmax(steps < 0))
        raise ValueError(
            f"indptr decreases at row {row} ({indptr[row]} -> {indptr[row + 1]}); expected non-decreasing offsets"
        )
    if indptr[-1] != indices.shape[0]:
        raise ValueError(f"indptr[-1] = {indptr[-1]} but indices has {indices.shape[0]} entries; expected them equal")
    if indices.size and (indices.min() < 0 or indices.max() >= n_keys):
        bad = int(indices[(indices < 0) | (indices >= n_keys)][0])
        raise ValueError(f"indices contains key {bad}; expected keys in [0, {n_keys})")

    # Within a row the keys must not decrease; across a row boundary they may.
    row_start = np.zeros(indices.shape[0], dtype=bool)
    row_start[indptr[:-1][steps > 0]] = True
    decreasing = np.flatnonzero((np.diff(indices) < 0) & ~row_start[1:])
    if decreasing.size:
        t = int(decreasing[0]) + 1
        row = int(np.searchsorted(indptr, t, side="right")) - 1
        raise ValueError(
            f"indices of row {row} are not sorted: key {indices[t - 1]} is followed by {indices[t]}; "
            f"expected non-decreasing keys within each row (sorted CSR)"
        )
    return indptr, indices


def csr_entry_rows(indptr):
    """Return the query row of every listed pair (nnz,): row i repeated indptr[i+1] - indptr[i] times."""
    indptr = np.asarray(indptr, dtype=np.int64)
    return np.repeat(np.arange(indptr.shape[0] - 1, dtype=np.int64), np.diff(indptr))


def csr_from_mask(allowed):
    """Return (indptr, indices) listing, for each row of a bool (N, M) mask, its True columns."""
    if not isinstance(allowed, np.ndarray) or allowed.dtype != np.bool_ or allowed.ndim != 2:
        raise TypeError(f"allowed must be a 2-D boolean numpy array (N, M), got {type(allowed).__name__} "
                        f"with shape {np.shape(allowed)}")
    _, columns = np.nonzero(allowed)  # row-major order: sorted within each row
    indptr = np.zeros(allowed.shape[0] + 1, dtype=np.int64)
    np.cumsum(allowed.sum(axis=1), out=indptr[1:])
    return indptr, columns.astype(np.int64)


def csr_from_rows(rows, n_keys):
    """Return (indptr, indices) from one sequence of key indices per query.

    Each row is sorted (duplicates are kept and count each time), and every
    key is checked to lie in [0, n_keys).
    """
    lists = [np.sort(np.asarray(row, dtype=np.int64).reshape(-1), kind="stable") for row in rows]
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum([row.shape[0] for row in lists], out=indptr[1:])
    indices = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
    return check_csr(indptr, indices, len(lists), n_keys)


def csr_from_candidates(columns, valid, *, unique=True):
    """Return (indptr, indices) from candidate keys (N, K) and their validity (N, K).

    Each row keeps its valid candidates, sorted. With unique=True a key that
    appears several times in a row is kept once (the row lists a set of
    keys); with unique=False every copy is kept and counts each time.
    """
    columns = np.asarray(columns, dtype=np.int64)
    valid = np.asarray(valid, dtype=bool)
    if columns.ndim != 2 or valid.shape != columns.shape:
        raise ValueError(f"columns {columns.shape} and valid {valid.shape} must be two (N, K) arrays of one shape")
    sentinel = np.iinfo(np.int64).max
    ordered = np.sort(np.where(valid, columns, sentinel), axis=1)  # (N, K), invalid last
    keep = ordered != sentinel  # (N, K)
    if unique and ordered.shape[1] > 1:
        keep[:, 1:] &= ordered[:, 1:] != ordered[:, :-1]
    indptr = np.zeros(columns.shape[0] + 1, dtype=np.int64)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    return indptr, ordered[keep]


def csr_select(indptr, indices, keep):
    """Return (indptr, indices) of the pairs where keep (nnz,) is True, rows unchanged."""
    rows = csr_entry_rows(indptr)  # (nnz,)
    new_indptr = np.zeros_like(indptr)
    np.cumsum(np.bincount(rows[keep], minlength=indptr.shape[0] - 1), out=new_indptr[1:])
    return new_indptr, indices[keep]


def csr_to_dense(indptr, indices, n_keys, bias=None):
    """Return (allowed, logit_bias): the dense specification of a CSR pattern.

    Dense masked attention ``attention_forward(q, k, v, mask=allowed,
    bias=logit_bias)`` equals sparse attention on the pattern. A key listed
    c times for one query, with biases b_1..b_c, acts as one key with bias
    log(sum_t exp(b_t)), which is log c without a bias.

    Returns:
    - allowed: bool (N, M), True where the query lists the key at least once
    - logit_bias: float64 (N, M), zero where nothing is listed, or None when
      no key repeats within a row and no bias is given
    """
    check_int("n_keys", n_keys, minimum=0)
    n_queries = np.asarray(indptr).shape[0] - 1
    indptr, indices = check_csr(indptr, indices, n_queries, n_keys)
    rows = csr_entry_rows(indptr)  # (nnz,)

    counts = np.zeros((n_queries, n_keys), dtype=np.int64)  # (N, M)
    np.add.at(counts, (rows, indices), 1)
    allowed = counts > 0  # (N, M)
    if bias is None:
        if counts.max(initial=0) <= 1:
            return allowed, None
        logit_bias = np.log(np.maximum(counts, 1).astype(np.float64))  # (N, M); log 1 = 0 elsewhere
        return allowed, logit_bias

    bias = _check_bias(bias, indices.shape[0], np.float64)
    cell_max = np.full((n_queries, n_keys), -np.inf)  # (N, M)
    np.maximum.at(cell_max, (rows, indices), bias)
    cell_sum = np.zeros((n_queries, n_keys))  # (N, M)
    np.add.at(cell_sum, (rows, indices), np.exp(bias - cell_max[rows, indices]))
    logit_bias = np.zeros((n_queries, n_keys))  # (N, M)
    logit_bias[allowed] = cell_max[allowed] + np.log(cell_sum[allowed])
    return allowed, logit_bias


def _check_bias(bias, nnz, dtype):
    if bias is None:
        return np.zeros(nnz, dtype=dtype)
    check_float_array("bias", bias)
    if bias.shape != (nnz,):
        raise ValueError(f"bias has shape {bias.shape}; expected one logit per listed pair, ({nnz},)")
    return np.ascontiguousarray(bias, dtype=dtype)


# --- NumPy reference (the readable twin of the compiled kernel) ------------


def _row_chunks(indptr, n_entries):
    """Yield (start, stop) row ranges holding about REFERENCE_CHUNK_ITEMS items each."""
    n_queries = indptr.shape[0] - 1
    budget = max(1, REFERENCE_CHUNK_ITEMS // max(1, n_entries))
    start = 0
    while start < n_queries:
        stop = int(np.searchsorted(indptr, indptr[start] + budget, side="right")) - 1
        stop = min(max(stop, start + 1), n_queries)
        yield start, stop
        start = stop


def _segment_reduce(ufunc, x, offsets, empty_value):
    """Reduce x (E, T, ...) over the segments offsets[r]:offsets[r+1] of axis 1 -> (E, R, ...).

    ``ufunc.reduceat`` returns x[start] for an empty segment, so empty
    segments are skipped and filled with empty_value.
    """
    counts = np.diff(offsets)
    shape = (x.shape[0], counts.shape[0]) + x.shape[2:]
    result = np.full(shape, empty_value, dtype=x.dtype)  # (E, R, ...)
    nonempty = counts > 0
    if np.any(nonempty):
        result[:, nonempty] = ufunc.reduceat(x, offsets[:-1][nonempty], axis=1)
    return result


def sparse_csr_forward_reference(q, k, v, indptr, indices, bias, scale):
    """Sparse attention on (E, N, D) arrays: the NumPy twin of the compiled kernel.

    Inputs: q (E, N, D), k (E, M, D), v (E, M, Dv), a checked int64 CSR
    pattern, bias (nnz,) of q's dtype, and the float scale.
    Returns (out (E, N, Dv), lse (E, N)); lse is -inf on empty rows.
    """
    n_entries, n_queries, _ = q.shape
    out = np.zeros((n_entries, n_queries, v.shape[-1]), dtype=q.dtype)  # (E, N, Dv)
    lse = np.full((n_entries, n_queries), -np.inf, dtype=q.dtype)  # (E, N)
    scale = q.dtype.type(scale)

    for start, stop in _row_chunks(indptr, n_entries):
        first, last = indptr[start], indptr[stop]
        offsets = indptr[start : stop + 1] - first  # (R + 1,) pair offsets within the chunk
        rows = csr_entry_rows(offsets)  # (T,) chunk-local query of each pair
        keys = indices[first:last]  # (T,)

        # 1. Scores of the listed pairs: s_t = scale * q_i . k_j + bias_t.
        q_pairs = q[:, start + rows]  # (E, T, D)
        k_pairs = k[:, keys]  # (E, T, D)
        scores = np.einsum("etd,etd->et", q_pairs, k_pairs) * scale + bias[first:last]  # (E, T)

        # 2. Row log-sum-exp and probabilities, stabilised by the row maximum.
        row_max = _segment_reduce(np.maximum, scores, offsets, 0.0)  # (E, R)
        shifted = np.exp(scores - row_max[:, rows])  # (E, T)
        row_sum = _segment_reduce(np.add, shifted, offsets, 0.0)  # (E, R)
        with np.errstate(divide="ignore"):
            row_lse = row_max + np.log(row_sum)  # (E, R), -inf on empty rows
        probs = np.exp(scores - row_lse[:, rows])  # (E, T)

        # 3. Output: probability-weighted sum of the listed values.
        weighted = probs[..., None] * v[:, keys]  # (E, T, Dv)
        out[:, start:stop] = _segment_reduce(np.add, weighted, offsets, 0.0)
        lse[:, start:stop] = row_lse
    return out, lse


def sparse_csr_backward_reference(dout, q, k, v, out, lse, indptr, indices, bias, scale):
    """Backward of sparse_csr_forward_reference on (E, N, D) arrays.

    Probabilities are recomputed from the saved lse. Returns (dq, dk, dv)
    with the shapes of q, k and v; dk and dv are scatter-added, so a key
    listed several times accumulates every contribution.
    """
    n_entries = q.shape[0]
    dq = np.zeros_like(q)  # (E, N, D)
    dk = np.zeros_like(k)  # (E, M, D)
    dv = np.zeros_like(v)  # (E, M, Dv)
    scale = q.dtype.type(scale)
    row_dot = np.sum(dout * out, axis=-1)  # Delta: (E, N)

    for start, stop in _row_chunks(indptr, n_entries):
        first, last = indptr[start], indptr[stop]
        offsets = indptr[start : stop + 1] - first
        rows = csr_entry_rows(offsets)  # (T,)
        query_rows = start + rows  # (T,) absolute query index
        keys = indices[first:last]  # (T,)
        q_pairs = q[:, query_rows]  # (E, T, D)
        k_pairs = k[:, keys]  # (E, T, D)
        dout_pairs = dout[:, query_rows]  # (E, T, Dv)

        # 2. Recompute p_t = exp(s_t - lse_i) (empty rows list no pairs).
        scores = np.einsum("etd,etd->et", q_pairs, k_pairs) * scale + bias[first:last]  # (E, T)
        probs = np.exp(scores - lse[:, query_rows])  # (E, T)

        # 3. o_i = sum_t p_t v_j: dv_j += p_t dO_i (scatter-add), dp_t = dO_i . v_j.
        np.add.at(dv.transpose(1, 0, 2), keys, (probs[..., None] * dout_pairs).transpose(1, 0, 2))
        dprobs = np.einsum("etd,etd->et", dout_pairs, v[:, keys])  # (E, T)

        # 2. p = softmax(s) within each row: ds_t = p_t (dp_t - Delta_i).
        dscores = probs * (dprobs - row_dot[:, query_rows])  # (E, T)

        # 1. s_t = scale * q_i . k_j + bias_t: dq_i += scale ds_t k_j, dk_j += scale ds_t q_i.
        dq[:, start:stop] = _segment_reduce(np.add, dscores[..., None] * k_pairs, offsets, 0.0) * scale
        np.add.at(dk.transpose(1, 0, 2), keys, (scale * dscores[..., None] * q_pairs).transpose(1, 0, 2))
    return dq, dk, dv


# --- public pair ---------------------------------------------------------------


def sparse_attention_forward(q, k, v, indptr, indices, *, bias=None, scale=None, backend=None):
    """Attention in which query i attends only the keys indices[indptr[i]:indptr[i+1]].

    Inputs:
    - q: queries (..., N, D); k: keys (..., M, D); v: values (..., M, Dv)
    - indptr: integer (N + 1,), indptr[0] = 0, non-decreasing, indptr[-1] = nnz
    - indices: integer (nnz,) keys in [0, M), non-decreasing within each row;
      a repeated key counts each time it is listed
    - bias: optional float (nnz,) logit added to each listed pair's score
    - scale: score scale, 1/sqrt(D) by default
    - backend: "numpy", "cython" or None for the default backend

    One pattern serves every leading (batch, head) entry. Returns (out, cache)
    with out (..., N, Dv); an empty row gives a zero output row.
    """
    check_attention_inputs(q, k, v)
    n_queries, n_keys, width = q.shape[-2], k.shape[-2], q.shape[-1]
    indptr, indices = check_csr(indptr, indices, n_queries, n_keys)
    bias = _check_bias(bias, indices.shape[0], q.dtype)
    if scale is None:
        scale = 1.0 / np.sqrt(width)
    check_real("scale", scale)
    module = resolve_backend(backend)

    leading = q.shape[:-2]
    q3 = np.ascontiguousarray(q.reshape((-1, n_queries, width)))  # (E, N, D)
    k3 = np.ascontiguousarray(k.reshape((-1, n_keys, width)))  # (E, M, D)
    v3 = np.ascontiguousarray(v.reshape((-1, n_keys, v.shape[-1])))  # (E, M, Dv)
    if module is None:
        out3, lse3 = sparse_csr_forward_reference(q3, k3, v3, indptr, indices, bias, float(scale))
    else:
        out3, lse3 = module.sparse_csr_forward(q3, k3, v3, indptr, indices, bias, float(scale))

    out = out3.reshape(leading + (n_queries, v.shape[-1]))  # (..., N, Dv)
    cache = (q3, k3, v3, out3, lse3, indptr, indices, bias, float(scale), module, leading)
    return out, cache


def sparse_attention_backward(dout, cache):
    """Backward of sparse_attention_forward: returns (dq, dk, dv).

    The cache contains q, k, v and out as (E, ., .) arrays, the row log-sum-exp
    lse (E, N), the pattern, bias, scale, backend and leading shape. The
    probabilities are recomputed from lse rather than stored.
    """
    q3, k3, v3, out3, lse3, indptr, indices, bias, scale, module, leading = cache
    check_float_array("dout", dout, min_ndim=2)
    if dout.shape != leading + out3.shape[1:]:
        raise ValueError(f"dout has shape {dout.shape}; expected the output shape {leading + out3.shape[1:]}")
    dout3 = np.ascontiguousarray(dout.reshape(out3.shape), dtype=q3.dtype)  # (E, N, Dv)
    if module is None:
        dq3, dk3, dv3 = sparse_csr_backward_reference(dout3, q3, k3, v3, out3, lse3, indptr, indices, bias, scale)
    else:
        dq3, dk3, dv3 = module.sparse_csr_backward(dout3, q3, k3, v3, out3, lse3, indptr, indices, bias, scale)
    return (
        dq3.reshape(leading + q3.shape[1:]),
        dk3.reshape(leading + k3.shape[1:]),
        dv3.reshape(leading + v3.shape[1:]),
    )


# --- one pattern per head, optionally restricted by a mask ---------------------


def multihead_sparse_forward(q, k, v, patterns, *, mask=None, scale=None, backend=None):
    """Sparse attention with one CSR pattern per head, restricted by an optional mask.

    Inputs:
    - q: (B, H, N, D); k: (B, H, M, D); v: (B, H, M, Dv)
    - patterns: H patterns, one per head, each (indptr, indices) or
      (indptr, indices, bias) as for sparse_attention_forward
    - mask: optional bool array broadcastable to (B, H, N, M); a listed pair
      (i, j) is dropped where mask[b, h, i, j] is False
    - scale, backend: as for sparse_attention_forward

    Heads run one at a time, each over the whole batch when the mask does not
    vary with the batch entry, and one batch entry at a time when it does.
    Returns (out (B, H, N, Dv), cache).
    """
    check_attention_inputs(q, k, v)
    if q.ndim != 4:
        raise ValueError(f"q has shape {q.shape}; expected (B, H, N, D)")
    batch, heads, n_queries, _ = q.shape
    n_keys = k.shape[-2]
    if len(patterns) != heads:
        raise ValueError(f"got {len(patterns)} patterns for H = {heads} heads; expected one per head")
    if mask is not None:
        check_mask(mask, (batch, heads, n_queries, n_keys))
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)

    out = np.zeros((batch, heads, n_queries, v.shape[-1]), dtype=q.dtype)  # (B, H, N, Dv)
    parts = []
    for head, pattern in enumerate(patterns):
        indptr, indices, bias = (tuple(pattern) + (None,))[:3]
        indptr, indices = check_csr(indptr, indices, n_queries, n_keys)
        per_batch = mask is not None and mask.shape[0] > 1
        batches = [slice(b, b + 1) for b in range(batch)] if per_batch else [slice(0, batch)]
        for rows in batches:
            sub_indptr, sub_indices, sub_bias = indptr, indices, bias
            if mask is not None:
                allowed = mask[rows.start if per_batch else 0, head if mask.shape[1] > 1 else 0]
                allowed = np.broadcast_to(allowed, (n_queries, n_keys))  # (N, M)
                keep = allowed[csr_entry_rows(indptr), indices]  # (nnz,)
                sub_indptr, sub_indices = csr_select(indptr, indices, keep)
                sub_bias = None if bias is None else np.asarray(bias)[keep]
            out[rows, head], part = sparse_attention_forward(
                q[rows, head], k[rows, head], v[rows, head], sub_indptr, sub_indices,
                bias=sub_bias, scale=scale, backend=backend,
            )
            parts.append((rows, head, sub_indptr, sub_indices, part))
    return out, (parts, q.shape, k.shape, v.shape, q.dtype)


def multihead_sparse_backward(dout, cache):
    """Backward of multihead_sparse_forward: returns (dq, dk, dv)."""
    parts, q_shape, k_shape, v_shape, dtype = cache
    check_upstream("dout", dout, q_shape[:3] + v_shape[3:])
    dq = np.zeros(q_shape, dtype=dtype)  # (B, H, N, D)
    dk = np.zeros(k_shape, dtype=dtype)  # (B, H, M, D)
    dv = np.zeros(v_shape, dtype=dtype)  # (B, H, M, Dv)
    for rows, head, _, _, part in parts:
        dq[rows, head], dk[rows, head], dv[rows, head] = sparse_attention_backward(
            np.ascontiguousarray(dout[rows, head]), part
        )
    return dq, dk, dv


def multihead_sparse_keys_seen(cache):
    """Return the bool (B, H, N, M) keys each query attended in a multihead_sparse_forward call."""
    parts, q_shape, k_shape, _, _ = cache
    seen = np.zeros(q_shape[:3] + (k_shape[2],), dtype=bool)  # (B, H, N, M)
    for rows, head, indptr, indices, _ in parts:
        allowed, _ = csr_to_dense(indptr, indices, k_shape[2])
        seen[rows, head] = allowed
    return seen
