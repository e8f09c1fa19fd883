"""Benchmark BigBird block-sparse attention against dense attention as N grows.

For each sequence length N, at a fixed block size b and R random blocks,
this measures the forward and backward time of one head (B = H = 1) and the
tracemalloc peak of one forward plus backward, for BigBird and for dense
attention (dense only up to --dense-max, because its (N, N) arrays grow
quadratically). It reports the fitted scaling exponent of BigBird's time and
memory over 4,096 <= N <= 65,536 and the first N at which BigBird's
forward + backward is faster than dense.

The CSR patterns are fixed per layer, so they are built once per N and
timed separately. Their own memory is reported as "pattern" and is not
counted in the peak.

    python -m miniattn.benchmarks.bigbird              # N = 512 .. 65,536
    python -m miniattn.benchmarks.bigbird --quick      # N = 512 .. 8,192, one repeat
"""

import argparse
import sys
import time

import numpy as np

from ..bigbird import make_method as make_bigbird
from ..core.kernels import available_backends, backend as default_backend
from ..transformer import DenseAttention
from .harness import (
    positive_int,
    best_time,
    crossover,
    fit_loglog_slope,
    format_bytes,
    format_table,
    machine_description,
    peak_memory,
    write_json,
)

DEFAULT_SIZES = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
QUICK_SIZES = (512, 1024, 2048, 4096, 8192)
FIT_RANGE = (4096, 65536)  # the exponent is fitted over these lengths


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m miniattn bench --suite bigbird",
        description="Time and peak memory of BigBird block-sparse attention against dense attention.",
    )
    parser.add_argument("--sizes", type=positive_int, nargs="+", help="sequence lengths N (default 512 .. 65536)")
    parser.add_argument("--block-size", type=positive_int, default=32, help="block size b in tokens (default 32)")
    parser.add_argument("--random-blocks", type=positive_int, default=3, help="random blocks R per query block (default 3)")
    parser.add_argument("--width", type=positive_int, default=64, help="head width D (default 64)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="input dtype")
    parser.add_argument("--dense-max", type=positive_int, default=8192, help="largest N run with dense attention (default 8192)")
    parser.add_argument("--repeat", type=positive_int, default=3, help="timed calls per measurement; the minimum is kept")
    parser.add_argument("--backend", choices=("numpy", "cython"), help="sparse kernel backend (default: the active one)")
    parser.add_argument("--quick", action="store_true", help="N = 512 .. 8192 and one repeat")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return parser.parse_args(argv)


def measure(method, q, k, v, repeat):
    """Return forward time, backward time and the peak bytes of forward + backward."""
    out, cache = method.forward(q, k, v)
    dout = np.ones_like(out)
    forward_time = best_time(lambda: method.forward(q, k, v), repeat=repeat)
    backward_time = best_time(lambda: method.backward(dout, cache), repeat=repeat)
    del out, cache
    _, peak = peak_memory(lambda: method.backward(dout, method.forward(q, k, v)[1]))
    return forward_time, backward_time, peak


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    repeat = 1 if args.quick else args.repeat
    backend = args.backend or default_backend()
    if backend not in available_backends():
        print(
            f"error: backend {backend!r} is not available because the extension miniattn._kernels "
            f"is not built; build it with python setup.py build_ext --inplace or pass --backend numpy",
            file=sys.stderr,
        )
        return 2
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    print(f"BigBird vs dense: b={args.block_size}, R={args.random_blocks}, D={args.width}, {dtype}, "
          f"B=H=1, backend={backend}, best of {repeat}")
    print(f"machine: {machine_description()}")

    rows = []
    for n in sizes:
        q, k, v = (rng.standard_normal((1, 1, n, args.width)).astype(dtype) for _ in range(3))  # (B, H, N, D)
        method = make_bigbird(
            np.random.default_rng(1), block_size=args.block_size, num_random_blocks=args.random_blocks,
            backend=backend,
        )
        started = time.perf_counter()
        patterns = method.patterns_for(1, n)
        build_time = time.perf_counter() - started
        pattern_bytes = sum(indptr.nbytes + indices.nbytes for indptr, indices in patterns)
        keys_per_query = patterns[0][1].size / n

        forward_time, backward_time, peak = measure(method, q, k, v, repeat)
        row = {
            "N": n,
            "keys/query": f"{keys_per_query:.0f}",
            "build s": f"{build_time:.3f}",
            "fwd s": f"{forward_time:.4f}",
            "bwd s": f"{backward_time:.4f}",
            "peak": format_bytes(peak),
            "pattern": format_bytes(pattern_bytes),
            "total_s": forward_time + backward_time,
            "peak_bytes": peak,
        }
        if n <= args.dense_max:
            dense_forward, dense_backward, dense_peak = measure(DenseAttention(), q, k, v, repeat)
            row.update({
                "dense fwd s": f"{dense_forward:.4f}",
                "dense bwd s": f"{dense_backward:.4f}",
                "dense peak": format_bytes(dense_peak),
                "dense_total_s": dense_forward + dense_backward,
                "dense_peak_bytes": dense_peak,
            })
        rows.append(row)
        print(f"N={n}: bigbird fwd+bwd {row['total_s']:.4f} s, peak {row['peak']}"
              + (f"; dense {row['dense_total_s']:.4f} s, peak {row['dense peak']}" if "dense_total_s" in row else ""))

    columns = ["N", "keys/query", "build s", "fwd s", "bwd s", "peak", "pattern", "dense fwd s", "dense bwd s", "dense peak"]
    print()
    print(format_table(rows, columns))

    fitted = [row for row in rows if FIT_RANGE[0] <= row["N"] <= FIT_RANGE[1]]
    summary = {}
    if len(fitted) >= 2:
        fitted_sizes = [row["N"] for row in fitted]
        summary["time_exponent"] = fit_loglog_slope(fitted_sizes, [row["total_s"] for row in fitted])
        summary["memory_exponent"] = fit_loglog_slope(fitted_sizes, [row["peak_bytes"] for row in fitted])
        print(f"\nfitted exponent over N = {fitted_sizes[0]} .. {fitted_sizes[-1]}: "
              f"time {summary['time_exponent']:.3f}, peak memory {summary['memory_exponent']:.3f}")
    compared = [row for row in rows if "dense_total_s" in row]
    summary["time_crossover_N"] = crossover(
        [row["N"] for row in compared], [row["total_s"] for row in compared], [row["dense_total_s"] for row in compared]
    )
    summary["memory_crossover_N"] = crossover(
        [row["N"] for row in compared], [row["peak_bytes"] for row in compared],
        [row["dense_peak_bytes"] for row in compared],
    )

    def first_size(size):
        return f"N = {size}" if size is not None else f"no N up to {args.dense_max}"

    print(f"BigBird faster than dense (fwd + bwd) from {first_size(summary['time_crossover_N'])}, "
          f"smaller peak memory from {first_size(summary['memory_crossover_N'])}")

    write_json(args.json, {
        "suite": "bigbird",
        "machine": machine_description(),
        "options": {
            "block_size": args.block_size, "random_blocks": args.random_blocks, "width": args.width,
            "dtype": args.dtype, "backend": backend, "repeat": repeat, "dense_max": args.dense_max,
        },
        "rows": rows,
        "summary": summary,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
