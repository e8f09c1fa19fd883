# Row gather and scatter-add: the gather/backward pair of every sparse method.
# Included by _kernels.pyx; NumPy twins in miniattn/core/kernels.py.


def gather_rows(floating[:, ::1] x, const cnp.int64_t[::1] indices):
    """Return x[indices] for a 2-D array x (M, D) and indices (K,)."""
    cdef Py_ssize_t count = indices.shape[0]
    cdef Py_ssize_t width = x.shape[1]
    cdef Py_ssize_t t, d, row
    dtype = np.float32 if floating is float else np.float64
    out_array = np.empty((count, width), dtype=dtype)
    cdef floating[:, ::1] out = out_array
    with nogil:
        for t in range(count):
            row = indices[t]
            for d in range(width):
                out[t, d] = x[row, d]
    return out_array


def scatter_add_rows(floating[:, ::1] rows, const cnp.int64_t[::1] indices, Py_ssize_t n_rows):
    """Return out (n_rows, D) with out[indices[t]] += rows[t] for every t.

    Rows are added in index order t = 0, 1, ..., so duplicate indices
    accumulate exactly as ``np.add.at`` does, bit for bit.
    """
    cdef Py_ssize_t count = indices.shape[0]
    cdef Py_ssize_t width = rows.shape[1]
    cdef Py_ssize_t t, d, row
    dtype = np.float32 if floating is float else np.float64
    out_array = np.zeros((n_rows, width), dtype=dtype)
    cdef floating[:, ::1] out = out_array
    with nogil:
        for t in range(count):
            row = indices[t]
            for d in range(width):
                out[row, d] += rows[t, d]
    return out_array
