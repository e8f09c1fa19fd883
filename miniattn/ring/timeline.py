"""Timeline records of the ring simulator and their drawing in a terminal.

Each worker records intervals of wall-clock time (``time.time()``, which is
comparable across processes on one machine):

- compute: the main thread attends its queries to block ``source`` at ``step``
- wait: the main thread is blocked receiving a message from worker p - 1
- send: the sender thread is passing a message to worker p + 1; for a large
  block the send lasts until the neighbour has read it
"""

from typing import NamedTuple


class Event(NamedTuple):
    """One interval on a worker's timeline."""

    kind: str  # "compute", "wait" or "send"
    step: int  # the step of the schedule (-1 when not known)
    start: float  # seconds, time.time()
    end: float
    detail: str  # e.g. "block 2" or "dK,dV of block 2"


def intervals_intersect(first, second):
    """Return True when two events overlap in time (open intervals)."""
    return first.start < second.end and second.start < first.end


def send_compute_overlaps(events):
    """Return the (send, compute) pairs of one worker whose intervals intersect."""
    sends = [event for event in events if event.kind == "send"]
    computes = [event for event in events if event.kind == "compute"]
    return [(send, compute) for send in sends for compute in computes if intervals_intersect(send, compute)]


def source_symbol(source):
    """Return the one-character label of block `source` on the timeline."""
    return str(source) if source < 10 else "#"


def draw_timeline(report, width=72):
    """Return the timeline of a RingReport as text, two rows per worker.

    The main row shows the block being computed (its owner's number) and
    waits as '~'; the send row shows K,V sends as 's' and gradient
    accumulator sends as 'g'. One column is (span / width) seconds.
    """
    events = [event for worker in report.workers for event in worker.events]
    if not events:
        return "(no events recorded)"
    origin = min(event.start for event in events)
    span = max(max(event.end for event in events) - origin, 1e-9)
    column = span / width

    def paint(row, event, symbol):
        first = int((event.start - origin) / column)
        last = max(first + 1, int(round((event.end - origin) / column)))
        for index in range(max(first, 0), min(last, width)):
            row[index] = symbol

    lines = [f"timeline of the {report.phase}: {span * 1e3:.1f} ms across, one column = {column * 1e3:.2f} ms"]
    for worker in report.workers:
        main, sends = [" "] * width, [" "] * width
        for event in worker.events:
            if event.kind == "wait":
                paint(main, event, "~")
        for event in worker.events:
            if event.kind == "compute" and event.end > event.start:
                paint(main, event, source_symbol(int(event.detail.split()[-1])))
            elif event.kind == "send":
                paint(sends, event, "g" if event.detail.startswith("dK") else "s")
        lines.append(f"worker {worker.worker:<2} compute |{''.join(main)}|")
        lines.append(f"          send    |{''.join(sends)}|")
    lines.append("legend: digit = computing on that worker's key/value block, ~ = waiting to receive,")
    lines.append("        s = sending K,V to the next worker, g = sending dK,dV accumulators")
    return "\n".join(lines)
