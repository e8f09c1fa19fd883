"""``python -m miniattn ring``: run Ring Attention on worker processes and draw the timeline.

Each of P worker processes holds one block of the queries, keys and values.
The command prints what every worker computed, its peak memory, the
timeline of compute, wait and send per worker, and the largest difference
from dense attention (computed in this process when N <= --max-dense).
"""

import argparse

import numpy as np

from ..benchmarks.harness import format_bytes, format_table, positive_int
from ..ring import START_METHODS, draw_timeline, send_compute_overlaps, simulate
from ..ring_attention import LAYOUTS
from ..transformer import attention_backward, attention_forward
from . import help_description


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m miniattn ring", description=help_description(__doc__))
    parser.add_argument("--workers", "-P", type=positive_int, default=4, help="number of worker processes P (default 4)")
    parser.add_argument("--length", "-N", type=positive_int, default=2048, help="sequence length N (default 2048)")
    parser.add_argument("--width", "-D", type=positive_int, default=64, help="head width D (default 64)")
    parser.add_argument("--layout", choices=LAYOUTS, default="contiguous", help="rows each worker holds (default contiguous)")
    parser.add_argument("--causal", action="store_true", help="causal self-attention")
    parser.add_argument("--block-size", type=positive_int, default=256, help="online-softmax tile size inside a worker (default 256)")
    parser.add_argument("--backward", action="store_true", help="also run the backward pass on the ring")
    parser.add_argument("--float32", action="store_true", help="use float32 instead of float64")
    parser.add_argument("--start-method", choices=START_METHODS, default="spawn", help="how workers start (default spawn)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds without progress before the ring is stopped (default 300)")
    parser.add_argument("--columns", type=positive_int, default=72, help="width of the timeline in characters (default 72)")
    parser.add_argument("--max-dense", type=positive_int, default=4096, help="check against dense attention when N is at most this (default 4096)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    return parser


def worker_table(report):
    rows = []
    for worker in report.workers:
        computes = [event for event in worker.events if event.kind == "compute"]
        waits = [event for event in worker.events if event.kind == "wait"]
        rows.append({
            "worker": worker.worker,
            "pid": worker.pid,
            "blocks": worker.blocks_computed,
            "compute ms": f"{sum(e.end - e.start for e in computes) * 1e3:.1f}",
            "wait ms": f"{sum(e.end - e.start for e in waits) * 1e3:.1f}",
            "sends overlapping compute": len({send for send, _ in send_compute_overlaps(worker.events)}),
            "peak memory": format_bytes(worker.peak_bytes),
            "BLAS threads": worker.blas_threads or "unset",
        })
    return format_table(rows, list(rows[0]))


def main(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error(f"--timeout={args.timeout} is invalid; expected a positive number of seconds")
    if args.workers > args.length:
        parser.error(
            f"-P {args.workers} is more than -N {args.length}; expected at most N processes, so that each "
            f"holds at least one position"
        )
    try:
        return run(args)
    except ValueError as error:  # invalid sizes or options, named by the simulator
        parser.error(str(error))


def run(args):
    """Run the simulator with the parsed options and print its report."""
    dtype = np.float32 if args.float32 else np.float64
    rng = np.random.default_rng(args.seed)
    shape = (1, 1, args.length, args.width)
    q, k, v = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    dout = rng.standard_normal(shape).astype(dtype) if args.backward else None

    print(
        f"ring attention: P={args.workers} processes ({args.start_method}), N={args.length}, D={args.width}, "
        f"{np.dtype(dtype).name}, {args.layout} layout, {'causal' if args.causal else 'bidirectional'}"
    )
    result = simulate(
        q, k, v, n_workers=args.workers, layout=args.layout, causal=args.causal, block_size=args.block_size,
        dout=dout, start_method=args.start_method, timeout=args.timeout,
    )
    for report in (result.forward, result.backward):
        if report is None:
            continue
        print()
        print(f"{report.phase}: {report.wall_seconds:.2f} s with process start-up, "
              f"{report.compute_span():.3f} s from the first compute to the last")
        print(worker_table(report))
        print()
        print(draw_timeline(report, width=args.columns))

    print()
    if args.length > args.max_dense:
        print(f"dense check skipped: N={args.length} > --max-dense {args.max_dense}")
        return 0
    expected, dense_cache = attention_forward(q, k, v, causal=args.causal)
    print(f"max |ring - dense| of the output: {np.max(np.abs(result.out - expected)):.2e}")
    if result.grads is not None:
        for name, got, want in zip("qkv", result.grads, attention_backward(dout, dense_cache)):
            print(f"max |ring - dense| of d{name}:     {np.max(np.abs(got - want)):.2e}")
    return 0
