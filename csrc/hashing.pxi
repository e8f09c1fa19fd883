# Angular LSH bucketing and the counting sort by bucket.
# Included by _kernels.pyx; NumPy twins in miniattn/core/hashing.py.


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
    cdef Py_ssize_t t, r, j, best_index
    cdef floating best, lowest, value
    out_array = np.empty((n_rounds, n_rows), dtype=np.int64)
    cdef cnp.int64_t[:, ::1] out = out_array
    with nogil:
        for t in range(n_rows):
            for r in range(n_rounds):
                # The candidates in argmax order are +p_0 .. +p_{h-1}, then
                # -p_0 .. -p_{h-1}. A branch-free pass finds max(p) and min(p).
                # The winner is +max(p) unless -min(p) is strictly larger (on
                # equality the +p candidate comes first). A second pass finds
                # the first position of the winning value: the first maximum.
                best = projected[t, r, 0]
                lowest = best
                for j in range(1, half):
                    value = projected[t, r, j]
                    best = value if value > best else best
                    lowest = value if value < lowest else lowest
                if -lowest > best:
                    j = 0
                    while projected[t, r, j] != lowest:
                        j = j + 1
                    best_index = half + j
                else:
                    j = 0
                    while projected[t, r, j] != best:
                        j = j + 1
                    best_index = j
                out[r, t] = r * (n_buckets + 1) + best_index
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
