"""The process transport: worker p's endpoint of the ring of pipes.

``send`` hands a message to a sender thread and returns at once, so the main
thread can compute while the block is being transferred. This also rules out
the classic ring deadlock. If every worker made a blocking send of a block
larger than the pipe buffer (64 KiB on Linux) before receiving, every worker
would wait for its neighbour to read and none would. Here only the sender
thread blocks, and the main thread goes on to receive.

At most MAX_IN_FLIGHT messages may be queued or in transfer; a further send
waits until the oldest has been read. Without this bound a worker that runs
ahead of its slower neighbour would keep up to P - 1 blocks alive, O(N)
memory instead of O(N / P). The bound is two because the backward sends two
messages per step (K,V and then dK,dV). Worker p + 1 reads both of them at
the start of its next step without waiting for anything else from worker p,
so a worker waiting here never waits on itself in a cycle.

The endpoint also records the timeline (compute, wait, send), publishes the
worker's progress in the shared status array that the parent watches for a
stalled ring, and carries the fault hook that tests use to make a worker
fail or hang.
"""

import os
import queue
import threading
import time
from contextlib import contextmanager
from typing import NamedTuple

from .timeline import Event

# Worker states published in the status array, column 1 (column 0 is the step).
STARTING, READY, COMPUTING, WAITING, DONE = 0, 1, 2, 3, 4
STATE_NAMES = {STARTING: "starting", READY: "ready", COMPUTING: "computing", WAITING: "waiting", DONE: "done"}
FAULT_KINDS = ("raise", "hang", "exit")
MAX_IN_FLIGHT = 2


class RingFault(NamedTuple):
    """Testing hook: make `worker` fail at the start of its compute at `step` of `phase`.

    kind "raise" raises RuntimeError, "hang" sleeps until the process is
    terminated, "exit" ends the process at once with exit code 3.
    """

    worker: int
    step: int
    kind: str = "raise"
    phase: str = "forward"


class ProcessEndpoint:
    """Worker p's transport in the process ring: send to p + 1, receive from p - 1."""

    def __init__(self, worker, n_workers, send_conn, receive_conn, status, fault=None):
        self.worker = worker
        self.n_workers = n_workers
        self.send_conn = send_conn
        self.receive_conn = receive_conn
        self.status = status  # (P, 2) int64 shared array: step, state
        self.fault = fault if fault is not None and fault.worker == worker else None
        self.events = []  # list.append is atomic, so both threads may record
        self.step = -1  # the step of the latest compute; -1 before the first
        self.outbox = queue.Queue()
        self.send_slots = threading.Semaphore(MAX_IN_FLIGHT)
        self.send_error = None
        self.sender = threading.Thread(target=self._send_loop, name=f"ring-sender-{worker}", daemon=True)
        self.sender.start()

    def publish(self, state):
        self.status[self.worker, 0] = self.step
        self.status[self.worker, 1] = state

    def _send_loop(self):
        while True:
            item = self.outbox.get()
            if item is None:
                return
            step, message = item
            start = time.time()
            try:
                self.send_conn.send(message)
            except (OSError, ValueError) as error:  # the neighbour has gone
                self.send_error = error
                return
            finally:
                self.send_slots.release()
            self.events.append(Event("send", step, start, time.time(), describe(message)))

    def send(self, message):
        """Queue a message for worker p + 1; wait only while MAX_IN_FLIGHT are still unread."""
        if self.send_error is not None:
            raise RuntimeError(f"worker {self.worker} could not send to worker "
                               f"{(self.worker + 1) % self.n_workers}: {self.send_error}")
        if not self.send_slots.acquire(blocking=False):
            self.publish(WAITING)
            start = time.time()
            self.send_slots.acquire()
            self.events.append(Event("wait", self.step, start, time.time(), "for a send slot"))
            self.publish(READY)
        self.outbox.put((self.step, message))

    def receive(self):
        """Block until the next message from worker p - 1 arrives; record the wait."""
        self.publish(WAITING)
        start = time.time()
        message = self.receive_conn.recv()
        self.events.append(Event("wait", self.step, start, time.time(), describe(message)))
        self.publish(READY)
        return message

    @contextmanager
    def compute(self, step):
        """Mark the compute of one step on the timeline (and apply the fault hook)."""
        self.step = step
        self.publish(COMPUTING)
        if self.fault is not None and self.fault.step == step:
            trigger(self.fault)
        source = (self.worker - step) % self.n_workers
        start = time.time()
        yield
        self.events.append(Event("compute", step, start, time.time(), f"block {source}"))
        self.publish(READY)

    def close(self):
        """Wait until every queued message has been handed to the pipe."""
        self.outbox.put(None)
        self.sender.join()
        if self.send_error is not None:
            raise RuntimeError(f"worker {self.worker} could not send to worker "
                               f"{(self.worker + 1) % self.n_workers}: {self.send_error}")
        self.publish(DONE)


def describe(message):
    """Return a short label of a ring message for the timeline."""
    if hasattr(message, "dk"):
        return f"dK,dV of block {message.source}"
    return f"K,V of block {message.source}"


def trigger(fault):
    """Carry out a RingFault in the current worker."""
    if fault.kind == "raise":
        raise RuntimeError(f"fault injected in worker {fault.worker} at step {fault.step}")
    if fault.kind == "hang":
        while True:
            time.sleep(0.05)
    os._exit(3)
