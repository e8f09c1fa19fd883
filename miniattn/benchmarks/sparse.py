"""Benchmark the fixed-pattern methods (Longformer, Sparse Transformer) against dense attention.

Part 1, scaling. For each sequence length N this measures the forward plus
backward time of one head (B = H = 1) and the tracemalloc peak of one
forward plus backward, for

- longformer: a bidirectional window of w keys on each side (2w + 1 slots)
  and one global token at position 0;
- sparse_transformer local: the causal local factor A1 at a fixed stride l
  (l keys per query), as used by the even layers of the alternating
  combination;
- sparse_transformer merged: the causal strided A1 u A2 with l = ceil(sqrt(N)),
  the setting of Child et al. (2019); it lists about 2 sqrt(N) keys per query, so its
  exponent is expected near 1.5, not 1;
- dense attention, only up to --dense-max because its (N, N) arrays grow
  quadratically.

It reports the fitted scaling exponent of time and memory over
4,096 <= N <= 65,536 and the first N at which each method's forward +
backward is faster than dense. The CSR patterns are built once per N (the
method objects keep them) and that build is timed separately.

Part 2, kernels. The fused compiled kernel against its NumPy twin on the
same CSR band of W keys per query (N = 16,384, W = 256, D = 64, float32 by
default), forward and backward separately.

    python -m miniattn.benchmarks.sparse              # N = 2,048 .. 65,536
    python -m miniattn.benchmarks.sparse --quick      # N = 2,048 .. 8,192, one repeat
"""

import argparse
import sys
import time

import numpy as np

from ..core.kernels import available_backends, backend as default_backend
from ..core.sparse import sparse_attention_backward, sparse_attention_forward
from ..longformer import make_method as make_longformer
from ..sparse_transformer import default_stride
from ..sparse_transformer import make_method as make_sparse_transformer
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

DEFAULT_SIZES = (2048, 4096, 8192, 16384, 32768, 65536)
QUICK_SIZES = (2048, 4096, 8192)
FIT_RANGE = (4096, 65536)  # the exponent is fitted over these lengths


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m miniattn bench --suite sparse",
        description="Time and peak memory of Longformer and Sparse Transformer attention against dense "
        "attention, and the compiled sparse kernel against its NumPy twin.",
    )
    parser.add_argument("--sizes", type=positive_int, nargs="+", help="sequence lengths N (default 2048 .. 65536)")
    parser.add_argument("--window", type=positive_int, default=128, help="Longformer one-sided window w (default 128)")
    parser.add_argument("--stride", type=positive_int, default=256, help="Sparse Transformer local stride l (default 256)")
    parser.add_argument("--width", type=positive_int, default=64, help="head width D (default 64)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="input dtype")
    parser.add_argument("--dense-max", type=positive_int, default=8192, help="largest N run with dense attention (default 8192)")
    parser.add_argument("--repeat", type=positive_int, default=3, help="timed calls per measurement; the minimum is kept")
    parser.add_argument("--backend", choices=("numpy", "cython"), help="sparse kernel backend (default: the active one)")
    parser.add_argument("--twin-size", type=positive_int, default=16384, help="N of the kernel comparison (default 16384)")
    parser.add_argument("--twin-keys", type=positive_int, default=256, help="keys per query W of the kernel comparison")
    parser.add_argument("--skip-twin", action="store_true", help="skip the compiled-versus-NumPy comparison")
    parser.add_argument("--quick", action="store_true", help="N = 2048 .. 8192, one repeat, twin at N = 4096")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return parser.parse_args(argv)


def method_factories(args):
    """Return (label, factory(N) -> method, causal) for every measured method."""
    return [
        ("longformer", lambda n: make_longformer(window=args.window, global_indices=[0], backend=args.backend), False),
        (
            "sparse_transformer local",
            lambda n: make_sparse_transformer(stride=args.stride, combine="alternating", layer=0, backend=args.backend),
            True,
        ),
        (
            "sparse_transformer merged",
            lambda n: make_sparse_transformer(stride=default_stride(n), combine="merged", backend=args.backend),
            True,
        ),
        ("dense", lambda n: DenseAttention(), False),
    ]


def measure(method, q, k, v, causal, repeat):
    """Return (pattern build seconds, forward + backward seconds, peak bytes) of one method."""
    pattern_seconds = 0.0
    if hasattr(method, "head_patterns"):  # build the pattern once, outside the timed calls
        started = time.perf_counter()
        method.head_patterns(q.shape[2], k.shape[2], q.shape[1], causal)
        pattern_seconds = time.perf_counter() - started
    dout = np.ones(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)

    def step():
        out, cache = method.forward(q, k, v, causal=causal)
        method.backward(dout, cache)

    seconds = best_time(step, repeat=repeat)
    _, peak = peak_memory(step)
    return pattern_seconds, seconds, peak


def run_scaling(args, sizes, dtype, repeat):
    rng = np.random.default_rng(0)
    results = {label: [] for label, _, _ in method_factories(args)}
    for n in sizes:
        q, k, v = (rng.standard_normal((1, 1, n, args.width)).astype(dtype) for _ in range(3))
        for label, factory, causal in method_factories(args):
            if label == "dense" and n > args.dense_max:
                continue
            build, seconds, peak = measure(factory(n), q, k, v, causal, repeat)
            results[label].append({"N": n, "seconds": seconds, "peak_bytes": peak, "pattern_seconds": build})
            print(f"N={n:>6}  {label:<26} {seconds:8.3f} s  peak {format_bytes(peak):>10}  "
                  f"(pattern {build:.3f} s)", flush=True)
    return results


def summarise(results):
    """Return per-method summary rows: exponents over FIT_RANGE and the crossover with dense."""
    dense = {row["N"]: row["seconds"] for row in results["dense"]}
    rows = []
    for label, measured in results.items():
        fitted = [row for row in measured if FIT_RANGE[0] <= row["N"] <= FIT_RANGE[1]]
        sizes = [row["N"] for row in fitted]
        summary = {"method": label, "time_exponent": None, "memory_exponent": None, "overtakes_dense_at": None}
        if len(sizes) >= 2:
            summary["time_exponent"] = fit_loglog_slope(sizes, [row["seconds"] for row in fitted])
            summary["memory_exponent"] = fit_loglog_slope(sizes, [row["peak_bytes"] for row in fitted])
        if label != "dense":
            shared = [row for row in measured if row["N"] in dense]
            summary["overtakes_dense_at"] = crossover(
                [row["N"] for row in shared], [row["seconds"] for row in shared], [dense[row["N"]] for row in shared]
            )
        rows.append(summary)
    return rows


def band_pattern(n, keys):
    """Return a CSR band listing `keys` consecutive keys per query, centred on it and kept inside [0, N)."""
    starts = np.clip(np.arange(n) - keys // 2, 0, n - keys)  # (N,)
    indices = (starts[:, None] + np.arange(keys)[None, :]).reshape(-1)  # (N W,)
    indptr = np.arange(n + 1, dtype=np.int64) * keys
    return indptr, indices.astype(np.int64)


def run_twin(args, dtype, repeat):
    """Time the compiled kernel and its NumPy twin on one CSR band; return a list of rows."""
    n, keys = args.twin_size, args.twin_keys
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, n, args.width)).astype(dtype) for _ in range(3))
    indptr, indices = band_pattern(n, keys)
    dout = rng.standard_normal((1, n, args.width)).astype(dtype)
    rows = []
    for backend in available_backends():
        calls = repeat if backend == "cython" else 1
        forward = best_time(lambda: sparse_attention_forward(q, k, v, indptr, indices, backend=backend), repeat=calls)
        _, cache = sparse_attention_forward(q, k, v, indptr, indices, backend=backend)
        backward = best_time(lambda: sparse_attention_backward(dout, cache), repeat=calls)
        rows.append({"backend": backend, "forward_s": forward, "backward_s": backward})
        print(f"kernel {backend:<6} N={n} W={keys}: forward {forward:.3f} s, backward {backward:.3f} s", flush=True)
    return rows


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.sizes:
        sizes = tuple(args.sizes)
    else:
        sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    repeat = 1 if args.quick else args.repeat
    if args.quick and args.twin_size == 16384:
        args.twin_size = 4096
    dtype = np.dtype(args.dtype)
    backend_name = args.backend or default_backend()
    print(f"machine: {machine_description()}; sparse backend: {backend_name}; dtype {dtype}; D = {args.width}")

    results = run_scaling(args, sizes, dtype, repeat)
    summary = summarise(results)
    print()
    print(format_table(
        [
            {
                "method": row["method"],
                "time exponent": "-" if row["time_exponent"] is None else f"{row['time_exponent']:.2f}",
                "memory exponent": "-" if row["memory_exponent"] is None else f"{row['memory_exponent']:.2f}",
                "faster than dense from N": row["overtakes_dense_at"] or "-",
            }
            for row in summary
        ],
        ["method", "time exponent", "memory exponent", "faster than dense from N"],
    ))

    twin = []
    if not args.skip_twin:
        print()
        twin = run_twin(args, dtype, repeat)
        by_backend = {row["backend"]: row for row in twin}
        if "cython" in by_backend:
            for phase in ("forward_s", "backward_s"):
                ratio = by_backend["numpy"][phase] / by_backend["cython"][phase]
                print(f"compiled kernel speed-up over NumPy, {phase[:-2]}: {ratio:.1f}x")
        else:
            print("the compiled extension is not built: only the NumPy kernel was timed")

    write_json(args.json, {
        "machine": machine_description(),
        "backend": backend_name,
        "dtype": str(dtype),
        "width": args.width,
        "window": args.window,
        "stride": args.stride,
        "fit_range": FIT_RANGE,
        "results": results,
        "summary": summary,
        "kernel_comparison": {"N": args.twin_size, "W": args.twin_keys, "rows": twin},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
