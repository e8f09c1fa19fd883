# Angular LSH bucketing and the counting sort by bucket.
# Included by _kernels.pyx; NumPy twins in miniattn/core/hashing.py.


cdef inline Py_ssize_t signed_argmax(const floating* row, Py_ssize_t half) noexcept nogil:
    """Return the first maximum's index in [row, -row] (2 half candidates)."""
    cdef floating best0 = row[0], best1 = row[0], lowest0 = row[0], lowest1 = row[0]
    cdef floating best, lowest, value0, value1, target
    cdef Py_ssize_t j = 1, index, offset
    # 1. max(p) and min(p), with two independent accumulators each so that
    #    consecutive comparisons do not wait on each other. Max and min of a
    #    finite set do not depend on the order they are taken in.
    while j + 1 < half:
        value0 = row[j]
        value1 = row[j + 1]
        best0 = value0 if value0 > best0 else best0
        best1 = value1 if value1 > best1 else best1
        lowest0 = value0 if value0 < lowest0 else lowest0
        lowest1 = value1 if value1 < lowest1 else lowest1
        j = j + 2
    if j < half:
        best0 = row[j] if row[j] > best0 else best0
        lowest0 = row[j] if row[j] < lowest0 else lowest0
    best = best1 if best1 > best0 else best0
    lowest = lowest1 if lowest1 < lowest0 else lowest0
    # 2. The candidates in argmax order are +p_0 .. +p_{h-1}, then -p_0 .. -p_{h-1}.
    #    The winner is +max(p) unless -min(p) is strictly larger (on equality
    #    the +p candidate comes first); its first position is the first maximum.
    #    == treats -0.0 and 0.0 as equal, as NumPy's argmax does.
    target = lowest if -lowest > best else best
    offset = half if -lowest > best else 0
    # 3. The first position of the target, scanned backwards: each match
    #    overwrites the index, so the first one is left. A forward scan that
    #    stops at the first match mispredicts its exit about once per row. This
    #    scan compiles to conditional moves, and the whole argmax took 17 ns per
    #    row instead of 33 ns (h = 16, float64).
    index = 0
    j = half - 1
    while j >= 0:
        index = j if row[j] == target else index
        j = j - 1
    return offset + index


def lsh_buckets(floating[:, :, ::1] projected):
    """Return bucket ids (K, M) from projections x R of shape (M, K, h).

    Same contract as lsh_buckets_reference: entry [r, t] is
    r (nb + 1) + argmax([p, -p]) of p = projected[t, r], the first maximum
    winning ties.
    """
    cdef Py_ssize_t n_rows = projected.shape[0]
    cdef Py_ssize_t n_rounds = projected.shape[1]
    cdef Py_ssize_t half = projected.shape[2]
    cdef Py_ssize_t n_buckets = 2 * half
    cdef Py_ssize_t t, r
    out_array = np.empty((n_rounds, n_rows), dtype=np.int64)
    cdef cnp.int64_t[:, ::1] out = out_array
    with nogil:
        for t in range(n_rows):
            for r in range(n_rounds):
                out[r, t] = r * (n_buckets + 1) + signed_argmax(&projected[t, r, 0], half)
    return out_array


def lsh_sort(const cnp.int64_t[:, ::1] buckets, Py_ssize_t length):
    """Return (sticker, undo), both (G, K L), sorting items by (bucket id, position).

    Same contract as lsh_sort_reference. A counting sort over the bucket ids:
    items are placed in increasing item order s, so within one id (one round
    and one bucket) they stay in position order, which is the tie-break of
    the reference's key L * id + (s mod L). length is taken only to match
    the reference's signature: the ids already separate the rounds.
    """
    cdef Py_ssize_t n_groups = buckets.shape[0]
    cdef Py_ssize_t n_items = buckets.shape[1]
    cdef Py_ssize_t g, s, place, n_ids = 1
    cdef cnp.int64_t total, count
    for g in range(n_groups):
        for s in range(n_items):
            if buckets[g, s] + 1 > n_ids:
                n_ids = buckets[g, s] + 1
    sticker_array = np.empty((n_groups, n_items), dtype=np.int64)
    undo_array = np.empty((n_groups, n_items), dtype=np.int64)
    starts_array = np.zeros((n_groups, n_ids), dtype=np.int64)
    cdef cnp.int64_t[:, ::1] sticker = sticker_array
    cdef cnp.int64_t[:, ::1] undo = undo_array
    cdef cnp.int64_t[:, ::1] starts = starts_array
    with nogil:
        for g in range(n_groups):
            # 1. Count the items of each id.
            for s in range(n_items):
                starts[g, buckets[g, s]] += 1
            # 2. Exclusive prefix sum: the first sorted place of each id.
            total = 0
            for s in range(n_ids):
                count = starts[g, s]
                starts[g, s] = total
                total = total + count
            # 3. Place items in increasing s (stable), and record the inverse.
            for s in range(n_items):
                place = starts[g, buckets[g, s]]
                starts[g, buckets[g, s]] = place + 1
                sticker[g, place] = s
                undo[g, s] = place
    return sticker_array, undo_array
