"""``python -m miniattn bench``: time and peak memory of attention methods against N.

Without --suite, every chosen method runs forward and forward+backward on the
same random q, k, v (1, H, N, D) for each N, and the table reports times,
tracemalloc peak memory, the ratio to dense attention measured in the same
run, and each method's fitted scaling exponent.

With --suite NAME, the command runs ``miniattn.benchmarks.NAME`` (for example
``dense``, the dense-attention record with matmul throughput and PyTorch
comparison) and passes it the remaining options.
"""

import argparse
import importlib
import pkgutil
import sys

import numpy as np

from .. import benchmarks, plots
from ..benchmarks.harness import (
    positive_int,
    positive_int_list,
    best_time,
    crossover,
    fit_loglog_slope,
    format_bytes,
    format_table,
    machine_description,
    peak_memory,
    write_json,
)
from ..core.kernels import backend
from ..methods import METHODS, info, is_implemented, make_method
from . import help_description


def suite_names():
    """Return the benchmark suites in miniattn/benchmarks (every module except the harness)."""
    return sorted(
        module.name for module in pkgutil.iter_modules(benchmarks.__path__) if module.name != "harness"
    )


def parse_list(text, convert=str):
    return [convert(item) for item in text.split(",") if item.strip()]


def measure_method(method, q, k, v, causal, repeat):
    """Return forward time, forward+backward time and the peak memory of forward+backward."""
    dout = np.ones(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)

    def forward():
        return method.forward(q, k, v, causal=causal)

    def forward_backward():
        out, cache = method.forward(q, k, v, causal=causal)
        return method.backward(dout, cache)

    forward_time = best_time(forward, repeat=repeat)
    total_time = best_time(forward_backward, repeat=repeat)
    _, peak = peak_memory(forward_backward)
    return forward_time, total_time, peak


def run_sweep(names, sizes, width, heads, dtype, causal, repeat, seed):
    """Measure every method at every N; return the list of result rows."""
    rows = []
    rng = np.random.default_rng(seed)
    for n in sizes:
        shape = (1, heads, n, width)
        q, k, v = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
        baseline = None
        for name in names:
            method = make_method(name, rng=np.random.default_rng(seed))
            try:
                forward_time, total_time, peak = measure_method(method, q, k, v, causal, repeat)
            except (ValueError, MemoryError) as error:
                rows.append({"method": name, "N": n, "error": str(error)})
                print(f"  {name:<20} N={n:<7} skipped: {error}", file=sys.stderr)
                continue
            row = {"method": name, "N": n, "forward_s": forward_time, "forward_backward_s": total_time, "peak_bytes": peak}
            if name == "transformer":
                baseline = row
            if baseline is not None:
                row["time_vs_dense"] = total_time / baseline["forward_backward_s"]
                row["memory_vs_dense"] = peak / max(baseline["peak_bytes"], 1)
            rows.append(row)
            print(f"  {name:<20} N={n:<7} forward+backward {total_time * 1e3:9.1f} ms  peak {format_bytes(peak)}", file=sys.stderr)
    return rows


def summarize(rows, names, sizes):
    """Return per-method fitted exponents and the N at which each overtakes dense."""
    summary = {}
    dense = {row["N"]: row for row in rows if row["method"] == "transformer" and "error" not in row}
    for name in names:
        measured = [row for row in rows if row["method"] == name and "error" not in row]
        if len(measured) < 2:
            continue
        entry = {
            "time_exponent": fit_loglog_slope([r["N"] for r in measured], [r["forward_backward_s"] for r in measured]),
            "memory_exponent": fit_loglog_slope([r["N"] for r in measured], [max(r["peak_bytes"], 1) for r in measured]),
        }
        common = [r for r in measured if r["N"] in dense]
        if name != "transformer" and common:
            entry["overtakes_dense_at_N"] = crossover(
                [r["N"] for r in common],
                [r["forward_backward_s"] for r in common],
                [dense[r["N"]]["forward_backward_s"] for r in common],
            )
        summary[name] = entry
    return summary


def split_suite(argv):
    """Return (suite name or None, the arguments left for the suite or the sweep)."""
    argv = list(argv)
    for position, argument in enumerate(argv):
        if argument == "--suite" and position + 1 < len(argv):
            return argv[position + 1], argv[:position] + argv[position + 2 :]
        if argument.startswith("--suite="):
            return argument.split("=", 1)[1], argv[:position] + argv[position + 1 :]
    return None, argv


def main(argv):
    suite, argv = split_suite(argv)
    if suite is not None:
        if suite not in suite_names():
            print(f"error: unknown suite {suite!r}; expected one of {', '.join(suite_names())}", file=sys.stderr)
            return 2
        return importlib.import_module(f"miniattn.benchmarks.{suite}").main(argv)

    parser = argparse.ArgumentParser(prog="python -m miniattn bench", description=help_description(__doc__))
    parser.add_argument(
        "--suite",
        help=f"run a benchmark suite instead of the sweep; one of: {', '.join(suite_names())}. The suite has "
        f"options of its own (see bench --suite NAME --help), and the sweep's options do not apply to it",
    )
    parser.add_argument("--methods", default="", help="comma-separated method names (default: every implemented method)")
    parser.add_argument("--n", type=positive_int_list, default=[512, 1024, 2048],
                        help="comma-separated sequence lengths N (default 512,1024,2048)")
    parser.add_argument("--d", type=positive_int, default=64, help="head width D (default 64)")
    parser.add_argument("--heads", type=positive_int, default=1, help="number of heads H (default 1)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="input dtype (default float32)")
    parser.add_argument("--causal", action="store_true", help="causal attention (default bidirectional)")
    parser.add_argument("--repeat", type=positive_int, default=3, help="timing repeats; the minimum is reported (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs and of the methods' random state")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--plot", metavar="DIR", help="write time and memory against N (log-log) as PNG files to DIR")
    args = parser.parse_args(argv)

    names = parse_list(args.methods) or [method.name for method in METHODS if is_implemented(method.name)]
    for name in names:
        try:
            info(name)
        except ValueError as error:
            parser.error(str(error))
        if not is_implemented(name):
            parser.error(f"method {name!r} is registered but not implemented yet")
    if "transformer" not in names:
        names = ["transformer"] + names  # the baseline of every ratio
    sizes = args.n

    print(f"machine: {machine_description()}, kernels: {backend()}")
    print(f"inputs: (1, {args.heads}, N, {args.d}) {args.dtype}, {'causal' if args.causal else 'bidirectional'}, best of {args.repeat}")
    rows = run_sweep(names, sizes, args.d, args.heads, np.dtype(args.dtype), args.causal, args.repeat, args.seed)

    table_rows = []
    for row in rows:
        if "error" in row:
            table_rows.append({"method": row["method"], "N": row["N"], "forward": "skipped"})
            continue
        table_rows.append({
            "method": row["method"],
            "N": row["N"],
            "forward": f"{row['forward_s'] * 1e3:.1f} ms",
            "forward+backward": f"{row['forward_backward_s'] * 1e3:.1f} ms",
            "peak memory": format_bytes(row["peak_bytes"]),
            "time / dense": f"{row.get('time_vs_dense', float('nan')):.2f}",
            "memory / dense": f"{row.get('memory_vs_dense', float('nan')):.2f}",
        })
    print(format_table(table_rows, ["method", "N", "forward", "forward+backward", "peak memory", "time / dense", "memory / dense"]))
    print("time / dense and memory / dense: forward+backward time and its peak memory, divided by dense "
          "attention's at the same N")

    summary = summarize(rows, names, sizes)
    if summary:
        print()
        print(format_table(
            [{"method": name, "time exponent": f"{entry['time_exponent']:.2f}",
              "memory exponent": f"{entry['memory_exponent']:.2f}",
              "overtakes dense at N": entry.get("overtakes_dense_at_N", "-") or "not in range"}
             for name, entry in summary.items()],
            ["method", "time exponent", "memory exponent", "overtakes dense at N"],
        ))
    write_json(args.json, {"machine": machine_description(), "backend": backend(), "rows": rows, "summary": summary})
    if args.plot:
        paths = plots.scaling(rows, args.plot)
        if paths is None:
            print(plots.MISSING_MESSAGE)
        for path in paths or []:
            print(f"figure written to {path}")
    return 0
