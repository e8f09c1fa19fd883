"""NumPy arrays in ``multiprocessing.shared_memory`` segments, named with one prefix.

The parent creates every segment, copies the inputs in and, at the end,
copies the outputs out, closes and unlinks each segment in a ``finally``
block. Workers only attach by name and close. Every name starts with
SHM_PREFIX, so a test can check /dev/shm for segments that were left behind.
"""

import secrets
import sys
from multiprocessing import shared_memory
from typing import NamedTuple

import numpy as np

SHM_PREFIX = "miniattn_ring_"


class SharedArraySpec(NamedTuple):
    """The address of one shared array: segment name, shape and dtype."""

    name: str
    shape: tuple
    dtype: str


class SharedArrays:
    """The segments one ring run owns (parent side)."""

    def __init__(self):
        self.token = secrets.token_hex(4)
        self.segments = []
        self.specs = {}

    def add(self, key, array=None, *, shape=None, dtype=None, fill=0):
        """Create a segment for key holding a copy of array (or shape/dtype filled with fill)."""
        if array is not None:
            shape, dtype = array.shape, array.dtype
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        # Names stay under 31 characters, the limit on macOS.
        name = f"{SHM_PREFIX}{self.token}_{len(self.segments)}"
        segment = shared_memory.SharedMemory(name=name, create=True, size=max(nbytes, 1))
        self.segments.append(segment)
        view = np.ndarray(shape, dtype=dtype, buffer=segment.buf)
        if array is not None:
            view[...] = array
        else:
            view.fill(fill)
        self.specs[key] = SharedArraySpec(name, tuple(shape), dtype.str)
        return view

    def view(self, key):
        """Return the parent's view of a segment; drop it before release()."""
        spec = self.specs[key]
        segment = next(segment for segment in self.segments if segment.name == spec.name)
        return np.ndarray(spec.shape, dtype=np.dtype(spec.dtype), buffer=segment.buf)

    def release(self):
        """Close and unlink every segment; safe to call more than once."""
        while self.segments:
            segment = self.segments.pop()
            try:
                segment.close()
            except BufferError:
                pass  # a view is still alive; unlink below still frees the name
            try:
                segment.unlink()
            except FileNotFoundError:
                pass


def attach(spec):
    """Attach to a shared array in a worker; returns (segment, view)."""
    if sys.version_info >= (3, 13):
        segment = shared_memory.SharedMemory(name=spec.name, track=False)
    else:
        # Before Python 3.13 attaching also registers the name with the resource
        # tracker, which workers started by spawn or forkserver share with the
        # parent; the parent's unlink unregisters it once for all.
        segment = shared_memory.SharedMemory(name=spec.name)
    view = np.ndarray(spec.shape, dtype=np.dtype(spec.dtype), buffer=segment.buf)
    return segment, view
