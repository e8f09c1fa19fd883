"""Longformer attention (Beltagy et al., 2020): sliding, dilated windows and global tokens.

Letters: B batch, H heads, N queries, M keys, D head width, w one-sided
window, delta dilation, G global token positions.

Idea. Most tokens need only their neighbourhood, so each query attends a
window of nearby keys, O(N w) instead of O(N M). A few task tokens (a
classification token, the question in question answering) are made global:
they attend every key and every query attends them.

Window width. ``window`` is ONE-SIDED: w keys on each side of the query, so
a bidirectional window has 2w + 1 slots and a causal one w + 1 slots. (The
Hugging Face ``attention_window`` is the two-sided total 2w; the allenai
configuration value is one-sided like here.)

Query i sits at absolute position p = i + (M - N) (the bottom-right
alignment of ``miniattn.core.masks``; p = i for self-attention). With
dilation delta (per head), the window of p is

    W(p) = {p + delta t : t in [-w, w]} n [0, M)        bidirectional
    W(p) = {p + delta t : t in [-w, 0]} n [0, M)        causal

A local query (p not in G) attends the global columns and its window, with
the global keys removed from the window so that no key is counted twice:

    keys(p)   = G u (W(p) \\ G)            (causal: only keys j <= p)
    o_i       = softmax_j(q_i . k_j / sqrt(D)) v_j  over keys(p)

A global query (p in G) attends every key with its own projections:

    o_i = softmax_j(qg_i . kg_j / sqrt(D)) vg_j  over all j (causal: j <= p)

Global projections. The paper gives global attention separate projections
Qg, Kg, Vg. ``attention_forward`` takes them as the optional inputs
q_global, k_global, v_global (B, H, N, D), (B, H, M, D), (B, H, M, Dv), and
then returns six gradients; without them the global rows use q, k, v and
the backward sums both paths into dq, dk, dv. The global columns that local
queries see always use the local k, v, as in the paper. The layer
``self_attention_forward`` holds all six projection matrices and applies
them to one input x.

Lengths and padding. Windows are generated per query as CSR lists (the
shared core ``miniattn.core.sparse``), so any length works and nothing is
padded internally. A key-padding mask (``mask``, e.g. ``padding_mask``) is
intersected with every pattern, so padded keys never take part; a query
whose keys are all masked gets a zero output row and zero gradients.

Complexity: local rows O(N (2w + 1 + |G|) D) time and O(N (2w + 1 + |G|))
memory; global rows O(|G| M D).
"""

import numpy as np

from .core.sparse import (
    csr_from_candidates,
    csr_to_dense,
    multihead_sparse_backward,
    multihead_sparse_forward,
    multihead_sparse_keys_seen,
)
from .core.validate import check_attention_inputs, check_int, check_layer_inputs, check_same_dtype
from .transformer import init_mha_params, merge_heads, split_heads

DEFAULT_WINDOW = 256  # one-sided; the Hugging Face default attention_window=512 is two-sided


# --- options ---------------------------------------------------------------------


def one_sided_window(attention_window):
    """Return w for a two-sided total window (the Hugging Face ``attention_window``, even)."""
    check_int("attention_window", attention_window, minimum=2)
    if attention_window % 2:
        raise ValueError(f"attention_window={attention_window} is odd; expected an even two-sided total 2w")
    return attention_window // 2


def check_window(window, n_keys):
    """Check the one-sided window w against M keys: 1 <= w <= M - 1."""
    check_int("window", window, minimum=1)
    if window > max(n_keys - 1, 1):
        raise ValueError(
            f"window={window} is larger than M - 1 = {n_keys - 1}; a one-sided window of M - 1 already "
            f"covers every key, so pass window <= {max(n_keys - 1, 1)} or use dense attention"
        )


def head_dilations(dilation, n_heads, n_keys):
    """Return one dilation per head (a list of H ints) from an int or a sequence of H ints."""
    values = [dilation] * n_heads if np.ndim(dilation) == 0 else list(dilation)
    if len(values) != n_heads:
        raise ValueError(f"dilation has {len(values)} entries for H = {n_heads} heads; expected one per head")
    for value in values:
        check_int("dilation", value, minimum=1)
        if value > max(n_keys - 1, 1):
            raise ValueError(f"dilation={value} is larger than M - 1 = {n_keys - 1}; expected 1 <= dilation < M")
    return [int(value) for value in values]


def check_global_indices(global_indices, n_keys):
    """Return the global positions as a sorted int64 array, checked to be unique and in [0, M)."""
    if global_indices is None:
        return np.zeros(0, dtype=np.int64)
    indices = np.asarray(global_indices)
    if indices.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(indices.dtype, np.integer) or indices.ndim != 1:
        raise TypeError(
            f"global_indices must be a 1-D sequence of integers, got dtype {indices.dtype} "
            f"and shape {indices.shape}"
        )
    if indices.min() < 0 or indices.max() >= n_keys:
        bad = int(indices[(indices < 0) | (indices >= n_keys)][0])
        raise ValueError(f"global_indices contains {bad}; expected positions in [0, {n_keys})")
    ordered = np.sort(indices.astype(np.int64))
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.size:
        raise ValueError(f"global_indices lists position {int(repeated[0])} more than once; expected unique positions")
    return ordered


# --- patterns --------------------------------------------------------------------


def query_positions(n_queries, n_keys):
    """Return the absolute position p = i + (M - N) of every query (N,)."""
    return np.arange(n_queries, dtype=np.int64) + (n_keys - n_queries)


def local_pattern(n_queries, n_keys, *, window, dilation=1, global_indices=None, causal=False):
    """Return the CSR pattern (indptr, indices) of the local rows: G u (W(p) minus G).

    Global query rows are left empty here; they attend through global_pattern.
    """
    check_window(window, n_keys)
    (dilation,) = head_dilations(dilation, 1, n_keys)
    global_indices = check_global_indices(global_indices, n_keys)
    positions = query_positions(n_queries, n_keys)  # (N,)
    p = positions[:, None]  # (N, 1)
    is_global_key = np.zeros(n_keys, dtype=bool)  # (M,)
    is_global_key[global_indices] = True

    # 1. Window slots p + delta t, without global keys (they are listed once, as columns).
    last_slot = 0 if causal else window
    band = p + dilation * np.arange(-window, last_slot + 1)[None, :]  # (N, 2w + 1) or (N, w + 1)
    band_valid = (band >= 0) & (band < n_keys)
    band_valid &= ~is_global_key[np.clip(band, 0, max(n_keys - 1, 0))]

    # 2. Global columns, seen by every local query (causal: only those at or before p).
    columns = np.broadcast_to(global_indices[None, :], (n_queries, global_indices.shape[0]))  # (N, G)
    columns_valid = np.ones(columns.shape, dtype=bool)
    if causal:
        columns_valid &= columns <= p

    # 3. Global query rows are removed from the local pattern.
    candidates = np.concatenate([band, columns], axis=1)  # (N, K)
    valid = np.concatenate([band_valid, columns_valid], axis=1)  # (N, K)
    valid &= ~np.isin(positions, global_indices)[:, None]
    return csr_from_candidates(candidates, valid)


def global_pattern(n_queries, n_keys, *, global_indices=None, causal=False):
    """Return the CSR pattern of the global rows: every key (causal: j <= p), other rows empty."""
    global_indices = check_global_indices(global_indices, n_keys)
    positions = query_positions(n_queries, n_keys)  # (N,)
    is_global_row = np.isin(positions, global_indices)  # (N,)
    counts = np.where(is_global_row, np.minimum(positions + 1, n_keys) if causal else n_keys, 0)  # (N,)
    counts = np.maximum(counts, 0)
    indptr = np.zeros(n_queries + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = np.concatenate([np.arange(count, dtype=np.int64) for count in counts[is_global_row]] or
                             [np.zeros(0, dtype=np.int64)])
    return indptr, indices


def longformer_masks(n_queries, n_keys, *, window, dilation=1, global_indices=None, causal=False):
    """Return the dense specification (local_allowed, global_allowed, global_rows) of one head.

    local_allowed and global_allowed are bool (N, M): the keys each query
    attends with the local and with the global projections; global_rows
    (N,) marks the queries that are global tokens. Their union is the
    mask of keys each query sees.
    """
    local = csr_to_dense(*local_pattern(n_queries, n_keys, window=window, dilation=dilation,
                                        global_indices=global_indices, causal=causal), n_keys)[0]
    glob = csr_to_dense(*global_pattern(n_queries, n_keys, global_indices=global_indices, causal=causal),
                        n_keys)[0]
    global_rows = np.isin(query_positions(n_queries, n_keys), check_global_indices(global_indices, n_keys))
    return local, glob, global_rows


def longformer_mask(n_queries, n_keys, **options):
    """Return the bool (N, M) mask of the keys each query sees (local and global rows together)."""
    local, glob, _ = longformer_masks(n_queries, n_keys, **options)
    return local | glob


# --- attention -------------------------------------------------------------------


def attention_forward(
    q,
    k,
    v,
    *,
    window,
    dilation=1,
    global_indices=None,
    q_global=None,
    k_global=None,
    v_global=None,
    causal=False,
    mask=None,
    scale=None,
    backend=None,
):
    """Longformer attention of q (B, H, N, D) on k (B, H, M, D), v (B, H, M, Dv).

    Inputs:
    - window: one-sided width w, 1 <= w <= M - 1 (2w + 1 slots bidirectional)
    - dilation: delta, an int or one int per head
    - global_indices: positions in [0, M) of the global tokens, unique
    - q_global, k_global, v_global: optional separate global projections
      (all three or none) with the shapes of q, k, v; the global rows attend
      with them, and the backward then returns six gradients
    - causal: keys j <= i + (M - N) only, for windows, global columns and rows
    - mask: optional bool mask broadcastable to (B, H, N, M), e.g. key padding;
      it is intersected with every pattern
    - scale: 1/sqrt(D) by default; backend: "numpy" or "cython"

    Returns (out (B, H, N, Dv), cache).
    """
    q_global, k_global, v_global, separate = check_inputs(q, k, v, q_global, k_global, v_global)
    n_heads, n_queries, n_keys = q.shape[1], q.shape[2], k.shape[2]
    local, glob = longformer_patterns(
        n_queries, n_keys, n_heads, window=window, dilation=dilation, global_indices=global_indices, causal=causal
    )
    return attention_forward_on_patterns(
        q, k, v, local, glob, q_global=q_global, k_global=k_global, v_global=v_global,
        separate=separate, mask=mask, scale=scale, backend=backend,
    )


def check_inputs(q, k, v, q_global, k_global, v_global):
    """Check the local and optional global inputs; return (q_global, k_global, v_global, separate).

    Without separate global inputs the local q, k, v are returned in their place.
    """
    check_attention_inputs(q, k, v)
    if q.ndim != 4:
        raise ValueError(f"q has shape {q.shape}; expected (B, H, N, D)")
    given = [x is not None for x in (q_global, k_global, v_global)]
    if any(given) and not all(given):
        raise ValueError("pass all three of q_global, k_global and v_global, or none of them")
    if not any(given):
        return q, k, v, False
    check_attention_inputs(q_global, k_global, v_global)
    check_same_dtype(q=q, q_global=q_global)
    for name, local_input, global_input in (("q", q, q_global), ("k", k, k_global), ("v", v, v_global)):
        if global_input.shape != local_input.shape:
            raise ValueError(
                f"{name}_global has shape {global_input.shape}; expected the shape of {name}, {local_input.shape}"
            )
    return q_global, k_global, v_global, True


def longformer_patterns(n_queries, n_keys, n_heads, *, window, dilation=1, global_indices=None, causal=False):
    """Return (local, glob): the H local CSR patterns (one per head dilation) and the global-row pattern."""
    check_window(window, n_keys)
    dilations = head_dilations(dilation, n_heads, n_keys)
    local = [
        local_pattern(n_queries, n_keys, window=window, dilation=delta, global_indices=global_indices, causal=causal)
        for delta in dilations
    ]
    glob = global_pattern(n_queries, n_keys, global_indices=global_indices, causal=causal)
    return local, glob


def attention_forward_on_patterns(
    q, k, v, local, glob, *, q_global, k_global, v_global, separate, mask=None, scale=None, backend=None
):
    """Run the two passes of attention_forward on patterns from longformer_patterns."""
    n_heads = q.shape[1]

    # 1. Local rows: window (dilated per head) plus global columns, with the local projections.
    out, local_cache = multihead_sparse_forward(q, k, v, local, mask=mask, scale=scale, backend=backend)

    # 2. Global rows: every key, with the global projections. The two row sets are disjoint.
    global_cache = None
    if glob[1].shape[0]:
        global_out, global_cache = multihead_sparse_forward(
            q_global, k_global, v_global, [glob] * n_heads, mask=mask, scale=scale, backend=backend
        )
        out += global_out
    return out, (local_cache, global_cache, separate)


def attention_backward(dout, cache):
    """Backward of attention_forward.

    Returns (dq, dk, dv), or (dq, dk, dv, dq_global, dk_global, dv_global)
    when the forward had separate global projections. With shared
    projections q, k, v feed both passes (a fork), so both gradients add.
    """
    local_cache, global_cache, separate = cache

    # 2. Global rows.
    if global_cache is not None:
        dq_global, dk_global, dv_global = multihead_sparse_backward(dout, global_cache)
    else:
        _, q_shape, k_shape, v_shape, dtype = local_cache
        dq_global = np.zeros(q_shape, dtype=dtype)
        dk_global = np.zeros(k_shape, dtype=dtype)
        dv_global = np.zeros(v_shape, dtype=dtype)

    # 1. Local rows.
    dq, dk, dv = multihead_sparse_backward(dout, local_cache)
    if separate:
        return dq, dk, dv, dq_global, dk_global, dv_global
    return dq + dq_global, dk + dk_global, dv + dv_global


def keys_seen(cache):
    """Return the bool (B, H, N, M) keys each query attended in an attention_forward call."""
    local_cache, global_cache, _ = cache
    seen = multihead_sparse_keys_seen(local_cache)
    if global_cache is not None:
        seen |= multihead_sparse_keys_seen(global_cache)
    return seen


# --- self-attention layer with separate global projections ---------------------

PROJECTIONS = ("q", "k", "v", "q_global", "k_global", "v_global")
LAYER_PARAM_NAMES = tuple(f"{kind}_{name}" for name in PROJECTIONS for kind in ("W", "b")) + ("W_o", "b_o")


def init_layer_params(model_width, n_heads, rng, *, dtype=np.float64):
    """Draw the local projections and output projection; start the global ones as copies of the local ones.

    Starting the global projections from the local ones follows the paper;
    they are separate arrays, so training moves them apart.
    """
    params = init_mha_params(model_width, n_heads, rng, dtype=dtype)
    for name in ("q", "k", "v"):
        params[f"W_{name}_global"] = params[f"W_{name}"].copy()
        params[f"b_{name}_global"] = params[f"b_{name}"].copy()
    return params


def self_attention_forward(
    x, params, *, n_heads, window, dilation=1, global_indices=None, causal=False, mask=None, backend=None
):
    """Longformer self-attention layer on x (B, N, C) with six input projections.

    Inputs:
    - params: W_q, b_q, W_k, b_k, W_v, b_v (local), W_q_global, b_q_global,
      W_k_global, b_k_global, W_v_global, b_v_global (global rows), W_o, b_o;
      every W is (C, C) and every b (C,), as made by init_layer_params
    - n_heads: H; the remaining options are those of attention_forward

    Returns (y (B, N, C), cache).
    """
    check_layer_inputs(x, params, LAYER_PARAM_NAMES, n_heads)

    # 1. Six projections of the same x (local and global queries, keys, values), split into heads.
    projected = {
        name: split_heads(x @ params[f"W_{name}"] + params[f"b_{name}"], n_heads) for name in PROJECTIONS
    }  # each (B, H, N, D)

    # 2. Longformer attention: local rows with q, k, v; global rows with the global projections.
    heads, attention_cache = attention_forward(
        projected["q"], projected["k"], projected["v"], window=window, dilation=dilation,
        global_indices=global_indices, q_global=projected["q_global"], k_global=projected["k_global"],
        v_global=projected["v_global"], causal=causal, mask=mask, backend=backend,
    )  # (B, H, N, D)

    # 3. Concatenate the heads and project out.
    merged = merge_heads(heads)  # (B, N, C)
    y = merged @ params["W_o"] + params["b_o"]  # (B, N, C)
    return y, (x, params, n_heads, attention_cache, merged)


def self_attention_backward(dy, cache):
    """Backward of self_attention_forward: returns (dx, dparams) with one gradient per parameter."""
    x, params, n_heads, attention_cache, merged = cache
    flat_x = x.reshape(-1, x.shape[-1])  # (B N, C)
    dparams = {}

    # 3. y = merged W_o + b_o
    dparams["W_o"] = merged.reshape(-1, merged.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])
    dparams["b_o"] = dy.sum(axis=(0, 1))
    dheads = split_heads(dy @ params["W_o"].T, n_heads)  # (B, H, N, D)

    # 2. Attention, with six gradients because the global projections are separate inputs.
    grads = dict(zip(PROJECTIONS, attention_backward(dheads, attention_cache)))

    # 1. Six projections read x (a fork): their input gradients add.
    dx = np.zeros_like(x)  # (B, N, C)
    for name in PROJECTIONS:
        dprojected = merge_heads(grads[name])  # (B, N, C)
        dparams[f"W_{name}"] = flat_x.T @ dprojected.reshape(-1, dprojected.shape[-1])
        dparams[f"b_{name}"] = dprojected.sum(axis=(0, 1))
        dx += dprojected @ params[f"W_{name}"].T
    return dx, dparams


# --- method object ---------------------------------------------------------------


class LongformerAttention:
    """Longformer attention as a method object for MultiHeadAttention, bench and tour.

    Options: window (one-sided w; default min(256, M - 1) per call), dilation
    (int or one per head), global_indices, scale, backend. forward also
    accepts q_global, k_global, v_global, and backward then returns six
    gradients.

    NOTE: the registry calls forward(q, k, v, mask=, causal=) with projected
    heads only, so there the global rows reuse q, k, v (the paper's
    initialisation of the global projections). Separate trained global
    projections need the separate inputs or self_attention_forward.
    """

    name = "longformer"

    def __init__(self, *, window=None, dilation=1, global_indices=None, scale=None, backend=None):
        if window is not None:
            check_int("window", window, minimum=1)
        if np.ndim(dilation) == 0:
            check_int("dilation", dilation, minimum=1)
        self.window = window
        self.dilation = dilation
        self.global_indices = global_indices
        self.scale = scale
        self.backend = backend
        self.patterns = {}  # (N, M, H, causal) -> (local, glob), built once per shape

    def head_patterns(self, n_queries, n_keys, n_heads, causal):
        """Return (local, glob) for these lengths (see longformer_patterns), built on first use and then reused."""
        key = (n_queries, n_keys, n_heads, bool(causal))
        if key not in self.patterns:
            self.patterns[key] = longformer_patterns(
                n_queries, n_keys, n_heads, window=self.window_for(n_keys), dilation=self.dilation,
                global_indices=self.global_indices, causal=causal,
            )
        return self.patterns[key]

    def window_for(self, n_keys):
        """Return the one-sided window used for M keys."""
        return min(DEFAULT_WINDOW, max(n_keys - 1, 1)) if self.window is None else self.window

    def mask(self, n_queries, n_keys, *, causal=False, head=0):
        """Return the bool (N, M) dense specification of one head's pattern."""
        delta = self.dilation if np.ndim(self.dilation) == 0 else self.dilation[head]
        return longformer_mask(
            n_queries, n_keys, window=self.window_for(n_keys), dilation=delta,
            global_indices=self.global_indices, causal=causal,
        )

    def forward(self, q, k, v, *, mask=None, causal=False, q_global=None, k_global=None, v_global=None):
        q_global, k_global, v_global, separate = check_inputs(q, k, v, q_global, k_global, v_global)
        local, glob = self.head_patterns(q.shape[2], k.shape[2], q.shape[1], causal)
        return attention_forward_on_patterns(
            q, k, v, local, glob, q_global=q_global, k_global=k_global, v_global=v_global,
            separate=separate, mask=mask, scale=self.scale, backend=self.backend,
        )

    def backward(self, dout, cache):
        return attention_backward(dout, cache)

    def keys_seen(self, cache):
        return keys_seen(cache)


def make_method(rng=None, **options):
    """Return LongformerAttention with the given options (rng is unused: the pattern is fixed)."""
    return LongformerAttention(**options)


def gradcheck_cases(rng):
    """Return small float64 gradient-check cases: (label, forward, backward, inputs, names)."""
    cases = []
    settings = [
        ("window w=1 bidirectional", dict(window=1), False, False),
        ("dilation (1, 2) causal, global [2]", dict(window=2, dilation=(1, 2), global_indices=[2]), True, False),
        ("separate global projections [0, 4]", dict(window=1, global_indices=[0, 4]), False, True),
    ]
    for label, options, causal, separate in settings:
        shapes = [(1, 2, 6, 3), (1, 2, 6, 3), (1, 2, 6, 2)]
        inputs = [rng.standard_normal(shape) for shape in shapes * (2 if separate else 1)]
        names = ["q", "k", "v", "q_global", "k_global", "v_global"][: len(inputs)]

        def forward(*arrays, options=options, causal=causal):
            q, k, v = arrays[:3]
            extra = dict(zip(("q_global", "k_global", "v_global"), arrays[3:]))
            return attention_forward(q, k, v, causal=causal, **options, **extra)

        cases.append((label, forward, attention_backward, inputs, names))
    return cases
