"""Timing, peak-memory and scaling helpers shared by the benchmark suites.

Times are the minimum over repeats of time.perf_counter() differences, the
usual estimate of the undisturbed cost on a noisy machine. Peak memory is the
tracemalloc peak of the Python and NumPy allocations made during one call
(NumPy reports its array buffers to tracemalloc); BLAS work buffers are not
counted.
"""

import argparse
import json
import time
import tracemalloc

import numpy as np


def best_time(function, *, repeat=3, min_time=0.0):
    """Return the minimum wall time in seconds of function() over `repeat` calls.

    When min_time > 0, keep calling until the calls together took at least
    that long, so that very short calls are measured more than `repeat` times.
    """
    times = []
    started = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - started < min_time:
        begin = time.perf_counter()
        function()
        times.append(time.perf_counter() - begin)
    return min(times)


def peak_memory(function):
    """Return (result, peak bytes) of one call of function() under tracemalloc.

    The peak is measured from the start of the call, so memory held before
    the call (inputs, parameters) is not counted.
    """
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    baseline, _ = tracemalloc.get_traced_memory()
    try:
        result = function()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return result, peak - baseline


def fit_loglog_slope(sizes, values):
    """Return the least-squares slope of log(values) against log(sizes): the scaling exponent."""
    sizes = np.log(np.asarray(sizes, dtype=np.float64))
    values = np.log(np.asarray(values, dtype=np.float64))
    slope, _ = np.polyfit(sizes, values, 1)
    return float(slope)


def crossover(sizes, method_values, baseline_values):
    """Return the smallest size from which method_values stay below baseline_values, or None.

    sizes are increasing. A size counts only when the method is also below
    the baseline at every larger size, so an early win followed by losses is
    not a crossover.
    """
    first = None
    for size, method_value, baseline_value in zip(sizes, method_values, baseline_values):
        if method_value < baseline_value:
            first = size if first is None else first
        else:
            first = None
    return first


def positive_int(text):
    """Parse a command-line integer >= 1 (an argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid; expected a positive integer")
    return value


def positive_int_list(text):
    """Parse comma-separated integers >= 1, such as "512,1024" (an argparse type)."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty entry; expected comma-separated positive integers")
    return [positive_int(item) for item in items]


def format_bytes(count):
    """Format a byte count as KiB, MiB or GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def format_table(rows, columns):
    """Format rows (a list of dicts) as a fixed-width text table of the given columns."""
    widths = {column: max(len(column), *(len(str(row.get(column, ""))) for row in rows)) for column in columns}
    lines = ["  ".join(column.ljust(widths[column]) for column in columns)]
    lines.append("  ".join("-" * widths[column] for column in columns))
    for row in rows:
        lines.append("  ".join(str(row.get(column, "")).ljust(widths[column]) for column in columns))
    return "\n".join(lines)


def write_json(path, payload):
    """Write payload as indented JSON to path (no-op when path is None)."""
    if path is None:
        return
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, default=float)
        handle.write("\n")


def machine_description():
    """Return a one-line description of this machine for benchmark records."""
    import os
    import platform

    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"NumPy {np.__version__}"
    )
