"""Angular LSH bucketing and the stable sort by bucket, NumPy references and dispatch.

Letters: N positions, D vector width, K hash rounds, L padded length (L >= N),
nb buckets per round (even), h = nb / 2 rotation columns.

Angular locality-sensitive hashing (Andoni et al. 2015, as used by Reformer).
Each round r draws a random Gaussian matrix R_r (D, h) and hashes a vector x to

    bucket_r(x) = argmax([x R_r, -x R_r])          in {0, ..., nb - 1}

the index of the signed random direction closest in angle to x. Vectors at a
small angle land in the same bucket with high probability. Scaling x by a
positive number scales every projection alike, so the bucket depends only on
the direction of x. Ties go to the first maximum (NumPy's argmax rule), so a
zero vector hashes to bucket 0.

Bucket ids. Every round owns nb + 1 consecutive ids: its nb hash buckets and
one padding bucket (id nb within the round) for positions t >= N that an
attention layer adds to reach a multiple of its chunk length. The id of
position t in round r is

    r * (nb + 1) + bucket_r(x_t)        for t < N
    r * (nb + 1) + nb                   for N <= t < L

so rounds never share an id and padding sorts to the end of its round.

Sort. The K * L items (round r, position t) are numbered s = r * L + t and
sorted by the key L * id_s + t, which orders them by (round, bucket,
position). The key is unique, so the order is fully determined; ``sticker``
lists the items in sorted order and ``undo`` is its inverse permutation
(undo[sticker[i]] = i), which puts sorted results back in item order.

Backends. The projections x R are BLAS matmuls computed here (one per block
of rows) and shared by both backends, so the compiled kernels receive exactly
the numbers the NumPy references receive. The compiled ``lsh_buckets`` (argmax with first-maximum
ties) and ``lsh_sort`` (a counting sort over the bucket ids, stable in s)
therefore return the same integers as the references, bit for bit.

Complexity: hashing O(K N D h); the reference sort O(K L log(K L)), the
compiled counting sort O(K L + K nb).
"""

import numpy as np

from .kernels import resolve_backend
from .validate import check_float_array, check_generator, check_int


def draw_rotations(rng, n_rounds, width, n_buckets, *, dtype=np.float64):
    """Draw the random matrices of angular LSH: (K, D, nb / 2) i.i.d. standard normal.

    The columns are not orthogonalised. rng is a numpy.random.Generator, so
    the draw is repeatable.
    """
    check_generator("rng", rng)
    check_int("n_rounds", n_rounds, minimum=1)
    check_int("width", width, minimum=1)
    check_n_buckets(n_buckets)
    return rng.standard_normal((n_rounds, width, n_buckets // 2)).astype(dtype)  # (K, D, h)


def check_n_buckets(n_buckets):
    """Check that the bucket count is a positive even integer."""
    check_int("n_buckets", n_buckets)
    if n_buckets < 2 or n_buckets % 2:
        raise ValueError(
            f"n_buckets={n_buckets} is invalid; angular LSH needs a positive even number of "
            f"buckets (argmax over [xR, -xR] gives two buckets per rotation column)"
        )


def check_rotations(rotations, width, n_buckets=None, n_rounds=None):
    """Check rotations (K, D, nb / 2) against the vector width D, nb and K (each when not None)."""
    check_float_array("rotations", rotations, min_ndim=1)
    expected = (
        "K" if n_rounds is None else str(n_rounds),
        "D" if width is None else str(width),
        "nb/2" if n_buckets is None else str(n_buckets // 2),
    )
    shape_ok = (
        rotations.ndim == 3
        and (width is None or rotations.shape[1] == width)
        and rotations.shape[2] >= 1
        and (n_rounds is None or rotations.shape[0] == n_rounds)
        and (n_buckets is None or rotations.shape[2] == n_buckets // 2)
    )
    if not shape_ok:
        raise ValueError(
            f"rotations has shape {rotations.shape}; expected ({', '.join(expected)}) = "
            f"(rounds, vector width, buckets / 2)"
        )


# --- bucketing ------------------------------------------------------------------

# Rows projected at a time: a block of projections (rows, K, h) stays in cache
# between the matmul that writes it and the argmax that reads it.
BLOCK_ROWS = 4096


def lsh_buckets_reference(projected):
    """Return bucket ids (K, M) from projections x R of shape (M, K, h).

    Entry [r, t] is r (nb + 1) + argmax([p, -p]) of p = projected[t, r],
    the first maximum winning ties.
    """
    n_rounds, half = projected.shape[1:]
    n_buckets = 2 * half
    signed = np.concatenate([projected, -projected], axis=-1)  # (M, K, nb)
    buckets = np.argmax(signed, axis=-1).T  # (K, M)
    return buckets + (n_buckets + 1) * np.arange(n_rounds, dtype=np.int64)[:, None]


def lsh_hash(x, rotations, *, length=None, backend=None):
    """Hash x (..., N, D) with rotations (K, D, nb / 2) into bucket ids (..., K, L).

    length is the padded length L >= N (default N); positions N..L-1 get
    their round's padding bucket. Ids include the round offset r (nb + 1),
    see the module docstring. backend is "numpy", "cython" or None (default).
    """
    check_float_array("x", x, min_ndim=2)
    if getattr(rotations, "ndim", 0) == 3 and rotations.shape[1] != x.shape[-1]:
        raise ValueError(
            f"x has vector width D={x.shape[-1]} but rotations has shape {rotations.shape}, "
            f"made for width {rotations.shape[1]}; expected rotations (K, {x.shape[-1]}, nb/2)"
        )
    check_rotations(rotations, x.shape[-1])
    n_positions = x.shape[-2]
    length = n_positions if length is None else length
    check_int("length", length, minimum=n_positions)
    module = resolve_backend(backend)
    argmax = lsh_buckets_reference if module is None else module.lsh_buckets

    lead = x.shape[:-2]
    n_rounds, width, half = rotations.shape
    n_buckets = 2 * half
    groups = x.reshape(-1, n_positions, width)  # (G, N, D)
    columns = rotations.astype(x.dtype, copy=False).transpose(1, 0, 2).reshape(width, n_rounds * half)  # (D, K h)
    offsets = (n_buckets + 1) * np.arange(n_rounds, dtype=np.int64)[:, None]  # (K, 1)
    buckets = np.empty((groups.shape[0], n_rounds, length), dtype=np.int64)  # (G, K, L)
    buckets[:, :, n_positions:] = offsets + n_buckets  # the padding id of each round

    for group, rows in enumerate(groups):
        for start in range(0, n_positions, BLOCK_ROWS):
            block = rows[start:start + BLOCK_ROWS]  # (M, D)
            # 1. Project on every round's random directions: one BLAS call, shared by both backends.
            projected = (block @ columns).reshape(-1, n_rounds, half)  # (M, D) @ (D, K h) -> (M, K, h)
            # 2. Argmax over the signed projections, plus the round offsets.
            buckets[group, :, start:start + block.shape[0]] = argmax(projected)  # (K, M)
    return buckets.reshape(lead + buckets.shape[1:])  # (..., K, L)


# --- sorting --------------------------------------------------------------------


def lsh_sort_reference(buckets, length):
    """Return (sticker, undo), both (G, K * L), for flattened bucket ids (G, K * L).

    sticker[g] lists the items s = r L + t sorted by (bucket id, t mod L),
    which is (round, bucket, position); undo[g] is its inverse permutation.
    """
    ticker = np.arange(buckets.shape[-1], dtype=np.int64)  # (K L,)
    keys = length * buckets + ticker % length  # (G, K L), unique within a row
    sticker = np.argsort(keys, axis=-1, kind="stable")  # (G, K L)
    undo = np.argsort(sticker, axis=-1, kind="stable")  # (G, K L)
    return sticker, undo


def lsh_sort(buckets, *, backend=None):
    """Sort the items of bucket ids (..., K, L) by (round, bucket, position).

    Returns (sticker, undo), each (..., K * L) int64: sticker[i] is the item
    s = r L + t at sorted place i, and undo[s] is the sorted place of item s.
    """
    buckets = np.asarray(buckets)
    if not np.issubdtype(buckets.dtype, np.integer):
        raise TypeError(f"buckets has dtype {buckets.dtype}; expected integer bucket ids (..., K, L)")
    if buckets.ndim < 2:
        raise ValueError(f"buckets has shape {buckets.shape}; expected (..., K, L) with a round axis K")
    if buckets.size and buckets.min() < 0:
        raise ValueError(f"buckets must be non-negative ids, got a minimum of {buckets.min()}")
    length = buckets.shape[-1]
    lead = buckets.shape[:-2]
    flat = np.ascontiguousarray(buckets.reshape(-1, buckets.shape[-2] * length), dtype=np.int64)  # (G, K L)

    module = resolve_backend(backend)
    # NOTE: the compiled counting sort allocates (largest id + 1) counters per group. Ids from
    # lsh_hash are below K (nb + 1); hand-made ids near 2^40 exhaust memory instead of raising.
    if module is None:
        sticker, undo = lsh_sort_reference(flat, length)
    else:
        sticker, undo = module.lsh_sort(flat, length)
    return sticker.reshape(lead + (-1,)), undo.reshape(lead + (-1,))
