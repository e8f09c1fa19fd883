"""The multiprocessing simulator of Ring Attention.

P worker processes each run the per-worker schedule of
``miniattn.ring_attention`` (the same generator code as the inline
transport). Inputs and outputs live in ``multiprocessing.shared_memory``;
key/value blocks and their gradient accumulators travel through pipes from
worker p to worker p + 1, handed to a sender thread so that each transfer
overlaps the compute of the current block. Each worker records a timeline
of compute, wait and send intervals and its peak memory.

Modules: ``launcher`` (start, watch, stop, clean up), ``worker`` (the
process body), ``transport`` (the pipe endpoint with its sender thread),
``shared`` (shared-memory arrays) and ``timeline`` (records and drawing).

Run it from the command line with ``python -m miniattn ring``, or from Python
with ``simulate(q, k, v, n_workers=4)``. Scripts that start workers must
guard their entry point with ``if __name__ == "__main__":`` because spawned
workers import the main module.
"""

from typing import NamedTuple

import numpy as np

from .launcher import START_METHODS, RingReport, RingTimeoutError, RingWorkerError, check_start_method, run_ring
from .shared import SHM_PREFIX
from .timeline import Event, draw_timeline, send_compute_overlaps
from .transport import RingFault
from .worker import BLAS_THREAD_VARIABLES, WorkerReport

__all__ = [
    "BLAS_THREAD_VARIABLES",
    "Event",
    "RingFault",
    "RingReport",
    "RingTimeoutError",
    "RingWorkerError",
    "SHM_PREFIX",
    "START_METHODS",
    "SimulationResult",
    "WorkerReport",
    "check_start_method",
    "draw_timeline",
    "run_ring",
    "run_ring_backward",
    "run_ring_forward",
    "send_compute_overlaps",
    "simulate",
]


def run_ring_forward(q, k, v, mask, out, lse, config, query_shards, key_shards, *, start_method="spawn", timeout=300.0, fault=None):
    """Run the forward on P processes, filling out and lse; return (work per worker, RingReport)."""
    from ..ring_attention import WorkCount

    report = run_ring(
        "forward",
        {"q": q, "k": k, "v": v, "mask": mask},
        {"out": out, "lse": lse},
        config, query_shards, key_shards,
        start_method=start_method, timeout=timeout, fault=fault,
    )
    work = [WorkCount(worker.blocks_computed, worker.pairs) for worker in report.workers]
    return work, report


def run_ring_backward(q, k, v, mask, out, lse, dout, dq, dk, dv, config, query_shards, key_shards, *, start_method="spawn", timeout=300.0, fault=None):
    """Run the backward on P processes, filling dq, dk and dv; return the RingReport."""
    return run_ring(
        "backward",
        {"q": q, "k": k, "v": v, "mask": mask, "out": out, "lse": lse, "dout": dout},
        {"dq": dq, "dk": dk, "dv": dv},
        config, query_shards, key_shards,
        start_method=start_method, timeout=timeout, fault=fault,
    )


class SimulationResult(NamedTuple):
    """Outputs and records of ``simulate``."""

    out: np.ndarray  # (..., N, Dv)
    lse: np.ndarray  # (..., N)
    grads: object  # (dq, dk, dv) or None
    forward: RingReport
    backward: object  # RingReport or None


def simulate(q, k, v, *, n_workers, layout="contiguous", causal=False, mask=None, block_size=256,
             dout=None, start_method="spawn", timeout=300.0, fault=None):
    """Run Ring Attention on P worker processes; with dout also run the backward.

    Returns a SimulationResult with the output, the global lse, the
    gradients (when dout is given) and the RingReport of each pass.
    """
    from ..ring_attention import ring_attention_backward, ring_attention_forward

    out, cache = ring_attention_forward(
        q, k, v, n_workers=n_workers, layout=layout, causal=causal, mask=mask, block_size=block_size,
        transport="process", start_method=start_method, timeout=timeout, fault=fault,
    )
    grads = None
    if dout is not None:
        grads = ring_attention_backward(dout, cache)
    return SimulationResult(out, cache.lse, grads, cache.reports["forward"], cache.reports["backward"])
