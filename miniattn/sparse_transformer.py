"""Sparse Transformer attention (Child et al., 2019): strided and fixed factorised patterns.

Letters: B batch, H heads, N queries, M keys, D head width, l stride, c
summary width (positions, not blocks), S number of summary sets.

Idea. Full attention lets each of N positions see all earlier ones, O(N^2).
The Sparse Transformer splits that into two index sets A1 and A2 that are
each of size about sqrt(N) when l = sqrt(N), yet any earlier position is
reachable in two steps: one head (or layer) attends A2, the next attends A1.

Query i sits at absolute position p = i + (M - N), the bottom-right
alignment of ``miniattn.core.masks``, so N < M works like a cached prefix.
With the causal restriction j <= p (the paper's autoregressive case):

    strided:  A1(p) = {j : p - l < j <= p}                 the last l positions
              A2(p) = {j <= p : (p - j) mod l = 0}          every l-th position back
    fixed:    A1(p) = {j <= p : floor(j / l) = floor(p / l)}     own block
              A2(p) = {j <= p : j mod l in summary set s}         summary columns

The summary set of head h is s = h mod S, the c positions
{l - c (s + 1), ..., l - c s - 1} of every block; with S = 1 every head
uses the last c positions of each block. A1 contains l positions: the paper
writes l + 1 (t = max(0, p - l)), but p - l lies in A2 anyway, so the union
is the same either way.

Bidirectional patterns drop j <= p: strided A1 is |p - j| < l and A2 is
(p - j) mod l = 0 in both directions; fixed A1 is the whole own block and A2
every summary column.

Three ways to combine the two sets (``combine``):

    "merged"       every head attends A1 u A2 (each key once)
    "split"        heads 0 .. ceil(H/2) - 1 attend A1, the others A2
    "alternating"  layer r attends A1 when r is even, A2 when odd

Within its set each query runs ordinary softmax attention with scale
1/sqrt(D), computed by the shared CSR core ``miniattn.core.sparse``. A query
whose set is empty (fixed A2 before the first summary column, or N > M
under the causal rule) gets a zero output row and zero gradients.

Complexity: strided with l = sqrt(N) lists at most about 2 sqrt(N) keys per
query (3 sqrt(N) bidirectional), so O(N sqrt(N) D) time and O(N sqrt(N))
memory. Fixed lists l + c M / l keys per query, O(N (l + c N / l) D),
smallest at l = sqrt(c N).
"""

import math

import numpy as np

from .core.sparse import (
    csr_from_candidates,
    csr_to_dense,
    multihead_sparse_backward,
    multihead_sparse_forward,
    multihead_sparse_keys_seen,
)
from .core.validate import check_attention_inputs, check_choice, check_int

PATTERNS = ("strided", "fixed")
COMBINES = ("merged", "split", "alternating")


# --- index sets ------------------------------------------------------------------


def default_stride(n_keys):
    """Return l = ceil(sqrt(M)), the stride that balances the two sets (1 for M <= 1)."""
    return math.isqrt(max(n_keys, 1) - 1) + 1


def check_pattern_options(*, pattern, stride, summary_width, n_summary_sets, combine, layer):
    """Check the options that do not depend on the lengths; return (summary_width, n_summary_sets) filled in."""
    check_choice("pattern", pattern, PATTERNS)
    check_choice("combine", combine, COMBINES)
    check_int("layer", layer, minimum=0)
    if stride is not None:
        check_int("stride", stride, minimum=1)
    if pattern == "strided":
        if summary_width is not None or n_summary_sets is not None:
            raise ValueError(
                "summary_width and n_summary_sets apply to the fixed pattern only; "
                "leave them None with pattern='strided'"
            )
        return None, None
    summary_width = 1 if summary_width is None else summary_width
    n_summary_sets = 1 if n_summary_sets is None else n_summary_sets
    check_int("summary_width", summary_width, minimum=1)
    check_int("n_summary_sets", n_summary_sets, minimum=1)
    if stride is not None and summary_width * n_summary_sets > stride:
        raise ValueError(
            f"summary_width={summary_width} times n_summary_sets={n_summary_sets} is larger than "
            f"stride={stride}; expected c * S <= l so every summary set fits in one block"
        )
    return summary_width, n_summary_sets


def resolve_stride(stride, n_keys, summary_width=None, n_summary_sets=None):
    """Return the stride for M keys, checked to be at most M; the default ceil(sqrt(M)) is raised to c * S if smaller."""
    check_int("n_keys", n_keys, minimum=0)
    if stride is None:
        stride = default_stride(n_keys)
        if summary_width is not None:
            stride = max(stride, summary_width * n_summary_sets)
        return stride
    if stride > max(n_keys, 1):
        raise ValueError(f"stride={stride} is larger than the key length M={n_keys}; expected 1 <= stride <= M")
    return stride


def query_positions(n_queries, n_keys):
    """Return the absolute position p = i + (M - N) of every query (N,)."""
    return np.arange(n_queries, dtype=np.int64) + (n_keys - n_queries)


def summary_offsets(stride, summary_width, summary_set):
    """Return the c in-block positions {l - c (s + 1), ..., l - c s - 1} of summary set s."""
    last = stride - summary_width * summary_set  # one past the set
    return np.arange(last - summary_width, last, dtype=np.int64)


def strided_candidates(positions, n_keys, stride, causal):
    """Return candidate keys and validity (columns, valid) of strided A1 and of A2, each (N, K)."""
    p = positions[:, None]  # (N, 1)
    if causal:
        local = p - np.arange(stride)[None, :]  # (N, l): p, p - 1, ..., p - l + 1
        strided = p - stride * np.arange(-(-n_keys // stride) + 1)[None, :]  # (N, ceil(M/l) + 1)
    else:
        local = p + np.arange(-(stride - 1), stride)[None, :]  # (N, 2l - 1)
        strided = p % stride + stride * np.arange(-(-n_keys // stride))[None, :]  # (N, ceil(M/l))
    factors = []
    for columns in (local, strided):
        valid = (columns >= 0) & (columns < n_keys)
        if causal:
            valid &= columns <= p
        factors.append((columns, valid))
    return factors


def fixed_candidates(positions, n_keys, stride, summary_width, summary_set, causal):
    """Return candidate keys and validity (columns, valid) of fixed A1 and of A2, each (N, K)."""
    p = positions[:, None]  # (N, 1)
    block = (p // stride) * stride + np.arange(stride)[None, :]  # (N, l) own block
    n_blocks = -(-n_keys // stride)
    offsets = summary_offsets(stride, summary_width, summary_set)  # (c,)
    summary = (stride * np.arange(n_blocks)[:, None] + offsets[None, :]).reshape(1, -1)  # (1, ceil(M/l) c)
    summary = np.broadcast_to(summary, (positions.shape[0], summary.shape[1]))  # (N, ceil(M/l) c)
    factors = []
    for columns in (block, summary):
        valid = (columns >= 0) & (columns < n_keys)
        if causal:
            valid &= columns <= p
        factors.append((columns, valid))
    return factors


def factor_patterns(
    n_queries, n_keys, *, pattern="strided", stride=None, summary_width=None, summary_set=0, causal=True
):
    """Return the CSR patterns (A1, A2), each (indptr, indices), of one head.

    Inputs: the query and key lengths, the pattern name, stride l (default
    ceil(sqrt(M))), the summary width c and summary set s (fixed pattern
    only) and the causal flag.
    """
    check_int("summary_set", summary_set, minimum=0)
    summary_width, n_sets = check_pattern_options(
        pattern=pattern, stride=stride, summary_width=summary_width,
        n_summary_sets=None if pattern == "strided" else summary_set + 1, combine="merged", layer=0,
    )
    stride = resolve_stride(stride, n_keys, summary_width, n_sets)
    positions = query_positions(n_queries, n_keys)  # (N,)
    if pattern == "strided":
        factors = strided_candidates(positions, n_keys, stride, causal)
    else:
        factors = fixed_candidates(positions, n_keys, stride, summary_width, summary_set, causal)
    return tuple(csr_from_candidates(columns, valid) for columns, valid in factors)


def head_pattern(
    n_queries,
    n_keys,
    head,
    n_heads,
    *,
    pattern="strided",
    stride=None,
    summary_width=None,
    n_summary_sets=None,
    combine="merged",
    layer=0,
    causal=True,
):
    """Return the CSR pattern (indptr, indices) that head `head` of `n_heads` attends."""
    summary_width, n_summary_sets = check_pattern_options(
        pattern=pattern, stride=stride, summary_width=summary_width,
        n_summary_sets=n_summary_sets, combine=combine, layer=layer,
    )
    stride = resolve_stride(stride, n_keys, summary_width, n_summary_sets)
    check_int("n_queries", n_queries, minimum=0)
    check_int("n_heads", n_heads, minimum=1)
    check_int("head", head, minimum=0, maximum=n_heads - 1)
    positions = query_positions(n_queries, n_keys)  # (N,)
    if pattern == "strided":
        local, strided = strided_candidates(positions, n_keys, stride, causal)
    else:
        local, strided = fixed_candidates(
            positions, n_keys, stride, summary_width, head % n_summary_sets, causal
        )

    if combine == "merged":
        columns = np.concatenate([local[0], strided[0]], axis=1)  # (N, K1 + K2)
        valid = np.concatenate([local[1], strided[1]], axis=1)
        return csr_from_candidates(columns, valid)  # a key in both sets is listed once
    uses_local = head < -(-n_heads // 2) if combine == "split" else layer % 2 == 0
    columns, valid = local if uses_local else strided
    return csr_from_candidates(columns, valid)


def head_patterns(n_queries, n_keys, n_heads, **options):
    """Return the H CSR patterns of one call, one per head (see head_pattern for the options)."""
    check_int("n_heads", n_heads, minimum=1)
    return [head_pattern(n_queries, n_keys, head, n_heads, **options) for head in range(n_heads)]


def sparse_transformer_mask(n_queries, n_keys, head=0, n_heads=1, **options):
    """Return the bool (N, M) mask of the keys head `head` attends: the dense specification.

    Takes the options of head_pattern. Dense attention with this mask equals
    the sparse computation, because every key is listed at most once.
    """
    indptr, indices = head_pattern(n_queries, n_keys, head, n_heads, **options)
    allowed, _ = csr_to_dense(indptr, indices, n_keys)
    return allowed


# --- attention -------------------------------------------------------------------


def attention_forward(
    q,
    k,
    v,
    *,
    pattern="strided",
    stride=None,
    summary_width=None,
    n_summary_sets=None,
    combine="merged",
    layer=0,
    causal=True,
    mask=None,
    scale=None,
    backend=None,
):
    """Sparse Transformer attention of q (B, H, N, D) on k (B, H, M, D), v (B, H, M, Dv).

    Inputs:
    - pattern: "strided" or "fixed"; stride: l, default ceil(sqrt(M))
    - summary_width: c (fixed only, default 1); n_summary_sets: S (fixed
      only, default 1), head h uses summary set h mod S
    - combine: "merged", "split" or "alternating"; layer: r, for "alternating"
    - causal: restrict to j <= i + (M - N) (the paper's autoregressive case)
    - mask: optional bool mask broadcastable to (B, H, N, M), e.g. padding;
      it is intersected with the pattern
    - scale: score scale, 1/sqrt(D) by default; backend: "numpy" or "cython"

    Returns (out (B, H, N, Dv), cache).
    """
    check_attention_inputs(q, k, v)
    if q.ndim != 4:
        raise ValueError(f"q has shape {q.shape}; expected (B, H, N, D)")
    n_heads, n_queries, n_keys = q.shape[1], q.shape[2], k.shape[2]

    # 1. One CSR pattern per head (heads differ under "split" and per summary set).
    patterns = head_patterns(
        n_queries, n_keys, n_heads, pattern=pattern, stride=stride, summary_width=summary_width,
        n_summary_sets=n_summary_sets, combine=combine, layer=layer, causal=causal,
    )

    # 2. Softmax attention over each query's listed keys.
    out, core_cache = multihead_sparse_forward(q, k, v, patterns, mask=mask, scale=scale, backend=backend)
    return out, core_cache


def attention_backward(dout, cache):
    """Backward of attention_forward: returns (dq, dk, dv).

    The cache is the core's: the per-head patterns and the saved log-sum-exp;
    the probabilities are recomputed. dk and dv are scatter-added.
    """
    # 2. and 1. The patterns are constants, so only the core has a backward.
    return multihead_sparse_backward(dout, cache)


# --- method object ---------------------------------------------------------------


class SparseTransformerAttention:
    """Sparse Transformer attention as a method object for MultiHeadAttention, bench and tour.

    The options are those of attention_forward; ``causal`` is given per call.
    keys_seen(cache) returns the bool (B, H, N, M) keys each query attended.
    """

    name = "sparse_transformer"

    def __init__(
        self,
        *,
        pattern="strided",
        stride=None,
        summary_width=None,
        n_summary_sets=None,
        combine="merged",
        layer=0,
        scale=None,
        backend=None,
    ):
        # The options that do not depend on the lengths are checked now, the stride against M per call.
        check_pattern_options(
            pattern=pattern, stride=stride, summary_width=summary_width,
            n_summary_sets=n_summary_sets, combine=combine, layer=layer,
        )
        self.options = dict(
            pattern=pattern, stride=stride, summary_width=summary_width, n_summary_sets=n_summary_sets,
            combine=combine, layer=layer,
        )
        self.scale = scale
        self.backend = backend
        self.patterns = {}  # (N, M, H, causal) -> the H CSR patterns, built once per shape

    def head_patterns(self, n_queries, n_keys, n_heads, causal):
        """Return the H CSR patterns for these lengths, built on first use and then reused."""
        key = (n_queries, n_keys, n_heads, bool(causal))
        if key not in self.patterns:
            self.patterns[key] = head_patterns(n_queries, n_keys, n_heads, causal=causal, **self.options)
        return self.patterns[key]

    def mask(self, n_queries, n_keys, *, head=0, n_heads=1, causal=False):
        """Return the bool (N, M) dense specification of one head's pattern."""
        return sparse_transformer_mask(n_queries, n_keys, head, n_heads, causal=causal, **self.options)

    def forward(self, q, k, v, *, mask=None, causal=False):
        check_attention_inputs(q, k, v)
        if q.ndim != 4:
            raise ValueError(f"q has shape {q.shape}; expected (B, H, N, D)")
        patterns = self.head_patterns(q.shape[2], k.shape[2], q.shape[1], causal)
        return multihead_sparse_forward(q, k, v, patterns, mask=mask, scale=self.scale, backend=self.backend)

    def backward(self, dout, cache):
        return attention_backward(dout, cache)

    def keys_seen(self, cache):
        return multihead_sparse_keys_seen(cache)


def make_method(rng=None, **options):
    """Return SparseTransformerAttention with the given options (rng is unused: the patterns are fixed)."""
    return SparseTransformerAttention(**options)


def gradcheck_cases(rng):
    """Return small float64 gradient-check cases: (label, forward, backward, inputs, names)."""
    cases = []
    settings = [
        ("strided merged causal N<M", dict(pattern="strided", stride=3, combine="merged"), True, 5, 7),
        ("strided split bidirectional", dict(pattern="strided", stride=2, combine="split"), False, 6, 6),
        ("fixed merged causal c=2 S=2", dict(pattern="fixed", stride=4, summary_width=2, n_summary_sets=2), True, 7, 7),
        ("fixed alternating A2 causal", dict(pattern="fixed", stride=3, combine="alternating", layer=1), True, 6, 6),
    ]
    for label, options, causal, n_queries, n_keys in settings:
        q = rng.standard_normal((1, 2, n_queries, 3))
        k = rng.standard_normal((1, 2, n_keys, 3))
        v = rng.standard_normal((1, 2, n_keys, 2))

        def forward(q, k, v, options=options, causal=causal):
            return attention_forward(q, k, v, causal=causal, **options)

        cases.append((label, forward, attention_backward, [q, k, v], ["q", "k", "v"]))
    return cases
