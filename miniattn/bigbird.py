"""BigBird (Zaheer et al., 2020): block-sparse attention with window, global and random blocks.

Letters: B batch, H heads, N queries, M keys (M = N: BigBird is
self-attention), D head width, b block size, nb = ceil(N / b) blocks,
R random blocks per query block, A the random adjacency (H, nb, R),
G global tokens.

Idea. Cut the sequence into nb blocks of b tokens (the last block may be
shorter). Every query of block i attends whole key blocks:

    window   blocks i - 1, i, i + 1 (those that exist)
    global   the global blocks (ITC: the first and the last block)
    random   R blocks A[h, i, :], drawn per head and kept fixed

and the queries of a global block attend every key ("global as rows and as
columns"). The internal transformer construction (ITC) is exactly this with
global blocks 0 and nb - 1:

    query block    key blocks                            keys per query
    0, nb - 1      all                                   N
    1              0, 1, 2, nb - 1, A[1]                 (4 + R) b
    2 .. nb - 3    0, i - 1, i, i + 1, nb - 1, A[i]      (5 + R) b
    nb - 2         0, nb - 3, nb - 2, nb - 1, A[nb - 2]  (4 + R) b

The extended construction (ETC) designates G extra global tokens by their
positions: a global token's row attends every key and every query attends
the global tokens' columns. ``global_blocks=()`` with ``global_tokens=...``
gives ETC without global blocks; both sets may also be combined.

Within the chosen keys the attention is the ordinary one,

    S_ij = q_i . k_j / sqrt(D) + log c_ij,   P_i = softmax_j(S_i),   O_i = sum_j P_ij v_j

where c_ij counts how often key j is listed for query i (see "Keys reached
twice"). The pattern of each head is a list of key indices per query (CSR
layout). ``miniattn.core.sparse`` does the gathering, the softmax and the
scatter-add backward, so this file only builds the pattern.

Keys reached twice. The reference code concatenates the key blocks of a
row, so a random block that coincides with a window or global block (which
happens with its fixed "paper plans" for some lengths, and with an all-zero
adjacency at inference) is attended twice, with twice the weight.
``duplicates`` chooses the rule:

    "merge" (default)  each key at most once: the pattern is the boolean
                       mask, and the result equals dense masked attention.
    "count"            the fixed blocks (window and global blocks) form a
                       set, the random blocks and the global-token columns
                       are appended to it, and a key listed c times is
                       attended c times. The result equals dense attention
                       with the logit bias log c on the same mask.

The adjacency generator never draws a window or global block, so with it
both rules give the same result unless global tokens sit inside a query's
window or random blocks.

Short sequences. The block plan needs room for its blocks: when
N <= (5 + 2R) b (global 2b, window 3b, random R b and R b of slack, the
rule of the reference implementation), ``attention_forward`` computes full
dense attention for that call instead. Longer calls use the block plan again.

Padding. N need not be a multiple of b: the last block contains the remaining
N - (nb - 1) b tokens. This is the same as padding to nb b tokens with
padding keys masked out and padding rows dropped, without allocating the
padding, so padding cannot reach outputs or gradients.

Complexity per head: (nb - 2) middle blocks of b queries see (5 + R) b keys
each and 2 global blocks see N keys, so O(N (7 + R) b D) time and
O(N (7 + R) b) memory, linear in N for fixed b and R.

Causal attention (``causal=True``). The paper's released code is
encoder-only. The causal variant is miniattn's autoregressive adaptation
for decoder-only models such as a character language model: it restricts
the same pattern to the past. The pattern is intersected with the
bottom-right causal mask (query t may attend key j when j <= t + M - N,
which is j <= t since M = N). With ITC:

    query block    key blocks (keys up to the query)      keys per query at most
    0              0 (up to the query itself)             b
    1              0, 1                                   2 b
    2 .. nb - 2    0, i - 1, i, A[i]                      (3 + R) b
    nb - 1         all (a global row attends its past)    N

The next window block and the last global block lie in the future of a
middle block and drop out. The random blocks of query block i are drawn only
from the blocks strictly in its past that are neither window nor global
blocks (with ITC, blocks 1 .. i - 2), so no draw is wasted on a key the
causal mask removes. Early blocks have fewer than R such blocks: they get
all of them, and the rest of their row of A holds -1 ("no block"). An ETC
global token attends all of its past, and every later query attends it.
Every query attends at least itself (its own block), so no row is empty
unless a mask removes its keys. Short sequences (the same N <= (5 + 2R) b
rule) fall back to dense causal attention. Cost: O(N (4 + R) b D) time per head.
"""

import numpy as np

from .core.masks import causal_mask
from .core.sparse import sparse_attention_backward, sparse_attention_forward
from .core.validate import (
    check_attention_inputs,
    check_choice,
    check_generator,
    check_int,
    check_mask,
    check_real,
    check_upstream,
)
from .transformer import attention_backward as dense_attention_backward
from .transformer import attention_forward as dense_attention_forward

DUPLICATE_RULES = ("merge", "count")
ITC_GLOBAL_BLOCKS = (0, -1)  # the first and the last block


# --- the block plan --------------------------------------------------------------


def n_blocks_for(n, block_size):
    """Return nb = ceil(n / block_size), the number of blocks (the last may be short)."""
    return -(-n // block_size)


def fallback_length(block_size, num_random_blocks):
    """Return (5 + 2R) b: sequences at most this long use full attention."""
    return (5 + 2 * num_random_blocks) * block_size


def normalize_global_blocks(global_blocks, n_blocks):
    """Return the global block indices as a sorted int64 array; negatives count from the end.

    Raises ValueError for an index outside [-nb, nb) or an index given twice
    (after negative indices are converted, so 0 and -nb repeat each other).
    """
    if isinstance(global_blocks, (str, bytes)) or not np.iterable(global_blocks):
        raise TypeError(f"global_blocks must be a sequence of block indices, got {global_blocks!r}")
    values = list(global_blocks)
    blocks = []
    for value in values:
        check_int("global_blocks entry", value)
        if not -n_blocks <= value < n_blocks:
            raise ValueError(
                f"global_blocks entry {value} is out of range for nb={n_blocks} blocks; "
                f"expected an index in [{-n_blocks}, {n_blocks})"
            )
        blocks.append(int(value) % n_blocks)
    if len(set(blocks)) != len(blocks):
        raise ValueError(
            f"global_blocks={tuple(values)} names a block twice (as blocks {blocks} of nb={n_blocks}); "
            f"expected distinct blocks"
        )
    return np.array(sorted(blocks), dtype=np.int64)


def normalize_global_tokens(global_tokens, n):
    """Return the global token positions as a sorted int64 array (empty for None).

    Raises ValueError for a position outside [0, N) or a position given twice.
    """
    if global_tokens is None:
        return np.zeros(0, dtype=np.int64)
    tokens = np.asarray(global_tokens)
    if tokens.size == 0:
        return np.zeros(0, dtype=np.int64)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(
            f"global_tokens must be a 1-D sequence of integer positions, got {tokens.dtype} "
            f"with shape {tokens.shape}"
        )
    if tokens.min() < 0 or tokens.max() >= n:
        bad = tokens[(tokens < 0) | (tokens >= n)]
        raise ValueError(f"global_tokens {bad.tolist()} are out of range; expected positions in [0, {n})")
    unique, counts = np.unique(tokens, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(f"global_tokens repeats positions {unique[counts > 1].tolist()}; expected distinct positions")
    return unique.astype(np.int64)


def _check_block_size(block_size, n):
    check_int("block_size", block_size, minimum=1)
    if block_size > n:
        raise ValueError(f"block_size={block_size} is invalid for N={n}; expected 1 <= block_size <= N")


def _fixed_blocks(i, n_blocks, global_blocks):
    """Return the window blocks i-1, i, i+1 (those that exist) united with the global blocks."""
    window = np.arange(max(i - 1, 0), min(i + 2, n_blocks))
    return np.union1d(window, global_blocks)


def random_block_adjacency(
    n_blocks, num_random_blocks, n_heads, rng, *, global_blocks=ITC_GLOBAL_BLOCKS, causal=False
):
    """Draw R distinct random key blocks for every non-global query block, per head.

    For head h and query block i (heads outer, blocks in increasing order),
    the candidates are the blocks that are neither in i's window
    {i-1, i, i+1} nor global; R of them are drawn without replacement with
    rng.choice and stored sorted. With causal=True the candidates are only
    the blocks before i - 1 (strictly in the past of block i, outside its
    window) that are not global; a block with c < R of them gets all c,
    sorted, followed by R - c entries -1. The same generator state gives
    the same adjacency. Rows of global blocks attend everything and
    contain -1.

    Inputs:
    - n_blocks: nb; num_random_blocks: R >= 0; n_heads: H >= 1
    - rng: numpy.random.Generator (advanced by the draws)
    - global_blocks: block indices excluded as candidates (negatives count from the end)
    - causal: draw only past blocks (see the module docstring)

    Returns random_blocks, int64 (H, nb, R).
    Raises ValueError when causal is False and some query block has fewer
    than R candidates.

    NOTE: this is the rule of the reference code's per-head generator for
    general lengths. Its fixed plans for N in {1024, 2048, 3072, 4096} (with
    random blocks only from the first 1024 tokens, sometimes equal to a
    window or global block) are not reproduced; pass such an adjacency
    explicitly, with duplicates="count" to weight repeats as it does.
    """
    check_int("n_blocks", n_blocks, minimum=1)
    check_int("num_random_blocks", num_random_blocks, minimum=0)
    check_int("n_heads", n_heads, minimum=1)
    check_generator("rng", rng)
    global_blocks = normalize_global_blocks(global_blocks, n_blocks)

    random_blocks = np.full((n_heads, n_blocks, num_random_blocks), -1, dtype=np.int64)  # (H, nb, R)
    not_global = np.ones(n_blocks, dtype=bool)
    not_global[global_blocks] = False
    for head in range(n_heads):
        for i in np.flatnonzero(not_global):
            legal = not_global.copy()
            if causal:
                legal[max(i - 1, 0) :] = False  # the window and everything after it
            else:
                legal[max(i - 1, 0) : i + 2] = False
            candidates = np.flatnonzero(legal)
            if causal:
                drawn = rng.choice(candidates, size=min(num_random_blocks, candidates.size), replace=False)
                random_blocks[head, i, : drawn.size] = np.sort(drawn)  # -1 stays in the unused slots
                continue
            if candidates.size < num_random_blocks:
                raise ValueError(
                    f"query block {i} of nb={n_blocks} has only {candidates.size} blocks outside its "
                    f"window and the global blocks; num_random_blocks={num_random_blocks} needs at least "
                    f"that many (use a longer sequence, a smaller block_size or fewer random blocks)"
                )
            drawn = rng.choice(candidates, size=num_random_blocks, replace=False)
            random_blocks[head, i] = np.sort(drawn)
    return random_blocks


def check_random_blocks(random_blocks, n_blocks, global_blocks, *, n_heads=None, causal=False):
    """Check an explicit adjacency (H, nb, R) (or (nb, R) when n_heads is None).

    Entries of non-global rows must be block indices in [0, nb); with
    causal=True they may also be -1 (no block). Rows of global blocks are
    not read. Repeats and window or global blocks are allowed (the
    reference code's own plans contain them); ``duplicates`` decides how
    they count. Under causal attention a future block is allowed and
    contributes no key (the causal mask removes it).
    """
    if not isinstance(random_blocks, np.ndarray) or not np.issubdtype(random_blocks.dtype, np.integer):
        raise TypeError(
            f"random_blocks must be an integer numpy.ndarray, got "
            f"{getattr(random_blocks, 'dtype', type(random_blocks).__name__)}"
        )
    expected_ndim = 2 if n_heads is None else 3
    if random_blocks.ndim != expected_ndim or random_blocks.shape[-2] != n_blocks or (
        n_heads is not None and random_blocks.shape[0] != n_heads
    ):
        expected = "(nb, R)" if n_heads is None else f"(H={n_heads}, nb, R)"
        raise ValueError(f"random_blocks has shape {random_blocks.shape}; expected {expected} with nb={n_blocks}")
    rows = np.setdiff1d(np.arange(n_blocks), global_blocks)
    used = random_blocks[..., rows, :]
    lowest = -1 if causal else 0
    if used.size and (used.min() < lowest or used.max() >= n_blocks):
        expected = f"indices in [0, {n_blocks}) or -1 (no block, causal only)" if causal else (
            f"indices in [0, {n_blocks}) (-1 is allowed only with causal=True)"
        )
        raise ValueError(
            f"random_blocks contains block indices from {used.min()} to {used.max()} in non-global rows; "
            f"expected {expected}"
        )


def block_counts(n_blocks, random_blocks=None, *, global_blocks=ITC_GLOBAL_BLOCKS, duplicates="merge"):
    """Return how often each query block lists each key block, int64 (..., nb, nb).

    Global rows list every block once. Other rows list their window and the
    global blocks once (a set) and add their random blocks (entries -1 add
    nothing); under "merge" every count is clipped to 1. random_blocks
    (..., nb, R) or None (R = 0). The causal restriction is applied to
    tokens, in ``bigbird_mask``.
    This is the block-level dense specification; ``bigbird_mask`` expands it
    to tokens.
    """
    check_choice("duplicates", duplicates, DUPLICATE_RULES)
    global_blocks = normalize_global_blocks(global_blocks, n_blocks)
    if random_blocks is None:
        random_blocks = np.zeros((n_blocks, 0), dtype=np.int64)
    lead = random_blocks.shape[:-2]

    block = np.arange(n_blocks)
    counts = (np.abs(block[:, None] - block[None, :]) <= 1).astype(np.int64)  # window band (nb, nb)
    counts[:, global_blocks] = 1
    counts = np.broadcast_to(counts, lead + (n_blocks, n_blocks)).copy()  # (..., nb, nb)

    n_patterns = int(np.prod(lead))  # 1 for a single head
    flat_counts = counts.reshape(n_patterns, n_blocks, n_blocks)
    flat_random = random_blocks.reshape(n_patterns, n_blocks, random_blocks.shape[-1])
    rows = np.setdiff1d(block, global_blocks)
    for counts_head, random_head in zip(flat_counts, flat_random):
        drawn = random_head[rows]  # (nb - G, R)
        query_blocks = np.broadcast_to(rows[:, None], drawn.shape)
        present = drawn >= 0  # -1 marks "no block"
        np.add.at(counts_head, (query_blocks[present], drawn[present]), 1)  # a block drawn twice counts twice
    if duplicates == "merge":
        np.minimum(counts, 1, out=counts)
    counts[..., global_blocks, :] = 1
    return counts


def bigbird_mask(
    n,
    block_size,
    random_blocks=None,
    *,
    global_blocks=ITC_GLOBAL_BLOCKS,
    global_tokens=None,
    duplicates="merge",
    causal=False,
):
    """Return the dense specification of the pattern: (allowed, logit_bias).

    Inputs:
    - n: sequence length N; block_size: b, 1 <= b <= N
    - random_blocks: (nb, R) for one head or (H, nb, R), or None for R = 0
    - global_blocks: global block indices (ITC: (0, -1)); () for none
    - global_tokens: extra global token positions (ETC), or None
    - duplicates: "merge" or "count" (see the module docstring)
    - causal: intersect the pattern with the causal mask (key j <= query i);
      random_blocks may then contain -1 (no block)

    Returns:
    - allowed: bool (N, N) or (H, N, N), True where query i attends key j
    - logit_bias: float64 log c_ij of the same shape under "count" (0 where
      a key is listed once), None under "merge". Dense attention with this
      mask and bias equals the block-sparse attention.
    """
    check_int("n", n, minimum=1)
    _check_block_size(block_size, n)
    n_blocks = n_blocks_for(n, block_size)
    global_block_ids = normalize_global_blocks(global_blocks, n_blocks)
    tokens = normalize_global_tokens(global_tokens, n)
    if random_blocks is not None:
        per_head = getattr(random_blocks, "ndim", 0) == 3
        n_heads = random_blocks.shape[0] if per_head else None
        check_random_blocks(random_blocks, n_blocks, global_block_ids, n_heads=n_heads, causal=causal)

    # 1. Block level: how often query block i lists key block j.
    counts = block_counts(n_blocks, random_blocks, global_blocks=global_block_ids, duplicates=duplicates)

    # 2. Token level: token t lies in block t // b.
    block_of = np.arange(n) // block_size  # (N,)
    token_counts = counts[..., block_of[:, None], block_of[None, :]]  # (..., N, N)

    # 3. Global tokens: every query lists their columns once more. Global rows (the
    #    tokens of global blocks and the global tokens) see every key exactly once.
    if duplicates == "count":
        token_counts[..., :, tokens] += 1
    else:
        token_counts[..., :, tokens] = 1
    global_rows = np.isin(block_of, global_block_ids)  # (N,)
    global_rows[tokens] = True
    token_counts[..., global_rows, :] = 1

    # 4. Causal: keep only the keys in each query's past (the whole plan, global rows included).
    if causal:
        token_counts *= causal_mask(n, n)

    allowed = token_counts > 0
    if duplicates == "merge":
        return allowed, None
    logit_bias = np.log(np.maximum(token_counts, 1).astype(np.float64))
    return allowed, logit_bias


def bigbird_pattern(
    n,
    block_size,
    random_blocks=None,
    *,
    global_blocks=ITC_GLOBAL_BLOCKS,
    global_tokens=None,
    duplicates="merge",
    causal=False,
):
    """Return the CSR pattern (indptr, indices) of one head: the keys each query attends.

    Inputs are those of ``bigbird_mask`` with random_blocks (nb, R) for one
    head. Each row lists its keys in increasing order. Under "count" a key
    listed c times appears c times in its row, and the sparse core attends
    it c times. Under "merge" it appears once. With causal=True each row
    keeps the keys up to and including its own position.

    Returns indptr int64 (N + 1,) and indices int64 (nnz,).
    """
    check_int("n", n, minimum=1)
    _check_block_size(block_size, n)
    check_choice("duplicates", duplicates, DUPLICATE_RULES)
    n_blocks = n_blocks_for(n, block_size)
    global_blocks = normalize_global_blocks(global_blocks, n_blocks)
    tokens = normalize_global_tokens(global_tokens, n)
    if random_blocks is None:
        random_blocks = np.zeros((n_blocks, 0), dtype=np.int64)
    check_random_blocks(random_blocks, n_blocks, global_blocks, causal=causal)

    starts = np.arange(n_blocks) * block_size  # (nb,) first token of each block
    ends = np.minimum(starts + block_size, n)  # (nb,) one past the last token
    is_global_row = np.zeros(n, dtype=bool)
    is_global_row[tokens] = True
    all_keys = np.arange(n, dtype=np.int64)  # (N,) the row of a global query

    def past(keys, row):
        """Return the sorted keys up to position row when causal, else all of them."""
        return keys[: np.searchsorted(keys, row, side="right")] if causal else keys

    # One key list per query block, shared by its rows; global rows get all keys
    # (all keys up to themselves when causal).
    row_keys = []
    for i in range(n_blocks):
        rows = range(starts[i], ends[i])
        if i in global_blocks:
            row_keys.extend(past(all_keys, row) for row in rows)
            continue
        drawn = random_blocks[i][random_blocks[i] >= 0]  # (<= R,) -1 marks "no block"
        key_blocks = np.concatenate([_fixed_blocks(i, n_blocks, global_blocks), drawn])
        key_blocks = np.unique(key_blocks) if duplicates == "merge" else np.sort(key_blocks)
        keys = np.concatenate([np.arange(starts[j], ends[j]) for j in key_blocks] + [tokens])
        keys = np.unique(keys) if duplicates == "merge" else np.sort(keys)  # CSR rows are sorted
        keys = keys.astype(np.int64)
        row_keys.extend(past(all_keys if is_global_row[row] else keys, row) for row in rows)

    lengths = np.fromiter((keys.size for keys in row_keys), dtype=np.int64, count=n)  # (N,)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    indices = np.concatenate(row_keys)  # (nnz,)
    return indptr, indices


# --- attention -------------------------------------------------------------------


def _restrict_pattern(indptr, indices, allowed):
    """Keep the entries (i, j) of a CSR pattern where allowed[i, j] is True."""
    rows = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))  # (nnz,) query of each entry
    keep = allowed[rows, indices]  # (nnz,)
    kept_per_row = np.bincount(rows[keep], minlength=indptr.size - 1)  # (N,)
    new_indptr = np.zeros_like(indptr)
    np.cumsum(kept_per_row, out=new_indptr[1:])
    return new_indptr, indices[keep]


def attention_forward(
    q,
    k,
    v,
    *,
    block_size,
    num_random_blocks,
    random_blocks=None,
    rng=None,
    global_blocks=ITC_GLOBAL_BLOCKS,
    global_tokens=None,
    duplicates="merge",
    mask=None,
    causal=False,
    scale=None,
    backend=None,
    patterns=None,
):
    """BigBird block-sparse self-attention of q, k (..., H, N, D) and v (..., H, N, Dv).

    Inputs:
    - q, k: (..., H, N, D); v: (..., H, N, Dv); one N for all three (self-attention)
    - block_size: b >= 1; num_random_blocks: R >= 0
    - random_blocks: int (H, nb, R) adjacency, or None to draw one from rng
      with ``random_block_adjacency`` (then returned in the cache)
    - rng: numpy.random.Generator, needed when random_blocks is None
    - global_blocks, global_tokens, duplicates: see ``bigbird_mask``
    - mask: optional bool mask broadcastable to (..., H, N, N), e.g. a key
      padding mask; a query whose pattern keeps no key gets a zero row
    - causal: restrict the pattern to each query's past (see the module
      docstring); random_blocks may then contain -1 (no block)
    - scale: score scale, 1/sqrt(D) by default; backend: sparse kernel backend
    - patterns: optional list of the H CSR patterns that ``bigbird_pattern``
      makes for these random blocks and options. The method object passes
      its kept patterns to skip rebuilding them. They are not checked
      against random_blocks.

    When N <= (5 + 2R) b this call computes full dense attention instead,
    causal when causal=True (random_blocks and rng are then not used).

    Returns (out, cache): out (..., H, N, Dv); the cache contains the path
    ("block_sparse" or "full"), the adjacency, the pattern of every head and,
    per head (or per slice when a mask is given), the pattern actually used
    and the sparse core's cache.
    """
    check_attention_inputs(q, k, v)
    if q.ndim < 3:
        raise ValueError(f"q has shape {q.shape}; expected (..., H, N, D) with a head axis")
    n, n_keys, n_heads = q.shape[-2], k.shape[-2], q.shape[-3]
    if n_keys != n:
        raise ValueError(
            f"BigBird pairs query block i with key block i, so it needs as many keys as queries; "
            f"got N={n} queries and M={n_keys} keys"
        )
    check_int("block_size", block_size, minimum=1)
    check_int("num_random_blocks", num_random_blocks, minimum=0)
    check_choice("duplicates", duplicates, DUPLICATE_RULES)
    scores_shape = q.shape[:-1] + (n,)
    if mask is not None:
        check_mask(mask, scores_shape)
    if scale is not None:
        check_real("scale", scale)

    # 0. Short sequences: full attention for this call only.
    if n <= fallback_length(block_size, num_random_blocks):
        out, dense_cache = dense_attention_forward(q, k, v, mask=mask, causal=causal, scale=scale)
        return out, {"path": "full", "dense_cache": dense_cache, "random_blocks": None}

    n_blocks = n_blocks_for(n, block_size)
    global_block_ids = normalize_global_blocks(global_blocks, n_blocks)
    if random_blocks is None:
        if rng is None:
            raise ValueError("random_blocks is None, so rng (a numpy.random.Generator) is needed to draw them")
        random_blocks = random_block_adjacency(
            n_blocks, num_random_blocks, n_heads, rng, global_blocks=global_block_ids, causal=causal
        )
    check_random_blocks(random_blocks, n_blocks, global_block_ids, n_heads=n_heads, causal=causal)
    if random_blocks.shape[-1] != num_random_blocks:
        raise ValueError(
            f"random_blocks has R={random_blocks.shape[-1]} blocks per row but "
            f"num_random_blocks={num_random_blocks}"
        )

    # 1. One CSR pattern per head (the random blocks differ between heads).
    if patterns is None:
        patterns = [
            bigbird_pattern(
                n, block_size, random_blocks[head], global_blocks=global_block_ids,
                global_tokens=global_tokens, duplicates=duplicates, causal=causal,
            )
            for head in range(n_heads)
        ]
    elif len(patterns) != n_heads:
        raise ValueError(f"patterns has {len(patterns)} entries; expected one CSR pattern per head (H={n_heads})")

    # 2. Sparse attention per head; with a mask, per (batch..., head) slice on the kept entries.
    #    A slice is named by the prefix of its index: (..., head) or (b..., head).
    out = np.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)  # (..., H, N, Dv)
    slice_caches = []
    if mask is None:
        slices = [((Ellipsis, head),) + patterns[head] for head in range(n_heads)]
    else:
        # NOTE: the core shares one pattern across its leading axes, so a mask (which may
        # differ per batch entry) costs one core call per (batch..., head) slice.
        full_mask = np.broadcast_to(mask, scores_shape)  # (..., H, N, N), a view
        slices = [
            (prefix,) + _restrict_pattern(*patterns[prefix[-1]], full_mask[prefix])
            for prefix in np.ndindex(q.shape[:-2])
        ]
    for prefix, indptr, indices in slices:
        rows = prefix + (slice(None), slice(None))
        out[rows], slice_cache = sparse_attention_forward(
            q[rows], k[rows], v[rows], indptr, indices, scale=scale, backend=backend
        )  # (..., N, Dv) or (N, Dv)
        slice_caches.append((prefix, indptr, indices, slice_cache))

    cache = {
        "path": "block_sparse",
        "random_blocks": random_blocks,
        "patterns": patterns,
        "slice_caches": slice_caches,
        "q_shape": q.shape,
        "v_shape": v.shape,
        "dtype": q.dtype,
    }
    return out, cache


def attention_backward(dout, cache):
    """Backward of attention_forward: returns (dq, dk, dv) shaped like (q, k, v).

    The cache contains the sparse core's cache of every head (or slice). The
    core recomputes the probabilities from its saved log-sum-exp and
    scatter-adds into dk and dv. On the full-attention path the dense
    backward runs instead.
    """
    if cache["path"] == "full":
        return dense_attention_backward(dout, cache["dense_cache"])[:3]

    check_upstream("dout", dout, cache["q_shape"][:-1] + cache["v_shape"][-1:])
    dq = np.zeros(cache["q_shape"], dtype=cache["dtype"])  # (..., H, N, D)
    dk = np.zeros_like(dq)  # (..., H, N, D)
    dv = np.zeros(cache["v_shape"], dtype=cache["dtype"])  # (..., H, N, Dv)

    # 2. out[slice] = sparse attention of the slice (slices do not overlap).
    for prefix, _, _, slice_cache in cache["slice_caches"]:
        rows = prefix + (slice(None), slice(None))
        dq[rows], dk[rows], dv[rows] = sparse_attention_backward(dout[rows], slice_cache)

    # 1. The patterns are constants (fixed random blocks): no gradient flows into them.
    return dq, dk, dv


# --- the method object -------------------------------------------------------------


class BigBirdAttention:
    """BigBird attention as a method object (see ``miniattn.methods``).

    The random adjacency of each (H, nb) is drawn from the kept generator on
    first use and reused by every later call of that shape, so the random
    blocks are fixed per layer, as in the reference implementations. The CSR
    patterns of each (H, N) are built once and kept as well. Causal calls
    draw and keep their own adjacency (past blocks only) and patterns.
    """

    name = "bigbird"

    def __init__(
        self,
        rng,
        *,
        block_size=64,
        num_random_blocks=3,
        global_blocks=ITC_GLOBAL_BLOCKS,
        global_tokens=None,
        duplicates="merge",
        scale=None,
        backend=None,
    ):
        check_generator("rng", rng)
        check_int("block_size", block_size, minimum=1)
        check_int("num_random_blocks", num_random_blocks, minimum=0)
        check_choice("duplicates", duplicates, DUPLICATE_RULES)
        if scale is not None:
            check_real("scale", scale)
        self.rng = rng
        self.block_size = block_size
        self.num_random_blocks = num_random_blocks
        self.global_blocks = tuple(global_blocks)
        self.global_tokens = None if global_tokens is None else tuple(global_tokens)
        self.duplicates = duplicates
        self.scale = scale
        self.backend = backend
        self.adjacency = {}  # (H, nb, causal) -> random_blocks (H, nb, R)
        self.patterns = {}  # (H, N, causal) -> list of H (indptr, indices) pairs

    def random_blocks_for(self, n_heads, n, causal=False):
        """Return the kept adjacency for H heads and length N, drawing it on first use."""
        n_blocks = n_blocks_for(n, self.block_size)
        key = (n_heads, n_blocks, bool(causal))
        if key not in self.adjacency:
            self.adjacency[key] = random_block_adjacency(
                n_blocks, self.num_random_blocks, n_heads, self.rng, global_blocks=self.global_blocks,
                causal=causal,
            )
        return self.adjacency[key]

    def patterns_for(self, n_heads, n, causal=False):
        """Return the kept CSR patterns of the H heads for length N, building them on first use."""
        key = (n_heads, n, bool(causal))
        if key not in self.patterns:
            random_blocks = self.random_blocks_for(n_heads, n, causal)
            self.patterns[key] = [
                bigbird_pattern(
                    n, self.block_size, random_blocks[head], global_blocks=self.global_blocks,
                    global_tokens=self.global_tokens, duplicates=self.duplicates, causal=causal,
                )
                for head in range(n_heads)
            ]
        return self.patterns[key]

    def forward(self, q, k, v, *, mask=None, causal=False):
        n = q.shape[-2]
        random_blocks = patterns = None
        block_plan = n > fallback_length(self.block_size, self.num_random_blocks)
        if block_plan and q.ndim >= 3 and k.shape[-2] == n:
            random_blocks = self.random_blocks_for(q.shape[-3], n, causal)
            patterns = self.patterns_for(q.shape[-3], n, causal)
        return attention_forward(
            q, k, v, block_size=self.block_size, num_random_blocks=self.num_random_blocks,
            random_blocks=random_blocks, global_blocks=self.global_blocks,
            global_tokens=self.global_tokens, duplicates=self.duplicates, mask=mask,
            causal=causal, scale=self.scale, backend=self.backend, patterns=patterns,
        )

    def backward(self, dout, cache):
        return attention_backward(dout, cache)

    def keys_seen(self, cache):
        """Return the bool (..., H, N, N) keys each query attended, or None for full attention.

        On the full-attention path this is the dense mask actually used (the
        causal mask combined with any given mask), or None when every key was
        allowed.
        """
        if cache["path"] == "full":
            return cache["dense_cache"]["allowed"]
        shape = cache["q_shape"]
        seen = np.zeros(shape[:-1] + (shape[-2],), dtype=bool)  # (..., H, N, N)
        for prefix, indptr, indices, _ in cache["slice_caches"]:
            rows = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))  # (nnz,) query of each entry
            seen[prefix + (rows, indices)] = True
        return seen


def make_method(rng=None, **options):
    """Return BigBirdAttention; rng (numpy.random.Generator) draws the random blocks.

    Options: block_size (64), num_random_blocks (3), global_blocks ((0, -1)),
    global_tokens (None), duplicates ("merge"), scale, backend. Without rng
    an unseeded generator is used, so the random blocks differ between runs.
    """
    rng = np.random.default_rng() if rng is None else rng
    return BigBirdAttention(rng, **options)


def gradcheck_cases(rng):
    """Return small float64 gradient-check cases (label, forward, backward, inputs, names).

    The random blocks are drawn once per case and closed over, so the
    finite differences move q, k and v only.
    """
    cases = []
    settings = (
        ("ITC, N=19 not a multiple of b=2, R=1", 19, 2, 1, None, "merge", False, False),
        ("ETC global tokens 4 and 11, count", 17, 2, 1, (4, 11), "count", False, False),
        ("all-zero adjacency, count (key block 0 twice)", 16, 2, 1, None, "count", True, False),
        ("causal ITC, N=19, b=2, R=2 (early blocks draw fewer)", 19, 2, 2, None, "merge", False, True),
        ("causal ETC global tokens 4 and 11, count", 17, 2, 1, (4, 11), "count", False, True),
        ("causal all-zero adjacency, count (key block 0 twice)", 16, 2, 1, None, "count", True, True),
    )
    for label, n, block_size, n_random, tokens, duplicates, zero_adjacency, causal in settings:
        n_blocks = n_blocks_for(n, block_size)
        random_blocks = random_block_adjacency(n_blocks, n_random, 2, rng, causal=causal)  # (H, nb, R)
        if zero_adjacency:
            random_blocks[:, 1:-1] = 0
        q, k, v = (rng.standard_normal((1, 2, n, 3)) for _ in range(3))  # (B, H, N, D)

        def forward(q, k, v, random_blocks=random_blocks, block_size=block_size, n_random=n_random,
                    tokens=tokens, duplicates=duplicates, causal=causal):
            return attention_forward(
                q, k, v, block_size=block_size, num_random_blocks=n_random, random_blocks=random_blocks,
                global_tokens=tokens, duplicates=duplicates, causal=causal,
            )

        cases.append((label, forward, attention_backward, (q, k, v), ("q", "k", "v")))
    return cases
