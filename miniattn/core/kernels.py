"""Backend dispatch for the compiled kernels, and their NumPy references.

Each kernel has a NumPy reference here with the same name and signature as
its compiled twin in ``csrc/_kernels.pyx``. The reference is the readable
definition and the test oracle; the compiled one is the fast path.

The backend is chosen once, at import time:

- "cython" when the extension ``miniattn._kernels`` was built,
- "numpy" otherwise, or when the environment variable
  ``MINIATTN_BACKEND=numpy`` forces it.

``MINIATTN_BACKEND=cython`` raises ImportError when the extension is missing,
so a benchmark never measures the wrong backend by accident. Every dispatching
function also takes ``backend=`` to pick one explicitly (tests use this to
run both).
"""

import os

import numpy as np

from .validate import check_choice

# The compiled kernels run their loops on OpenMP threads, and NumPy's matrix
# products run on OpenBLAS's own threads. By default an idle OpenMP thread
# spins for a while before it sleeps, so on a machine with few cores the two
# pools take the cores from each other when the calls alternate: a sparse
# forward after a dense product took 5.5 ms instead of 2.9 ms at N = 1024 on 2
# cores. Passive waiting avoids that. The variable is read when the OpenMP
# runtime loads with the extension below; a value the user set is kept.
# WAIT_POLICY_SET_HERE records whether the value came from here, so that a
# benchmark can start other programs with the user's own environment.
WAIT_POLICY_SET_HERE = "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    from .. import _kernels as compiled
except ImportError:  # built without a compiler, or not built yet
    compiled = None

BACKENDS = ("numpy", "cython")


def _default_backend():
    requested = os.environ.get("MINIATTN_BACKEND", "").strip().lower()
    if requested:
        check_choice("MINIATTN_BACKEND", requested, BACKENDS)
        if requested == "cython" and compiled is None:
            raise ImportError(
                "MINIATTN_BACKEND=cython but the extension miniattn._kernels is not built; "
                "reinstall with a C compiler available (pip install -e .)"
            )
        return requested
    return "cython" if compiled is not None else "numpy"


DEFAULT_BACKEND = _default_backend()


def backend():
    """Return the active backend name: "cython" or "numpy"."""
    return DEFAULT_BACKEND


def available_backends():
    """Return the backends that can run here."""
    return ("numpy", "cython") if compiled is not None else ("numpy",)


def resolve_backend(requested=None):
    """Return the compiled module for "cython", or None for "numpy"."""
    name = DEFAULT_BACKEND if requested is None else requested
    check_choice("backend", name, BACKENDS)
    if name == "cython":
        if compiled is None:
            raise ImportError("backend='cython' requested but miniattn._kernels is not built")
        return compiled
    return None


def _rows_and_indices(rows, indices, rows_name):
    """Check a 2-D float array and a 1-D index array; return C-contiguous int64 indices."""
    if not isinstance(rows, np.ndarray) or rows.ndim != 2:
        raise ValueError(f"{rows_name} must be a 2-D array (rows, D), got shape {np.shape(rows)}")
    if rows.dtype not in (np.float32, np.float64):
        raise TypeError(f"{rows_name} has dtype {rows.dtype}; expected float32 or float64")
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise TypeError(
            f"indices must be a 1-D integer array, got dtype {indices.dtype} and shape {indices.shape}"
        )
    return np.ascontiguousarray(indices, dtype=np.int64)


def _check_range(indices, n_rows):
    if indices.size and (indices.min() < 0 or indices.max() >= n_rows):
        raise IndexError(
            f"indices must lie in [0, {n_rows}), got values from {indices.min()} to {indices.max()}"
        )


# --- gather_rows -----------------------------------------------------------


def gather_rows_reference(x, indices):
    """Return x[indices]: row t of the output is row indices[t] of x (M, D)."""
    return x[indices]


def gather_rows(x, indices, *, backend=None):
    """Gather rows x[indices] (K, D) from x (M, D) on the chosen backend."""
    indices = _rows_and_indices(x, indices, "x")
    _check_range(indices, x.shape[0])
    module = resolve_backend(backend)
    if module is None:
        return gather_rows_reference(x, indices)
    return module.gather_rows(np.ascontiguousarray(x), indices)


# --- scatter_add_rows --------------------------------------------------------


def scatter_add_rows_reference(rows, indices, n_rows):
    """Return out (n_rows, D) with out[indices[t]] += rows[t] for every t.

    This is the backward of gather_rows. ``np.add.at`` accumulates repeated
    indices; the shorter ``out[indices] += rows`` would keep only one of them.
    """
    out = np.zeros((n_rows, rows.shape[1]), dtype=rows.dtype)  # (n_rows, D)
    np.add.at(out, indices, rows)
    return out


def scatter_add_rows(rows, indices, n_rows, *, backend=None):
    """Scatter-add rows (K, D) into n_rows output rows on the chosen backend."""
    indices = _rows_and_indices(rows, indices, "rows")
    if indices.shape[0] != rows.shape[0]:
        raise ValueError(f"rows has {rows.shape[0]} rows but indices has {indices.shape[0]} entries")
    _check_range(indices, n_rows)
    module = resolve_backend(backend)
    if module is None:
        return scatter_add_rows_reference(rows, indices, n_rows)
    return module.scatter_add_rows(np.ascontiguousarray(rows), indices, n_rows)
