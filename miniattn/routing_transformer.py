"""Routing attention (Roy et al., 2020): attend within online k-means clusters.

Letters: B batch, H heads, N queries, M keys, D head width, Dv value width,
Kc clusters, Wq queries and Wk keys per cluster, W local window (W = Wk).

Idea. Dense attention lets every query see every key. Routing attention
keeps Kc centroids mu_c on the unit sphere per head, routes queries and keys
to the centroids they are closest to, and lets a query attend only the keys
routed to the same cluster. With Kc = sqrt(N) clusters of sqrt(N) tokens the
cost falls from O(N^2 D) to O(N^1.5 D).

Routing. Every query and key is first normalised to unit length,
x_hat = x / ||x||, and scored against every centroid:

    score[i, c] = x_hat_i . mu_c                          (B, H, N, Kc)
    assignment(i) = argmax_c score[i, c]                  nearest centroid

Balanced routing does not use the assignment directly: each cluster c takes
its Wq highest-scoring queries Q_c and its Wk highest-scoring keys K_c
(default Wq = ceil(N / Kc), Wk = ceil(M / Kc)). Every cluster is therefore
full, and a token can belong to several clusters or to none. Ties in the
score go to the lower position. With routing="shared" (self-attention,
N == M) one index set per cluster, chosen by the query scores, serves as
both Q_c and K_c; routing="separate" chooses Q_c and K_c independently.

Attention inside cluster c, with Q_c and K_c kept in position order and a
causal mask by original positions, not by the order inside the cluster
(query i may attend key j when j <= i + M - N):

    O_c = softmax(q[Q_c] k[K_c]^T / sqrt(D), allowed_c) v[K_c]     (Wq, Dv)

Scatter back, with an exact mean over the clusters that selected query i:

    out_i = (1 / n_i) sum_{c : i in Q_c} O_c[i],   n_i = #{c : i in Q_c}
    out_i = 0 when n_i = 0 (a query routed nowhere)

Normalisation before attention. The official implementation (Google
Research, routing_transformer/utils.py) layer-normalises q and k (no learned
scale or shift) and attends the normalised vectors. Here that is the option
normalize_qk=True. The default, normalize_qk=False, attends the raw q and k
(routing still uses their directions), so that one cluster with Wq = N and
Wk = M is exactly dense attention and the method is a drop-in replacement
for it.

Online k-means (outside the gradient). After a step, each centroid moves
towards the mean of the unit vectors assigned to it, then returns to the
unit sphere:

    m_c   = mean of x_hat over the items with assignment c     (n_c items)
    mu_c' = decay * mu_c + (1 - decay) * m_c
    mu_c  <- mu_c' / ||mu_c'||

A cluster with no assigned item (n_c = 0), or whose mu_c' has norm below
eps, keeps its centroid, so no update divides by zero. Padded items are left
out of m_c and n_c.

Commitment loss. Routing is piecewise constant, so the only gradient that
pulls q and k towards their centroids is the commitment loss

    L_commit = beta * mean_i || x_hat_i - SG(mu_{assignment(i)}) ||^2

(SG: the centroid is a constant), which the training loss adds.

Local heads. As in the official implementation, which runs local_num_heads
local heads beside sparsity_cluster_num_heads routing heads, some heads can
attend a sliding window of W keys instead of routing. With query i at
position p = i + M - N, causal heads see positions p - W + 1 .. p, and
bidirectional heads see W positions centred on p.

Backward. Assignments, index sets and the mean divisor n_i are constants:

    dO_c[a] = dout[Q_c[a]] / n_{Q_c[a]}             gather
    (dq_c, dk_c, dv_c) = attention backward inside cluster c
    dq[Q_c] += dq_c,  dk[K_c] += dk_c,  dv[K_c] += dv_c   scatter-add

A token in several clusters receives the sum of its gradients (scatter-add
accumulates duplicate indices).

Complexity per head: routing O((N + M) Kc D) and the top-k selection
O((N + M) Kc); attention O(Kc Wq Wk D), which is O(N^1.5 D)
for N = M and Kc = sqrt(N). Memory O(Kc Wq Wk) for the in-cluster
probabilities.
"""

import math

import numpy as np

from .core import kernels
from .core.validate import (
    check_attention_inputs,
    check_choice,
    check_float_array,
    check_generator,
    check_int,
    check_mask,
    check_real,
    check_upstream,
)
from .nn.functional import layer_norm_backward, layer_norm_forward
from .transformer import attention_backward, attention_forward

ROUTINGS = ("separate", "shared")

# Largest allowed | ||mu_c|| - 1 | for centroids passed in by a caller.
UNIT_NORM_TOLERANCE = 1e-4


# --- unit vectors and centroids ---------------------------------------------------


def unit_rows(x):
    """Return (x / ||x||, ||x||) over the last axis; a zero row stays zero.

    The norm is floored at the smallest positive float, so a zero row gives
    0 / tiny = 0 and never NaN.
    """
    norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))  # (..., 1)
    norm = np.maximum(norm, np.finfo(x.dtype).tiny)
    return x / norm, norm


def init_centroids(rng, n_heads, n_clusters, width, *, dtype=np.float64):
    """Draw Kc centroids per head uniformly on the unit sphere: (H, Kc, D)."""
    check_generator("rng", rng)
    check_int("n_heads", n_heads, minimum=1)
    check_int("n_clusters", n_clusters, minimum=1)
    check_int("width", width, minimum=1)
    gaussian = rng.standard_normal((n_heads, n_clusters, width))  # (H, Kc, D)
    centroids, _ = unit_rows(gaussian)
    return centroids.astype(dtype)


def check_centroids(centroids, n_heads, width, dtype=None):
    """Check centroids (H, Kc, D): float, finite, Kc >= 1, unit rows, matching shape."""
    check_float_array("centroids", centroids, min_ndim=1)
    if centroids.ndim != 3 or centroids.shape[0] != n_heads or centroids.shape[2] != width:
        raise ValueError(
            f"centroids has shape {centroids.shape}; expected (H, Kc, D) = ({n_heads}, Kc, {width})"
        )
    if centroids.shape[1] < 1:
        raise ValueError(f"centroids has {centroids.shape[1]} clusters; expected a cluster count >= 1")
    if dtype is not None and centroids.dtype != dtype:
        raise TypeError(f"centroids has dtype {centroids.dtype}; expected {dtype} to match q")
    norms = np.sqrt(np.sum(centroids.astype(np.float64) ** 2, axis=-1))  # (H, Kc)
    worst = float(np.max(np.abs(norms - 1.0)))
    if worst > UNIT_NORM_TOLERANCE:
        raise ValueError(
            f"centroids must have unit norm, but a norm differs from 1 by {worst:.3g}; "
            f"normalise them with unit_rows(centroids)[0]"
        )


def routing_scores(x_unit, centroids):
    """Cosine scores of unit vectors x_unit (B, H, L, D) against centroids (H, Kc, D)."""
    return x_unit @ np.swapaxes(centroids, -1, -2)[None]  # (B,H,L,D) @ (1,H,D,Kc) -> (B,H,L,Kc)


def nearest_centroids(x, centroids):
    """Return the index of the nearest centroid of every row of x (B, H, L, D): (B, H, L).

    For unit vectors the nearest centroid in Euclidean distance is the one with
    the largest dot product. Ties go to the lower centroid index.
    """
    x_unit, _ = unit_rows(x)
    return np.argmax(routing_scores(x_unit, centroids), axis=-1)  # (B, H, L)


def select_top_tokens(scores, window):
    """Balanced routing: the `window` highest-scoring positions of every cluster.

    Inputs:
    - scores: (B, H, L, Kc) cosine scores
    - window: tokens per cluster, 1 <= window <= L

    Returns index (B, H, Kc, window) of positions, ascending within each
    cluster. Equal scores go to the lower position. A partial sort finds the
    window-th largest score t in O(L) per cluster. Every score above t is
    taken, and the positions scoring exactly t fill the remaining places in
    position order.
    """
    per_cluster = np.swapaxes(scores, -1, -2)  # (B, H, Kc, L)
    length = per_cluster.shape[-1]
    threshold = -np.partition(-per_cluster, window - 1, axis=-1)[..., window - 1 : window]  # (B, H, Kc, 1)
    above = per_cluster > threshold  # (B, H, Kc, L)
    tied = per_cluster == threshold  # (B, H, Kc, L)
    places_left = window - above.sum(axis=-1, keepdims=True)  # (B, H, Kc, 1), at least 1
    if np.any(tied.sum(axis=-1, keepdims=True) > places_left):
        tied &= np.cumsum(tied, axis=-1) <= places_left  # the first tied positions only
    selected = above | tied  # exactly `window` per row
    _, positions = np.nonzero(selected.reshape(-1, length))  # row-major: ascending within each row
    return positions.reshape(per_cluster.shape[:-1] + (window,))  # (B, H, Kc, window)


# --- gathers and scatters over (B, H) ----------------------------------------------


def _flat_rows(index, length):
    """Turn per-(b, h) positions (B, H, ...) into row numbers of a (B*H*length, D) array."""
    batch, heads = index.shape[:2]
    offsets = (np.arange(batch * heads, dtype=np.int64) * length).reshape((batch, heads) + (1,) * (index.ndim - 2))
    return (index + offsets).ravel()


def gather_tokens(x, index, *, backend=None):
    """Return x[b, h, index[b, h, ...]]: (B, H, L, D) gathered to index.shape + (D,)."""
    batch, heads, length, width = x.shape
    rows = kernels.gather_rows(x.reshape(-1, width), _flat_rows(index, length), backend=backend)
    return rows.reshape(index.shape + (width,))


def scatter_add_tokens(values, index, length, *, backend=None):
    """Backward of gather_tokens: add values (index.shape + (D,)) back into (B, H, length, D).

    Positions that appear several times in index accumulate (scatter-add).
    """
    batch, heads = index.shape[:2]
    width = values.shape[-1]
    rows = kernels.scatter_add_rows(
        values.reshape(-1, width), _flat_rows(index, length), batch * heads * length, backend=backend
    )
    return rows.reshape(batch, heads, length, width)


def _gather_mask(mask, query_index, key_index, full_shape):
    """Gather mask[b, h, Q_c, K_c] for every cluster: (B, H, Kc, Wq, Wk), or (B, H, Kc, 1, Wk).

    A mask that is the same for every query (a key padding mask such as
    (B, 1, 1, M)) only needs its key columns gathered. A general mask has its
    query rows gathered whole first, which costs Kc * Wq * M booleans per head.
    """
    batch, heads = full_shape[:2]
    b = np.arange(batch)[:, None, None, None]
    h = np.arange(heads)[None, :, None, None]
    if np.ndim(mask) < 2 or np.shape(mask)[-2] == 1:
        key_rows = np.broadcast_to(mask, full_shape[:2] + (1, full_shape[3]))[:, :, 0]  # (B, H, M)
        return key_rows[b, h, key_index][..., None, :]  # (B, H, Kc, 1, Wk)
    full = np.broadcast_to(mask, full_shape)  # (B, H, N, M), a view
    rows = full[b, h, query_index]  # (B, H, Kc, Wq, M)
    columns = np.broadcast_to(key_index[..., None, :], query_index.shape + key_index.shape[-1:])
    return np.take_along_axis(rows, columns, axis=-1)  # (B, H, Kc, Wq, Wk)


# --- routing ------------------------------------------------------------------------


def default_windows(n_queries, n_keys, n_clusters):
    """Return the default (Wq, Wk) = (ceil(N / Kc), ceil(M / Kc))."""
    return math.ceil(n_queries / n_clusters), math.ceil(n_keys / n_clusters)


def _check_index(name, index, expected_shape, length):
    if not isinstance(index, np.ndarray) or not np.issubdtype(index.dtype, np.integer):
        raise TypeError(f"{name} must be an integer numpy.ndarray, got {type(index).__name__}")
    if index.shape != expected_shape:
        raise ValueError(f"{name} has shape {index.shape}; expected (B, H, Kc, W) = {expected_shape}")
    if index.size and (index.min() < 0 or index.max() >= length):
        raise ValueError(f"{name} must lie in [0, {length}), got values from {index.min()} to {index.max()}")
    if np.any(np.diff(index, axis=-1) <= 0):
        raise ValueError(f"{name} must be strictly increasing within each cluster (sorted, no repeats)")


def route(query_scores, key_scores, *, query_window, key_window, routing="separate"):
    """Choose the query and key index sets of every cluster.

    Inputs:
    - query_scores (B, H, N, Kc), key_scores (B, H, M, Kc): cosine scores of
      the unit-length queries and keys against the centroids
    - query_window Wq; key_window Wk
    - routing: "separate" (keys chosen by key scores) or "shared" (the query
      index sets serve as key index sets; needs N == M and Wq == Wk)

    Returns (query_index (B, H, Kc, Wq), key_index (B, H, Kc, Wk)).
    """
    query_index = select_top_tokens(query_scores, query_window)  # (B, H, Kc, Wq)
    if routing == "shared":
        return query_index, query_index
    key_index = select_top_tokens(key_scores, key_window)  # (B, H, Kc, Wk)
    return query_index, key_index


# --- routing attention -----------------------------------------------------------------


def routing_attention_forward(
    q,
    k,
    v,
    centroids,
    *,
    causal=False,
    mask=None,
    scale=None,
    query_window=None,
    key_window=None,
    routing="separate",
    normalize_qk=False,
    query_index=None,
    key_index=None,
    backend=None,
):
    """Attention of each query to the keys routed to the same k-means clusters.

    Inputs:
    - q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv)
    - centroids: (H, Kc, D) unit-norm centroids, 1 <= Kc <= min(N, M)
    - causal: mask keys by original positions, bottom-right aligned
      (query i may attend key j when j <= i + M - N)
    - mask: optional bool array broadcastable to (B, H, N, M)
    - scale: score scale, 1/sqrt(D) by default
    - query_window Wq, key_window Wk: tokens per cluster, ceil(N / Kc) and
      ceil(M / Kc) by default
    - routing: "separate" or "shared" (see route)
    - normalize_qk: layer-normalise q and k (no scale or shift) and attend the
      normalised vectors, as the official implementation does
    - query_index, key_index: frozen index sets (B, H, Kc, Wq) and
      (B, H, Kc, Wk), positions strictly increasing in each cluster. When
      they are given, the routing is not recomputed, which gradient checks need.
    - backend: kernel backend for the gathers and scatters

    Returns (out, cache):
    - out: (B, H, N, Dv); a query routed to no cluster, or with no allowed key
      in any of its clusters, gets a zero row
    - cache: see routing_attention_backward; cache["query_index"],
      cache["key_index"], cache["query_assignment"] and
      cache["key_assignment"] show the routing
    """
    check_attention_inputs(q, k, v)
    if q.ndim != 4:
        raise ValueError(f"q has shape {q.shape}; routing attention expects (B, H, N, D)")
    batch, heads, n_queries, width = q.shape
    n_keys = k.shape[-2]
    check_centroids(centroids, heads, width, q.dtype)
    n_clusters = centroids.shape[1]
    if n_clusters > min(n_queries, n_keys):
        raise ValueError(
            f"centroids has Kc={n_clusters} clusters; expected a cluster count between 1 and "
            f"min(N, M) = {min(n_queries, n_keys)} (N={n_queries} queries, M={n_keys} keys)"
        )
    check_choice("routing", routing, ROUTINGS)
    default_query_window, default_key_window = default_windows(n_queries, n_keys, n_clusters)
    query_window = default_query_window if query_window is None else query_window
    key_window = default_key_window if key_window is None else key_window
    check_int("query_window", query_window, minimum=1, maximum=n_queries)
    check_int("key_window", key_window, minimum=1, maximum=n_keys)
    if routing == "shared" and (n_queries != n_keys or query_window != key_window):
        raise ValueError(
            f"routing='shared' uses one index set for queries and keys, so it needs N == M and "
            f"query_window == key_window; got N={n_queries}, M={n_keys}, "
            f"query_window={query_window}, key_window={key_window}"
        )
    scores_shape = (batch, heads, n_queries, n_keys)
    if mask is not None:
        check_mask(mask, scores_shape)
    if scale is None:
        scale = 1.0 / np.sqrt(width)
    check_real("scale", scale)
    if (query_index is None) != (key_index is None):
        raise ValueError(
            "only one of query_index and key_index was given; pass both to freeze the routing, or neither"
        )

    # 1. Optional layer normalisation: the attended queries and keys.
    norm_caches = None
    if normalize_qk:
        q_attended, q_norm_cache = layer_norm_forward(q)  # (B, H, N, D)
        k_attended, k_norm_cache = layer_norm_forward(k)  # (B, H, M, D)
        norm_caches = (q_norm_cache, k_norm_cache)
    else:
        q_attended, k_attended = q, k

    # 2. Routing (a constant for the backward): nearest centroids and balanced index sets.
    q_unit, _ = unit_rows(q_attended)  # (B, H, N, D)
    k_unit, _ = unit_rows(k_attended)  # (B, H, M, D)
    query_scores = routing_scores(q_unit, centroids)  # (B, H, N, Kc)
    key_scores = routing_scores(k_unit, centroids)  # (B, H, M, Kc)
    query_assignment = np.argmax(query_scores, axis=-1)  # (B, H, N)
    key_assignment = np.argmax(key_scores, axis=-1)  # (B, H, M)
    # NOTE: the top-Wq/Wk choice ranks the whole sequence, so with causal=True a
    # later token can still push an earlier one out of a cluster. Outputs are
    # causal given the routing, not through it (the official code does the same).
    if query_index is None:
        query_index, key_index = route(
            query_scores, key_scores, query_window=query_window, key_window=key_window, routing=routing
        )
    else:
        _check_index("query_index", query_index, (batch, heads, n_clusters, query_window), n_queries)
        _check_index("key_index", key_index, (batch, heads, n_clusters, key_window), n_keys)

    # 3. Gather each cluster's queries, keys and values.
    q_clustered = gather_tokens(q_attended, query_index, backend=backend)  # (B, H, Kc, Wq, D)
    k_clustered = gather_tokens(k_attended, key_index, backend=backend)  # (B, H, Kc, Wk, D)
    v_clustered = gather_tokens(v, key_index, backend=backend)  # (B, H, Kc, Wk, Dv)

    # 4. Attention inside each cluster, masked by original positions.
    allowed = None
    if causal:
        query_position = query_index[..., :, None] + (n_keys - n_queries)  # (B, H, Kc, Wq, 1)
        allowed = key_index[..., None, :] <= query_position  # (B, H, Kc, Wq, Wk)
    if mask is not None:
        gathered = _gather_mask(mask, query_index, key_index, scores_shape)  # (B, H, Kc, Wq, Wk)
        allowed = gathered if allowed is None else allowed & gathered
    out_clustered, attention_cache = attention_forward(
        q_clustered, k_clustered, v_clustered, mask=allowed, scale=scale
    )  # (B, H, Kc, Wq, Dv)

    # 5. Scatter back and average over the clusters that selected each query.
    counts = np.bincount(_flat_rows(query_index, n_queries), minlength=batch * heads * n_queries)
    counts = counts.reshape(batch, heads, n_queries)  # (B, H, N): n_i, clusters that selected query i
    summed = scatter_add_tokens(out_clustered, query_index, n_queries, backend=backend)  # (B, H, N, Dv)
    divisor = np.maximum(counts, 1).astype(q.dtype)[..., None]  # (B, H, N, 1); n_i = 0 rows are already 0
    out = summed / divisor  # (B, H, N, Dv)

    cache = {
        "query_index": query_index,
        "key_index": key_index,
        "query_assignment": query_assignment,
        "key_assignment": key_assignment,
        "q_unit": q_unit,
        "k_unit": k_unit,
        "counts": counts,
        "divisor": divisor,
        "out_shape": out.shape,
        "allowed": allowed,
        "attention_cache": attention_cache,
        "norm_caches": norm_caches,
        "shapes": (n_queries, n_keys),
        "routing": routing,
        "backend": backend,
    }
    return out, cache


def routing_attention_backward(dout, cache):
    """Backward of routing_attention_forward: returns (dq, dk, dv).

    The cache contains the index sets, the per-query divisor n_i, the
    in-cluster attention cache (probabilities included) and the layer-norm
    caches when normalize_qk was set. Nothing is recomputed, and the routing
    is a constant.
    """
    check_upstream("dout", dout, cache["out_shape"])
    query_index = cache["query_index"]
    key_index = cache["key_index"]
    n_queries, n_keys = cache["shapes"]
    backend = cache["backend"]

    # 5. out = scatter_add(out_clustered, Q_c) / n_i: gather the scaled upstream gradient.
    dout_clustered = gather_tokens(dout / cache["divisor"], query_index, backend=backend)  # (B, H, Kc, Wq, Dv)

    # 4. out_clustered = attention(q_clustered, k_clustered, v_clustered)
    dq_clustered, dk_clustered, dv_clustered = attention_backward(dout_clustered, cache["attention_cache"])

    # 3. Gathers: scatter-add back; a token in several clusters accumulates.
    dq = scatter_add_tokens(dq_clustered, query_index, n_queries, backend=backend)  # (B, H, N, D)
    dk = scatter_add_tokens(dk_clustered, key_index, n_keys, backend=backend)  # (B, H, M, D)
    dv = scatter_add_tokens(dv_clustered, key_index, n_keys, backend=backend)  # (B, H, M, Dv)

    # 2. Routing is piecewise constant: no gradient.

    # 1. q_attended = layer_norm(q), k_attended = layer_norm(k)
    if cache["norm_caches"] is not None:
        q_norm_cache, k_norm_cache = cache["norm_caches"]
        dq = layer_norm_backward(dq, q_norm_cache)[0]
        dk = layer_norm_backward(dk, k_norm_cache)[0]
    return dq, dk, dv


def routing_keys_seen(cache):
    """Return the bool (B, H, N, M) set of keys each query attended in some cluster."""
    query_index, key_index = cache["query_index"], cache["key_index"]
    n_queries, n_keys = cache["shapes"]
    batch, heads, n_clusters, query_window = query_index.shape
    key_window = key_index.shape[-1]
    seen = np.zeros((batch, heads, n_queries, n_keys), dtype=bool)  # (B, H, N, M)
    shape = (batch, heads, n_clusters, query_window, key_window)
    allowed = np.ones(shape, dtype=bool) if cache["allowed"] is None else np.broadcast_to(cache["allowed"], shape)
    b = np.broadcast_to(np.arange(batch)[:, None, None, None, None], shape)
    h = np.broadcast_to(np.arange(heads)[None, :, None, None, None], shape)
    rows = np.broadcast_to(query_index[..., :, None], shape)
    columns = np.broadcast_to(key_index[..., None, :], shape)
    # Setting True twice is harmless, so plain fancy assignment is correct here.
    seen[b[allowed], h[allowed], rows[allowed], columns[allowed]] = True
    return seen


# --- local (sliding-window) attention for the local heads -------------------------------


def local_window_index(n_queries, n_keys, window, causal):
    """Return (index (N, W), valid (N, W)): the keys of each query's sliding window.

    Query i sits at position p = i + M - N. A causal window contains positions
    p - W + 1 .. p, and a bidirectional one p - (W - 1) // 2 .. p + W // 2.
    Positions outside [0, M) are clipped in index and marked invalid.
    """
    position = np.arange(n_queries)[:, None] + (n_keys - n_queries)  # (N, 1)
    first = position - (window - 1) if causal else position - (window - 1) // 2  # (N, 1)
    keys = first + np.arange(window)[None, :]  # (N, W)
    valid = (keys >= 0) & (keys < n_keys)
    return np.clip(keys, 0, n_keys - 1), valid


def local_attention_forward(q, k, v, *, window, causal=False, mask=None, scale=None, backend=None):
    """Sliding-window attention of W keys per query (the local heads).

    Inputs: q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv); window W >= 1;
    causal; mask broadcastable to (B, H, N, M); scale (1/sqrt(D) by default).
    Returns (out (B, H, N, Dv), cache).
    """
    check_attention_inputs(q, k, v)
    if q.ndim != 4:
        raise ValueError(f"q has shape {q.shape}; local attention expects (B, H, N, D)")
    batch, heads, n_queries, width = q.shape
    n_keys = k.shape[-2]
    check_int("window", window, minimum=1)
    scores_shape = (batch, heads, n_queries, n_keys)
    if mask is not None:
        check_mask(mask, scores_shape)

    # 1. The window of key positions of every query.
    keys, valid = local_window_index(n_queries, n_keys, window, causal)  # (N, W)
    key_index = np.broadcast_to(keys, (batch, heads) + keys.shape)  # (B, H, N, W)
    allowed = np.broadcast_to(valid[:, None, :], (batch, heads, n_queries, 1, window))  # (B, H, N, 1, W)
    if mask is not None:
        rows = np.broadcast_to(mask, scores_shape)  # (B, H, N, M)
        gathered = np.take_along_axis(rows, key_index, axis=-1)[..., None, :]  # (B, H, N, 1, W)
        allowed = allowed & gathered

    # 2. Gather the window keys and values.
    k_window = gather_tokens(k, key_index, backend=backend)  # (B, H, N, W, D)
    v_window = gather_tokens(v, key_index, backend=backend)  # (B, H, N, W, Dv)

    # 3. Each query attends its own window: one-row attention per query.
    out, attention_cache = attention_forward(
        q[..., None, :], k_window, v_window, mask=allowed, scale=scale
    )  # (B, H, N, 1, Dv)
    cache = (key_index, allowed, attention_cache, n_keys, backend)
    return out[..., 0, :], cache


def local_attention_backward(dout, cache):
    """Backward of local_attention_forward: returns (dq, dk, dv)."""
    key_index, _, attention_cache, n_keys, backend = cache

    # 3. out = attention(q, k_window, v_window) row by row
    dq, dk_window, dv_window = attention_backward(dout[..., None, :], attention_cache)

    # 2. Window gathers: scatter-add (neighbouring windows overlap).
    dk = scatter_add_tokens(dk_window, key_index, n_keys, backend=backend)  # (B, H, M, D)
    dv = scatter_add_tokens(dv_window, key_index, n_keys, backend=backend)  # (B, H, M, Dv)
    return dq[..., 0, :], dk, dv


def local_keys_seen(cache, n_queries):
    """Return the bool (B, H, N, M) set of keys in each query's window."""
    key_index, allowed, _, n_keys, _ = cache
    batch, heads = key_index.shape[:2]
    seen = np.zeros((batch, heads, n_queries, n_keys), dtype=bool)  # (B, H, N, M)
    np.put_along_axis(seen, key_index, allowed[..., 0, :], axis=-1)
    return seen


# --- online k-means -----------------------------------------------------------------------


def update_centroids(centroids, vectors, assignments, *, decay=0.999, eps=1e-6, valid=None):
    """Move each centroid towards the mean direction of its items (one online k-means step).

    Inputs:
    - centroids: (H, Kc, D) unit-norm centroids
    - vectors: (B, H, L, D) routed vectors (normalised to unit length here)
    - assignments: (B, H, L) int nearest-centroid indices in [0, Kc)
    - decay: the EMA decay, 0 < decay < 1 (0.999 in the references)
    - eps: a centroid whose moving average has norm below eps keeps its value
    - valid: optional bool (B, H, L) or broadcastable; False items (padding)
      do not move any centroid

    Returns the new centroids (H, Kc, D). A cluster with no valid item keeps
    its centroid. The update is not part of any gradient: call it after the
    backward, with the routing the forward used.
    """
    check_float_array("vectors", vectors, min_ndim=4)
    if vectors.ndim != 4:
        raise ValueError(f"vectors has shape {vectors.shape}; expected (B, H, L, D)")
    check_centroids(centroids, vectors.shape[1], vectors.shape[3])
    check_real("decay", decay, minimum=0.0, maximum=1.0, open_interval=True)
    check_real("eps", eps, minimum=0.0)
    n_clusters = centroids.shape[1]
    assignments = np.asarray(assignments)
    if assignments.shape != vectors.shape[:3] or not np.issubdtype(assignments.dtype, np.integer):
        raise ValueError(
            f"assignments has shape {assignments.shape} and dtype {assignments.dtype}; "
            f"expected integers of shape {vectors.shape[:3]}"
        )
    if assignments.size and (assignments.min() < 0 or assignments.max() >= n_clusters):
        raise ValueError(f"assignments must lie in [0, {n_clusters}), got {assignments.min()} to {assignments.max()}")
    weight = np.ones(vectors.shape[:3], dtype=vectors.dtype)  # (B, H, L)
    if valid is not None:
        weight = weight * np.broadcast_to(valid, vectors.shape[:3])

    # 1. Batch statistics: how many valid items each cluster got and their unit-vector sum.
    x_unit, _ = unit_rows(vectors)  # (B, H, L, D)
    one_hot = (assignments[..., None] == np.arange(n_clusters)) * weight[..., None]  # (B, H, L, Kc)
    counts = one_hot.sum(axis=(0, 2))  # (H, Kc)
    sums = np.einsum("bhlk,bhld->hkd", one_hot, x_unit)  # (H, Kc, D)

    # 2. Exponential moving average towards the batch means.
    means = sums / np.maximum(counts, 1)[..., None]  # (H, Kc, D)
    moved = decay * centroids + (1.0 - decay) * means  # (H, Kc, D)

    # 3. Back onto the unit sphere; empty or degenerate clusters keep their centroid.
    norms = np.sqrt(np.sum(moved * moved, axis=-1, keepdims=True))  # (H, Kc, 1)
    keep = (counts[..., None] == 0) | (norms < eps) | (norms == 0)
    return np.where(keep, centroids, moved / np.where(keep, 1.0, norms)).astype(centroids.dtype)


# --- commitment loss -----------------------------------------------------------------------


def commitment_loss_forward(x, centroids, *, beta=1e-4, assignments=None, valid=None):
    """Commitment loss beta * mean_i ||x_hat_i - SG(mu_{c(i)})||^2 of routed vectors.

    Inputs:
    - x: (B, H, L, D) routed vectors; x_hat = x / ||x|| is what is compared
    - centroids: (H, Kc, D), a constant (SG: stop-gradient)
    - beta: loss weight (1e-4 in the references)
    - assignments: optional (B, H, L) cluster of each item; the nearest
      centroids by default
    - valid: optional bool (B, H, L), broadcastable; the mean runs over valid items

    Returns (loss, cache), loss a Python float (0.0 when no item is valid).
    """
    check_float_array("x", x, min_ndim=4)
    if x.ndim != 4:
        raise ValueError(f"x has shape {x.shape}; expected (B, H, L, D)")
    check_centroids(centroids, x.shape[1], x.shape[3])
    check_real("beta", beta, minimum=0.0)
    if assignments is None:
        assignments = nearest_centroids(x, centroids)  # (B, H, L)
    weight = np.ones(x.shape[:3], dtype=x.dtype)  # (B, H, L)
    if valid is not None:
        weight = weight * np.broadcast_to(valid, x.shape[:3])
    n_items = max(float(weight.sum()), 1.0)

    # 1. Unit vectors.
    x_unit, norm = unit_rows(x)  # (B, H, L, D), (B, H, L, 1)

    # 2. Difference to the assigned centroid (a constant).
    heads = np.arange(x.shape[1])[None, :, None]
    assigned = centroids[heads, assignments]  # (B, H, L, D)
    difference = x_unit - assigned  # (B, H, L, D)

    # 3. Weighted mean of the squared distances.
    squared = np.sum(difference * difference, axis=-1)  # (B, H, L)
    loss = beta * float(np.sum(squared * weight)) / n_items
    return loss, (x_unit, norm, difference, weight, n_items, beta)


def commitment_loss_backward(dloss, cache):
    """Backward of commitment_loss_forward: returns dx (B, H, L, D).

    With g = d loss / d x_hat, the unit normalisation x_hat = x / ||x|| gives
    dx = (g - x_hat (x_hat . g)) / ||x||.
    """
    x_unit, norm, difference, weight, n_items, beta = cache

    # 3. loss = beta * sum(w * ||difference||^2) / n_items
    # 2. difference = x_hat - SG(mu): the centroid gets no gradient.
    dx_unit = (2.0 * beta * float(dloss) / n_items) * weight[..., None] * difference  # (B, H, L, D)

    # 1. x_hat = x / ||x||
    radial = np.sum(x_unit * dx_unit, axis=-1, keepdims=True)  # (B, H, L, 1)
    return (dx_unit - x_unit * radial) / norm


# --- the method object --------------------------------------------------------------------


def _heads_of(mask, start, stop):
    """Return heads start..stop of a 4-D mask, or the mask itself when it broadcasts over heads."""
    if mask is None or mask.shape[1] == 1:
        return mask
    return mask[:, start:stop]


class RoutingAttention:
    """Routing attention method object; it keeps the centroids of its routing heads.

    The first `local_heads` heads attend a sliding window of W = Wk keys; the
    other heads route through online k-means. The centroids (H - local_heads,
    Kc, D) are drawn from rng on the first forward, when H and D are known,
    unless they are passed in; Kc is n_clusters, or round(sqrt(N)) of that
    first call. Later forwards never change them: call update_centroids(cache)
    after a training step, and add commitment_forward's loss to the training
    loss.

    Options: n_clusters, centroids, query_window, key_window, routing
    ("separate" or "shared"), normalize_qk, local_heads, decay, eps, beta,
    scale and backend, as described in routing_attention_forward,
    update_centroids and commitment_loss_forward.
    """

    name = "routing_transformer"

    def __init__(
        self,
        *,
        rng=None,
        n_clusters=None,
        centroids=None,
        query_window=None,
        key_window=None,
        routing="separate",
        normalize_qk=False,
        local_heads=0,
        decay=0.999,
        eps=1e-6,
        beta=1e-4,
        scale=None,
        backend=None,
    ):
        # NOTE: without an rng the centroids come from a fixed seed (0), so two
        # objects built alike route alike; pass rng for independent draws.
        self.rng = np.random.default_rng(0) if rng is None else rng
        check_generator("rng", self.rng)
        if n_clusters is not None:
            check_int("n_clusters", n_clusters, minimum=1)
        if centroids is not None:
            check_float_array("centroids", centroids, min_ndim=3)
            if centroids.ndim != 3:
                raise ValueError(f"centroids has shape {centroids.shape}; expected (H, Kc, D)")
            if n_clusters is not None and centroids.shape[1] != n_clusters:
                raise ValueError(
                    f"centroids has {centroids.shape[1]} clusters but n_clusters={n_clusters}; "
                    f"pass one of them or make them agree"
                )
        for name, window in (("query_window", query_window), ("key_window", key_window)):
            if window is not None:
                check_int(name, window, minimum=1)
        check_choice("routing", routing, ROUTINGS)
        check_int("local_heads", local_heads, minimum=0)
        check_real("decay", decay, minimum=0.0, maximum=1.0, open_interval=True)
        check_real("eps", eps, minimum=0.0)
        check_real("beta", beta, minimum=0.0)
        if scale is not None:
            check_real("scale", scale)

        self.n_clusters = n_clusters
        self.centroids = None if centroids is None else np.array(centroids, copy=True)
        self.query_window = query_window
        self.key_window = key_window
        self.routing = routing
        self.normalize_qk = normalize_qk
        self.local_heads = local_heads
        self.decay = decay
        self.eps = eps
        self.beta = beta
        self.scale = scale
        self.backend = backend

    def _ensure_centroids(self, q, n_keys):
        """Draw the centroids on first use; afterwards check they fit q."""
        routing_heads = q.shape[1] - self.local_heads
        if self.centroids is None:
            n_clusters = self.n_clusters
            if n_clusters is None:
                n_clusters = max(1, min(round(math.sqrt(q.shape[2])), q.shape[2], n_keys))
            self.centroids = init_centroids(self.rng, routing_heads, n_clusters, q.shape[3], dtype=q.dtype)
            self.n_clusters = n_clusters
        check_centroids(self.centroids, routing_heads, q.shape[3])
        if self.centroids.dtype != q.dtype:
            raise TypeError(
                f"the centroids are {self.centroids.dtype} but q is {q.dtype}; "
                f"use one dtype per method object"
            )

    def _local_window(self, n_queries, n_keys):
        n_clusters = self.n_clusters if self.centroids is None else self.centroids.shape[1]
        if self.key_window is not None:
            return self.key_window
        return default_windows(n_queries, n_keys, n_clusters)[1]

    def forward(self, q, k, v, *, mask=None, causal=False):
        check_attention_inputs(q, k, v)
        if q.ndim != 4:
            raise ValueError(f"q has shape {q.shape}; expected (B, H, N, D)")
        batch, heads, n_queries, _ = q.shape
        n_keys = k.shape[-2]
        check_int("local_heads", self.local_heads, maximum=heads)
        if mask is not None:
            check_mask(mask, (batch, heads, n_queries, n_keys))
            mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # 4-D, still broadcastable
        n_local = self.local_heads
        if heads > n_local:
            self._ensure_centroids(q, n_keys)
        elif self.n_clusters is None:
            self.n_clusters = max(1, min(round(math.sqrt(n_queries)), n_queries, n_keys))
        window = self._local_window(n_queries, n_keys)
        outputs, cache = [], {"n_local": n_local, "n_queries": n_queries, "local": None, "routing": None}

        # Local heads: a sliding window of W keys.
        if n_local:
            local_mask = _heads_of(mask, 0, n_local)
            out_local, cache["local"] = local_attention_forward(
                q[:, :n_local], k[:, :n_local], v[:, :n_local], window=window, causal=causal,
                mask=local_mask, scale=self.scale, backend=self.backend,
            )  # (B, H_local, N, Dv)
            outputs.append(out_local)

        # Routing heads: online k-means clusters.
        if heads > n_local:
            routing_mask = _heads_of(mask, n_local, heads)
            out_routing, cache["routing"] = routing_attention_forward(
                q[:, n_local:], k[:, n_local:], v[:, n_local:], self.centroids, causal=causal,
                mask=routing_mask, scale=self.scale, query_window=self.query_window,
                key_window=self.key_window, routing=self.routing, normalize_qk=self.normalize_qk,
                backend=self.backend,
            )  # (B, H - H_local, N, Dv)
            # Padding: a query that may attend no key, or a key no query may attend,
            # does not move the centroids.
            cache["query_valid"], cache["key_valid"] = None, None
            if routing_mask is not None:
                routed_shape = (batch, heads - n_local)
                cache["query_valid"] = np.broadcast_to(routing_mask.any(axis=-1), routed_shape + (n_queries,))
                cache["key_valid"] = np.broadcast_to(routing_mask.any(axis=-2), routed_shape + (n_keys,))
            outputs.append(out_routing)
        out = np.concatenate(outputs, axis=1)  # (B, H, N, Dv)
        cache["out_shape"] = out.shape
        return out, cache

    def backward(self, dout, cache):
        check_upstream("dout", dout, cache["out_shape"])
        n_local = cache["n_local"]
        grads = []
        if cache["local"] is not None:
            grads.append(local_attention_backward(dout[:, :n_local], cache["local"]))
        if cache["routing"] is not None:
            grads.append(routing_attention_backward(dout[:, n_local:], cache["routing"]))
        return tuple(np.concatenate(parts, axis=1) for parts in zip(*grads))

    def keys_seen(self, cache):
        seen = []
        if cache["local"] is not None:
            seen.append(local_keys_seen(cache["local"], cache["n_queries"]))
        if cache["routing"] is not None:
            seen.append(routing_keys_seen(cache["routing"]))
        return np.concatenate(seen, axis=1)

    def _routed_items(self, cache):
        """Return (vectors, assignments, valid) of every routed item of a forward."""
        routing_cache = cache["routing"]
        vectors = [routing_cache["q_unit"]]
        assignments = [routing_cache["query_assignment"]]
        valid = [cache["query_valid"]]
        if routing_cache["routing"] == "separate":
            vectors.append(routing_cache["k_unit"])
            assignments.append(routing_cache["key_assignment"])
            valid.append(cache["key_valid"])
        valid = None if valid[0] is None else np.concatenate(valid, axis=-1)
        return np.concatenate(vectors, axis=-2), np.concatenate(assignments, axis=-1), valid

    def update_centroids(self, cache):
        """Apply one online k-means step with the routing of a forward; return the new centroids.

        With routing="separate" both queries and keys move the centroids;
        with "shared" only the queries, because only they were routed.
        """
        if cache["routing"] is None:
            raise ValueError("this forward had no routing heads (local_heads == H); there is nothing to update")
        vectors, assignments, valid = self._routed_items(cache)
        self.centroids = update_centroids(
            self.centroids, vectors, assignments, decay=self.decay, eps=self.eps, valid=valid
        )
        return self.centroids

    def commitment_forward(self, q, k, *, mask=None):
        """Commitment loss of the routing heads' queries (and keys, if routed separately).

        Returns (loss, cache); the mean runs over every routed item that is not
        padding (see forward).
        """
        check_attention_inputs(q, k, k)
        n_local = self.local_heads
        if q.shape[1] <= n_local:
            raise ValueError("every head is a local head (local_heads == H); there is no commitment loss")
        self._ensure_centroids(q, k.shape[-2])
        q_routed, k_routed = q[:, n_local:], k[:, n_local:]
        norm_caches = None
        if self.normalize_qk:
            q_routed, q_norm_cache = layer_norm_forward(q_routed)
            k_routed, k_norm_cache = layer_norm_forward(k_routed)
            norm_caches = (q_norm_cache, k_norm_cache)
        valid = None
        if mask is not None:
            check_mask(mask, q.shape[:3] + (k.shape[2],))
            routed = _heads_of(mask.reshape((1,) * (4 - mask.ndim) + mask.shape), n_local, q.shape[1])
            routed_shape = (q.shape[0], q.shape[1] - n_local)
            valid = [np.broadcast_to(routed.any(axis=-1), routed_shape + (q.shape[2],))]
            if self.routing == "separate":
                valid.append(np.broadcast_to(routed.any(axis=-2), routed_shape + (k.shape[2],)))
            valid = np.concatenate(valid, axis=-1)
        items = [q_routed] + ([k_routed] if self.routing == "separate" else [])
        loss, loss_cache = commitment_loss_forward(
            np.concatenate(items, axis=-2), self.centroids, beta=self.beta, valid=valid
        )
        return loss, (loss_cache, norm_caches, q.shape, k.shape, n_local)

    def commitment_backward(self, dloss, cache):
        """Backward of commitment_forward: returns (dq, dk), zero on the local heads."""
        loss_cache, norm_caches, q_shape, k_shape, n_local = cache
        ditems = commitment_loss_backward(dloss, loss_cache)
        n_queries = q_shape[2]
        dq_routed = ditems[:, :, :n_queries]
        dk_routed = ditems[:, :, n_queries:] if self.routing == "separate" else np.zeros_like(dq_routed)
        if norm_caches is not None:
            dq_routed = layer_norm_backward(dq_routed, norm_caches[0])[0]
            dk_routed = layer_norm_backward(dk_routed, norm_caches[1])[0]
        dq = np.zeros(q_shape, dtype=ditems.dtype)
        dk = np.zeros(k_shape, dtype=ditems.dtype)
        dq[:, n_local:] = dq_routed
        dk[:, n_local:] = dk_routed
        return dq, dk


def make_method(rng=None, **options):
    """Return RoutingAttention with its centroids drawn from rng (see RoutingAttention)."""
    return RoutingAttention(rng=rng, **options)


# --- gradient-check cases ------------------------------------------------------------------


def _frozen_routing_case(rng, label, shape, n_clusters, **options):
    """Build a gradient-check case of routing attention with its index sets frozen."""
    batch, heads, n_queries, n_keys, width = shape
    q = rng.standard_normal((batch, heads, n_queries, width))
    k = rng.standard_normal((batch, heads, n_keys, width))
    v = rng.standard_normal((batch, heads, n_keys, width))
    centroids = init_centroids(rng, heads, n_clusters, width)
    _, cache = routing_attention_forward(q, k, v, centroids, **options)
    frozen = dict(options, query_index=cache["query_index"], key_index=cache["key_index"])

    def forward(q, k, v):
        return routing_attention_forward(q, k, v, centroids, **frozen)

    return (label, forward, routing_attention_backward, [q, k, v], ["q", "k", "v"])


def gradcheck_cases(rng):
    """Small float64 cases for `python -m miniattn gradcheck routing_transformer`.

    Routing is held fixed in each case: the index sets of the first forward
    are passed back in, because a finite-difference step that moved a token
    across a top-k boundary would make the loss jump.
    """
    cases = [
        _frozen_routing_case(rng, "separate routing, bidirectional, N=7 M=9", (1, 2, 7, 9, 4), 3),
        _frozen_routing_case(rng, "separate routing, causal, N=6 M=9", (2, 1, 6, 9, 3), 2, causal=True),
        _frozen_routing_case(
            rng, "shared routing, causal, layer-normalised q and k", (1, 2, 8, 8, 4), 2,
            causal=True, routing="shared", normalize_qk=True,
        ),
    ]

    q = rng.standard_normal((1, 2, 7, 3))
    k = rng.standard_normal((1, 2, 9, 3))
    v = rng.standard_normal((1, 2, 9, 3))

    def local_forward(q, k, v):
        return local_attention_forward(q, k, v, window=3, causal=True)

    cases.append(("local heads, causal window 3, N=7 M=9", local_forward, local_attention_backward,
                  [q, k, v], ["q", "k", "v"]))

    x = rng.standard_normal((2, 2, 5, 4))
    centroids = init_centroids(rng, 2, 3, 4)
    assignments = nearest_centroids(x, centroids)

    def commitment_forward(x):
        return commitment_loss_forward(x, centroids, beta=0.5, assignments=assignments)

    cases.append(("commitment loss", commitment_forward, commitment_loss_backward, [x], ["x"]))
    return cases
