# Fused sparse attention over CSR key lists: forward and backward.
# Included by _kernels.pyx; the NumPy twins (same names with a _reference
# suffix, same arguments) are in miniattn/core/sparse.py.
#
# Forward, one query row at a time (rows run in parallel with prange):
# score each listed key, keep a running maximum m, a running sum l and a
# running weighted sum of values rescaled whenever m grows (online softmax),
# then divide by l and save lse = m + log l. No gathered copy of the keys or
# values is made.
#
# Backward, in two parallel passes so that no two threads write one row:
#   pass 1, over query rows: recompute p_t = exp(s_t - lse_i), ds_t, and dq_i;
#           store p_t and ds_t per listed pair (E, nnz);
#   pass 2, over key rows: walk the pairs that list key j (the transposed
#           pattern, built by a counting sort that keeps pair order) and
#           sum dk_j and dv_j in pair order, as np.add.at does.
# Every sum runs in double precision, for float32 inputs too.

cimport openmp
from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY, exp, log
from libc.stdlib cimport free, malloc

# Below this many multiply-adds a call runs on one thread: starting and
# joining OpenMP threads would cost more than the work.
cdef Py_ssize_t PARALLEL_MIN_WORK = 1 << 20


cdef int thread_count(Py_ssize_t work) noexcept nogil:
    return openmp.omp_get_max_threads() if work >= PARALLEL_MIN_WORK else 1


cdef inline double dot(const floating *a, const floating *b, Py_ssize_t n) noexcept nogil:
    """Return sum_d a[d] b[d] in double precision.

    Four partial sums break the chain of dependent additions, so the CPU
    overlaps them; the summation order differs from NumPy's by rounding only.
    """
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    cdef Py_ssize_t d = 0
    while d + 4 <= n:
        s0 += a[d] * <double> b[d]
        s1 += a[d + 1] * <double> b[d + 1]
        s2 += a[d + 2] * <double> b[d + 2]
        s3 += a[d + 3] * <double> b[d + 3]
        d += 4
    while d < n:
        s0 += a[d] * <double> b[d]
        d += 1
    return (s0 + s1) + (s2 + s3)


def sparse_csr_forward(
    const floating[:, :, ::1] q,
    const floating[:, :, ::1] k,
    const floating[:, :, ::1] v,
    const cnp.int64_t[::1] indptr,
    const cnp.int64_t[::1] indices,
    const floating[::1] bias,
    double scale,
):
    """Return (out (E, N, Dv), lse (E, N)) of sparse attention on a CSR pattern."""
    cdef Py_ssize_t n_entries = q.shape[0], n_queries = q.shape[1]
    cdef Py_ssize_t width = q.shape[2], value_width = v.shape[2]
    cdef Py_ssize_t row, e, i, t, j, d
    cdef double score, row_max, row_sum, correction, weight
    cdef double *acc
    cdef const floating *q_row
    cdef const floating *k_row
    cdef const floating *v_row
    dtype = np.float32 if floating is float else np.float64
    out_array = np.zeros((n_entries, n_queries, value_width), dtype=dtype)
    lse_array = np.empty((n_entries, n_queries), dtype=dtype)
    cdef floating[:, :, ::1] out = out_array
    cdef floating[:, ::1] lse = lse_array
    if n_entries * n_queries == 0:
        return out_array, lse_array

    cdef int n_threads = thread_count(n_entries * indices.shape[0] * (width + value_width))
    with nogil, parallel(num_threads=n_threads):
        acc = <double *> malloc(max(value_width, 1) * sizeof(double))
        for row in prange(n_entries * n_queries, schedule="guided"):
            e = row // n_queries
            i = row % n_queries
            q_row = &q[e, i, 0]
            row_max = -INFINITY
            row_sum = 0.0
            for d in range(value_width):
                acc[d] = 0.0
            for t in range(indptr[i], indptr[i + 1]):
                j = indices[t]
                k_row = &k[e, j, 0]
                v_row = &v[e, j, 0]
                score = dot(q_row, k_row, width) * scale + bias[t]
                if score > row_max:
                    # A new maximum: rescale what was summed so far (exp(-inf) = 0 at the start).
                    correction = exp(row_max - score)
                    row_sum = row_sum * correction
                    for d in range(value_width):
                        acc[d] = acc[d] * correction
                    row_max = score
                weight = exp(score - row_max)
                row_sum = row_sum + weight
                for d in range(value_width):
                    acc[d] = acc[d] + weight * v_row[d]
            if row_sum > 0.0:
                for d in range(value_width):
                    out[e, i, d] = <floating> (acc[d] / row_sum)
                lse[e, i] = <floating> (row_max + log(row_sum))
            else:
                lse[e, i] = <floating> -INFINITY  # empty row: zero output, lse = -inf
        free(acc)
    return out_array, lse_array


def sparse_csr_backward(
    const floating[:, :, ::1] dout,
    const floating[:, :, ::1] q,
    const floating[:, :, ::1] k,
    const floating[:, :, ::1] v,
    const floating[:, :, ::1] out,
    const floating[:, ::1] lse,
    const cnp.int64_t[::1] indptr,
    const cnp.int64_t[::1] indices,
    const floating[::1] bias,
    double scale,
):
    """Return (dq, dk, dv) of sparse_csr_forward, recomputing p from lse."""
    cdef Py_ssize_t n_entries = q.shape[0], n_queries = q.shape[1], n_keys = k.shape[1]
    cdef Py_ssize_t width = q.shape[2], value_width = v.shape[2]
    cdef Py_ssize_t nnz = indices.shape[0]
    cdef Py_ssize_t row, e, i, t, j, d, position
    cdef double score, prob, dprob, row_dot, dscore
    cdef double *acc
    cdef double *value_acc
    cdef const floating *q_row
    cdef const floating *k_row
    cdef const floating *v_row
    cdef const floating *dout_row
    dtype = np.float32 if floating is float else np.float64
    dq_array = np.zeros((n_entries, n_queries, width), dtype=dtype)
    dk_array = np.zeros((n_entries, n_keys, width), dtype=dtype)
    dv_array = np.zeros((n_entries, n_keys, value_width), dtype=dtype)
    cdef floating[:, :, ::1] dq = dq_array
    cdef floating[:, :, ::1] dk = dk_array
    cdef floating[:, :, ::1] dv = dv_array
    if n_entries == 0 or nnz == 0:
        return dq_array, dk_array, dv_array

    probs_array = np.empty((n_entries, nnz), dtype=np.float64)
    dscores_array = np.empty((n_entries, nnz), dtype=np.float64)
    key_indptr_array = np.zeros(n_keys + 1, dtype=np.int64)
    pairs_by_key_array = np.empty(nnz, dtype=np.int64)
    pair_row_array = np.empty(nnz, dtype=np.int64)
    next_slot_array = np.empty(n_keys, dtype=np.int64)
    cdef double[:, ::1] probs = probs_array
    cdef double[:, ::1] dscores = dscores_array
    cdef cnp.int64_t[::1] key_indptr = key_indptr_array
    cdef cnp.int64_t[::1] pairs_by_key = pairs_by_key_array
    cdef cnp.int64_t[::1] pair_row = pair_row_array
    cdef cnp.int64_t[::1] next_slot = next_slot_array

    with nogil:
        # Transposed pattern: the pairs listing key j are pairs_by_key[key_indptr[j]:key_indptr[j + 1]],
        # in increasing pair order (counting sort), and pair_row[t] is the query of pair t.
        for i in range(n_queries):
            for t in range(indptr[i], indptr[i + 1]):
                pair_row[t] = i
        for t in range(nnz):
            key_indptr[indices[t] + 1] += 1
        for j in range(n_keys):
            key_indptr[j + 1] += key_indptr[j]
            next_slot[j] = key_indptr[j]
        for t in range(nnz):
            j = indices[t]
            pairs_by_key[next_slot[j]] = t
            next_slot[j] += 1

    cdef int n_threads = thread_count(n_entries * nnz * (width + value_width))
    with nogil, parallel(num_threads=n_threads):
        acc = <double *> malloc(max(width, 1) * sizeof(double))

        # Pass 1, over query rows: p_t, ds_t = p_t (dp_t - Delta_i) and dq_i = scale sum_t ds_t k_j.
        for row in prange(n_entries * n_queries, schedule="guided"):
            e = row // n_queries
            i = row % n_queries
            q_row = &q[e, i, 0]
            dout_row = &dout[e, i, 0]
            row_dot = dot(dout_row, &out[e, i, 0], value_width)
            for d in range(width):
                acc[d] = 0.0
            for t in range(indptr[i], indptr[i + 1]):
                j = indices[t]
                k_row = &k[e, j, 0]
                v_row = &v[e, j, 0]
                score = dot(q_row, k_row, width) * scale + bias[t]
                prob = exp(score - lse[e, i])
                dprob = dot(dout_row, v_row, value_width)
                dscore = prob * (dprob - row_dot)
                probs[e, t] = prob
                dscores[e, t] = dscore
                for d in range(width):
                    acc[d] = acc[d] + dscore * k_row[d]
            for d in range(width):
                dq[e, i, d] = <floating> (acc[d] * scale)
        free(acc)

    with nogil, parallel(num_threads=n_threads):
        acc = <double *> malloc(max(width, 1) * sizeof(double))
        value_acc = <double *> malloc(max(value_width, 1) * sizeof(double))

        # Pass 2, over key rows: dk_j = scale sum_t ds_t q_i and dv_j = sum_t p_t dO_i, pairs in order.
        for row in prange(n_entries * n_keys, schedule="guided"):
            e = row // n_keys
            j = row % n_keys
            for d in range(width):
                acc[d] = 0.0
            for d in range(value_width):
                value_acc[d] = 0.0
            for position in range(key_indptr[j], key_indptr[j + 1]):
                t = pairs_by_key[position]
                i = pair_row[t]
                q_row = &q[e, i, 0]
                dout_row = &dout[e, i, 0]
                dscore = dscores[e, t]
                prob = probs[e, t]
                for d in range(width):
                    acc[d] = acc[d] + dscore * q_row[d]
                for d in range(value_width):
                    value_acc[d] = value_acc[d] + prob * dout_row[d]
            for d in range(width):
                dk[e, j, d] = <floating> (acc[d] * scale)
            for d in range(value_width):
                dv[e, j, d] = <floating> value_acc[d]
        free(acc)
        free(value_acc)
    return dq_array, dk_array, dv_array
