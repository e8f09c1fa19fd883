"""The body of one ring worker process.

``run_worker`` is a top-level function so that the spawn and forkserver
start methods can pickle it by name. The worker attaches to the shared
inputs, cuts out its own shard, runs the same per-worker generator as the
inline transport (``worker_forward`` or ``worker_backward`` from
``miniattn.ring_attention``) over a ProcessEndpoint, writes its rows of the
outputs into shared memory and sends a WorkerReport (or a traceback) to the
parent.
"""

import os
import sys
import time
import traceback
import tracemalloc
from dataclasses import dataclass, field

import numpy as np

from ..core.online_softmax import mask_with_two_axes
from ..ring_attention import (
    RingShard,
    gather_rows_padded,
    scatter_add_rows_padded,
    worker_backward,
    worker_forward,
)
from .shared import attach
from .transport import READY, ProcessEndpoint

STARTUP_TIMEOUT = 120.0  # seconds a worker waits for the others to start
SWITCH_INTERVAL = 0.0005  # seconds

BLAS_THREAD_VARIABLES = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


@dataclass
class WorkerTask:
    """Everything one worker needs, sent to it when the process starts."""

    phase: str  # "forward" or "backward"
    worker: int
    config: object  # RingConfig
    query_index: np.ndarray  # (c_q,)
    key_index: np.ndarray  # (c_k,)
    specs: dict  # array name -> SharedArraySpec
    fault: object = None  # RingFault or None


@dataclass
class WorkerReport:
    """A worker's report to the parent: its work, its timeline and its peak memory."""

    worker: int
    pid: int
    blocks_computed: int
    pairs: int  # allowed (query, key) pairs over the blocks it computed (forward only)
    events: list = field(default_factory=list)
    peak_bytes: int = 0  # tracemalloc peak of the worker's NumPy and Python allocations
    max_rss_bytes: int = 0  # resident set size high-water mark of the whole process
    blas_threads: str = ""  # OPENBLAS_NUM_THREADS as the worker saw it


def run_to_end(generator):
    """Run a worker generator to its end; return (its return value, blocks it computed).

    Only the computed flag of each RingStep is kept: a record also refers to
    that step's running output, and keeping P of them would cost O(N) memory.
    """
    blocks_computed = 0
    while True:
        try:
            blocks_computed += next(generator).computed
        except StopIteration as finished:
            return finished.value, blocks_computed


def max_rss_bytes():
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def wait_until_all_ready(status, worker, timeout=STARTUP_TIMEOUT):
    """Publish READY, then wait until every worker has, so that all start step 0 together.

    Workers start one after another (each imports NumPy); without this start
    line the timeline would mostly show start-up skew.
    """
    status[worker, 1] = READY
    deadline = time.time() + timeout
    while np.any(status[:, 1] < READY):
        if time.time() > deadline:
            raise RuntimeError(f"worker {worker} waited {timeout:.0f} s for the other workers to start")
        time.sleep(0.001)


def run_worker(task, send_conn, receive_conn, result_conn):
    """Entry point of worker process task.worker (see the module docstring)."""
    segments, arrays = [], {}
    # The sender thread needs the GIL to start a transfer; a switch interval
    # shorter than the default 5 ms lets it start while the main thread computes.
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        tracemalloc.start()
        for key, spec in task.specs.items():
            segment, view = attach(spec)
            segments.append(segment)
            arrays[key] = view
        status = arrays["status"]  # (P, 2)
        endpoint = ProcessEndpoint(task.worker, task.config.n_workers, send_conn, receive_conn, status, task.fault)

        # 1. Cut this worker's shard out of the shared inputs.
        shard = RingShard(
            task.worker,
            task.query_index,
            task.key_index,
            gather_rows_padded(arrays["q"], task.query_index),  # (..., c_q, D)
            gather_rows_padded(arrays["k"], task.key_index),  # (..., c_k, D)
            gather_rows_padded(arrays["v"], task.key_index),  # (..., c_k, Dv)
        )
        mask = mask_with_two_axes(arrays.get("mask"))  # (..., N or 1, M or 1)
        valid = task.query_index >= 0
        wait_until_all_ready(status, task.worker)

        # 2. Run the schedule and write this worker's rows of the outputs.
        if task.phase == "forward":
            (out, lse, work), blocks_computed = run_to_end(worker_forward(shard, task.config, endpoint, mask))
            arrays["out"][..., task.query_index[valid], :] = out[..., valid, :]
            arrays["lse"][..., task.query_index[valid]] = lse[..., valid]
            pairs = work.pairs
        else:
            out = gather_rows_padded(arrays["out"], task.query_index)  # (..., c_q, Dv)
            dout = gather_rows_padded(arrays["dout"], task.query_index)  # (..., c_q, Dv)
            lse = np.take(arrays["lse"], np.maximum(task.query_index, 0), axis=-1)  # (..., c_q)
            (dq, dk, dv), blocks_computed = run_to_end(
                worker_backward(shard, out, lse, dout, task.config, endpoint, mask)
            )
            scatter_add_rows_padded(arrays["dq"], task.query_index, dq)
            scatter_add_rows_padded(arrays["dk"], task.key_index, dk)
            scatter_add_rows_padded(arrays["dv"], task.key_index, dv)
            pairs = 0

        # 3. Flush the last sends, then report.
        endpoint.close()
        _, peak = tracemalloc.get_traced_memory()
        report = WorkerReport(
            task.worker,
            os.getpid(),
            blocks_computed,
            pairs,
            list(endpoint.events),
            peak,
            max_rss_bytes(),
            os.environ.get("OPENBLAS_NUM_THREADS", ""),
        )
        result_conn.send(("ok", report))
    except BaseException:  # report every failure to the parent, which stops the ring
        try:
            result_conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(1)  # already reported: exit without printing the traceback twice
    finally:
        arrays.clear()
        for segment in segments:
            try:
                segment.close()
            except BufferError:
                pass  # a view survives in a traceback; the process exit releases it
