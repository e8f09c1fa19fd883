# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twins of miniattn's irregular kernels.

Every function here has a NumPy reference of the same name and signature in
``miniattn/core/kernels.py``; that reference is the readable definition and
the test oracle. Inputs are validated by the Python dispatch layer, so these
functions assume C-contiguous arrays, int64 indices and in-range values.

The kernels of each topic live in their own ``.pxi`` file, included below, so
that one extension module serves them all.
"""

import numpy as np

cimport numpy as cnp
from cython cimport floating

cnp.import_array()

include "rows.pxi"
include "sparse_attention.pxi"
include "hashing.pxi"
