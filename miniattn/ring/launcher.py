"""Start the P worker processes of one ring run, watch them, and clean up.

Start methods. Workers are started with "spawn" (the default) or
"forkserver", never "fork": a forked child inherits the parent's BLAS thread
pool, which cannot be resized afterwards, and forking a process that runs
threads can deadlock. Both allowed methods need top-level picklable targets,
which ``run_worker`` is.

One BLAS thread per worker. NumPy's BLAS reads OPENBLAS_NUM_THREADS,
OMP_NUM_THREADS and MKL_NUM_THREADS once, when NumPy is first imported.
The parent sets them to 1 in its own environment only while it starts the
workers, so that a spawned worker (a fresh interpreter that imports NumPy
again) starts with one BLAS thread. A forkserver started inside that window
passes the setting on to every later worker; one started earlier keeps its
own environment. Each WorkerReport records the value the worker saw.

Failure handling. A worker that raises sends its traceback; the parent
then terminates the whole ring and raises RingWorkerError naming the
worker. A worker that dies without a report (a crash, os._exit) is detected
by its process sentinel. If no worker changes its published (step, state)
for ``timeout`` seconds, the parent raises RingTimeoutError naming the
workers that were not waiting for a message, which are the ones stuck. In
every case the ``finally`` block terminates and joins every worker it
started and unlinks every shared-memory segment.
"""

import multiprocessing
import os
import time
from contextlib import contextmanager
from multiprocessing.connection import wait
from typing import NamedTuple

import numpy as np

from .shared import SharedArrays
from .transport import DONE, FAULT_KINDS, STATE_NAMES, WAITING, RingFault
from .worker import BLAS_THREAD_VARIABLES, STARTUP_TIMEOUT, WorkerTask, run_worker

START_METHODS = ("spawn", "forkserver")
JOIN_TIMEOUT = 5.0
FAILURE_GRACE = 1.0  # seconds to wait for the root cause after a follow-on failure


class RingWorkerError(RuntimeError):
    """A ring worker failed; ``worker`` is its number and ``phase`` the pass it was in."""

    def __init__(self, message, worker, phase):
        super().__init__(message)
        self.worker = worker
        self.phase = phase


class RingTimeoutError(TimeoutError):
    """The ring made no progress within the timeout; ``workers`` are the stuck ones."""

    def __init__(self, message, workers, phase):
        super().__init__(message)
        self.workers = workers
        self.phase = phase


class RingReport(NamedTuple):
    """The record of one process ring run."""

    phase: str
    start_method: str
    wall_seconds: float  # from starting the first process to the last report
    workers: list  # WorkerReport per worker

    def compute_span(self):
        """Return the seconds from the first compute start to the last compute end."""
        computes = [event for worker in self.workers for event in worker.events if event.kind == "compute"]
        return max(event.end for event in computes) - min(event.start for event in computes)


def check_start_method(start_method):
    """Check that start_method can run ring workers on this platform."""
    if start_method == "fork":
        raise ValueError(
            "start_method='fork' is invalid for ring workers: a forked worker inherits the "
            "parent's BLAS thread pool, which cannot be limited to one thread, and forking a "
            "process that runs threads can deadlock; expected 'spawn' or 'forkserver'"
        )
    if start_method not in START_METHODS:
        raise ValueError(f"start_method={start_method!r} is invalid; expected 'spawn' or 'forkserver'")
    if start_method not in multiprocessing.get_all_start_methods():
        raise ValueError(
            f"start_method={start_method!r} is not available on this platform "
            f"(available: {', '.join(multiprocessing.get_all_start_methods())}); use 'spawn'"
        )


def check_fault(fault, n_workers):
    if fault is None:
        return
    if not isinstance(fault, RingFault):
        raise TypeError(f"fault must be a RingFault or None, got {type(fault).__name__}")
    if not 0 <= fault.worker < n_workers or fault.kind not in FAULT_KINDS:
        raise ValueError(f"fault={fault!r} is invalid; expected a worker in [0, {n_workers}) and a kind in {FAULT_KINDS}")


@contextmanager
def one_blas_thread_for_children():
    """Set the BLAS thread variables to 1 while children start; restore them after."""
    saved = {name: os.environ.get(name) for name in BLAS_THREAD_VARIABLES}
    os.environ.update({name: "1" for name in BLAS_THREAD_VARIABLES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_ring(phase, inputs, outputs, config, query_shards, key_shards, *, start_method="spawn", timeout=300.0, fault=None):
    """Run one pass of the ring on P worker processes.

    Inputs:
    - phase: "forward" or "backward"
    - inputs: dict of arrays the workers read (q, k, v, optional mask; out,
      lse, dout for the backward); None values are left out
    - outputs: dict of arrays the workers fill (out, lse; or dq, dk, dv),
      written in place when every worker has finished
    - config: the RingConfig; query_shards (P, c_q), key_shards (P, c_k)
    - start_method: "spawn" or "forkserver"
    - timeout: seconds without any worker progress before the ring is stopped
    - fault: a RingFault testing hook, or None

    Returns a RingReport. Raises RingWorkerError or RingTimeoutError.
    """
    check_start_method(start_method)
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout={timeout!r} is invalid; expected a number of seconds > 0")
    n_workers = config.n_workers
    check_fault(fault, n_workers)
    context = multiprocessing.get_context(start_method)
    shared = SharedArrays()
    processes, parent_conns, child_conns = [], [], []
    status = None
    finished = False
    try:
        # 1. Shared memory: inputs copied in, outputs zeroed, one status row per worker.
        for key, array in inputs.items():
            if array is not None:
                shared.add(key, np.ascontiguousarray(array))
        for key, array in outputs.items():
            shared.add(key, shape=array.shape, dtype=array.dtype, fill=-np.inf if key == "lse" else 0)
        status = shared.add("status", shape=(n_workers, 2), dtype=np.int64)

        # 2. The ring of pipes: worker p sends on pipe p, worker p + 1 reads it.
        ring = [context.Pipe(duplex=False) for _ in range(n_workers)]  # (reader, writer)
        results = [context.Pipe(duplex=False) for _ in range(n_workers)]
        parent_conns = [reader for reader, _ in results]
        child_conns = [end for pair in ring for end in pair] + [writer for _, writer in results]

        # 3. Start the workers with one BLAS thread each.
        started = time.time()
        with one_blas_thread_for_children():
            for worker in range(n_workers):
                task = WorkerTask(
                    phase, worker, config, query_shards[worker], key_shards[worker], dict(shared.specs),
                    fault if fault is not None and fault.phase == phase else None,
                )
                process = context.Process(
                    target=run_worker,
                    args=(task, ring[worker][1], ring[(worker - 1) % n_workers][0], results[worker][1]),
                    name=f"ring-worker-{worker}",
                    daemon=True,
                )
                process.start()
                processes.append(process)
        for conn in child_conns:  # the workers hold their own copies; EOF now reaches a reader
            conn.close()

        # 4. Wait for every report, stopping the ring on the first failure or stall.
        reports = wait_for_workers(phase, processes, parent_conns, status, timeout)
        wall = time.time() - started

        # 5. Copy the outputs out of shared memory.
        for key, array in outputs.items():
            array[...] = shared.view(key)
        finished = True
        return RingReport(phase, start_method, wall, reports)
    finally:
        status = None
        stop_processes(processes, graceful=finished)
        for conn in parent_conns + child_conns:
            conn.close()
        shared.release()


def wait_for_workers(phase, processes, conns, status, timeout):
    """Collect one report per worker; raise on an error, a silent exit or a stall.

    When one worker fails, its neighbours soon fail too, because their pipe to
    it breaks. Those are follow-on failures, so after the first failure the
    parent keeps collecting for up to FAILURE_GRACE seconds and names the
    worker whose failure was not caused by a vanished neighbour.
    """
    n_workers = len(processes)
    reports = [None] * n_workers
    failures = {}  # worker -> (RingWorkerError, caused by a vanished neighbour)
    pending = set(range(n_workers))
    last_status = status.copy()
    last_change = time.time()
    first_failure = None
    while pending:
        waitables = {conns[worker]: worker for worker in pending}
        waitables.update({processes[worker].sentinel: worker for worker in pending})
        for ready in wait(list(waitables), timeout=0.05):
            worker = waitables[ready]
            if worker not in pending:
                continue
            pending.discard(worker)
            message = receive_report(conns[worker], ready)
            if message is None:
                processes[worker].join(JOIN_TIMEOUT)  # the sentinel fires before exitcode is set
                code = processes[worker].exitcode
                error = RingWorkerError(
                    f"ring worker {worker} exited with code {code} during the {phase} without a report", worker, phase
                )
                failures[worker] = (error, False)
            elif message[0] == "error":
                error = RingWorkerError(f"ring worker {worker} failed during the {phase}:\n{message[1]}", worker, phase)
                failures[worker] = (error, lost_neighbour(message[1]))
            else:
                reports[worker] = message[1]

        now = time.time()
        if failures:
            first_failure = first_failure or now
            root_causes = [error for error, follow_on in failures.values() if not follow_on]
            if root_causes:
                raise root_causes[0]
            if not pending or now - first_failure > FAILURE_GRACE:
                raise next(iter(failures.values()))[0]
            continue
        if not np.array_equal(status, last_status):
            last_status, last_change = status.copy(), now
        all_started = bool(np.all(last_status[:, 1] > 0))
        limit = timeout if all_started else max(timeout, STARTUP_TIMEOUT)
        if pending and now - last_change > limit:
            raise stall_error(phase, last_status, pending, now - last_change)
    return reports


def receive_report(conn, ready):
    """Return a worker's ("ok" | "error", payload) message, or None if it exited without one."""
    if ready is not conn and not conn.poll():
        return None
    try:
        return conn.recv()
    except EOFError:  # the worker closed its end by exiting, without a report
        return None


def lost_neighbour(traceback_text):
    """Return True when a worker's traceback shows that a neighbour went away first."""
    last_line = traceback_text.strip().splitlines()[-1]
    return last_line.startswith(("EOFError", "BrokenPipeError", "ConnectionResetError")) or "could not send" in last_line


def stall_error(phase, status, pending, idle):
    """Build the RingTimeoutError that names the workers stuck outside a receive."""
    stuck = [worker for worker in sorted(pending) if status[worker, 1] not in (WAITING, DONE)]
    stuck = stuck or sorted(pending)  # everyone waiting: a schedule deadlock
    described = "; ".join(
        f"worker {worker} {STATE_NAMES[int(status[worker, 1])]} at step {int(status[worker, 0])}" for worker in stuck
    )
    waiting = [worker for worker in sorted(pending) if worker not in stuck]
    message = f"the ring made no progress for {idle:.1f} s during the {phase} and was stopped: {described}"
    if waiting:
        message += f"; workers {', '.join(map(str, waiting))} were waiting for a block"
    return RingTimeoutError(message, stuck, phase)


def stop_processes(processes, graceful=False):
    """Terminate (then kill) every started worker that is still alive, and join all.

    graceful: first give workers that have reported JOIN_TIMEOUT seconds to exit.
    """
    if graceful:
        for process in processes:
            process.join(JOIN_TIMEOUT)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(JOIN_TIMEOUT)
        if process.is_alive():
            process.kill()
            process.join()
