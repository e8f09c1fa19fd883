"""Boolean attention masks: True where a query may attend a key.

Masks broadcast against scores of shape (..., N, M), N queries and M keys.

Causal alignment. With N queries and M keys the queries are taken to be the
last N positions of the key sequence, as when a cached memory or KV cache
precedes them. Query i sits at absolute position i + (M - N) and may attend
key j when

    j <= i + (M - N)          ("bottom_right", the default)

This is the alignment of Transformer-XL and of FlashAttention >= 2.1. The
alternative "top_left" rule j <= i (PyTorch's ``is_causal=True``) is available
for comparison. The two agree when N == M. With N > M under bottom-right
alignment, the first N - M queries precede every key: their rows are fully
masked and get zero outputs.
"""

import numpy as np

from .validate import check_choice, check_int

CAUSAL_ALIGNMENTS = ("bottom_right", "top_left")


def causal_mask(n_queries, n_keys, alignment="bottom_right"):
    """Return the causal mask (N, M): True where key j is not in query i's future."""
    check_int("n_queries", n_queries, minimum=0)
    check_int("n_keys", n_keys, minimum=0)
    check_choice("alignment", alignment, CAUSAL_ALIGNMENTS)
    offset = n_keys - n_queries if alignment == "bottom_right" else 0
    query_pos = np.arange(n_queries)[:, None] + offset  # (N, 1)
    key_pos = np.arange(n_keys)[None, :]  # (1, M)
    return key_pos <= query_pos  # (N, M)


def padding_mask(lengths, n_keys):
    """Return a key-padding mask (B, 1, 1, M) from the valid length of each sequence.

    Key j of sequence b is allowed when j < lengths[b]. The two singleton axes
    broadcast over heads and queries of (B, H, N, M) scores.
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
        raise TypeError(f"lengths must be a 1-D integer array, got {lengths.dtype} with shape {lengths.shape}")
    check_int("n_keys", n_keys, minimum=0)
    if np.any(lengths < 0) or np.any(lengths > n_keys):
        raise ValueError(f"lengths={lengths.tolist()} is invalid; expected values in [0, {n_keys}]")
    allowed = np.arange(n_keys)[None, :] < lengths[:, None]  # (B, M)
    return allowed[:, None, None, :]  # (B, 1, 1, M)


def combine_masks(*masks):
    """Return the logical AND of the given masks, skipping None; None if all are None."""
    combined = None
    for mask in masks:
        if mask is None:
            continue
        combined = mask if combined is None else np.logical_and(combined, mask)
    return combined
