"""Benchmark of blockwise attention and the Ring Attention simulator.

Four measurements, one run each:

1. Peak memory of blockwise attention against dense attention as N grows
   (D = 64, float32, causal). Dense attention is run only while its (N, N)
   score matrix stays under --dense-limit; beyond that the size of one score
   matrix is reported instead.
2. Peak memory per ring worker against P at a fixed N (processes).
3. Wall-time speed-up of P = 2 worker processes over P = 1 at a fixed N,
   bidirectional, every worker limited to one BLAS thread. The time is taken
   from the first compute to the last (the timeline), so process start-up is
   left out; the wall time with start-up is reported beside it.
4. The cost model of the ring: compute time per block (measured in the P = 2
   run) against transfer time per block (one K,V block sent through a pipe,
   measured here), and the block length at which compute covers transfer.

Run ``python -m miniattn bench --suite ring`` or
``python -m miniattn.benchmarks.ring [--quick] [--json PATH]``.
"""

import argparse
import threading
import time
from multiprocessing import Pipe

import numpy as np

from ..commands import help_description
from ..core.online_softmax import blockwise_attention_forward
from ..ring import simulate
from ..transformer import attention_forward
from .harness import format_bytes, format_table, machine_description, peak_memory, positive_int, write_json

GIB = 2**30


def random_inputs(n, width, rng, dtype=np.float32):
    """Return q, k, v of shape (1, 1, n, width)."""
    return tuple(rng.standard_normal((1, 1, n, width)).astype(dtype) for _ in range(3))


def memory_sweep(lengths, width, block, dense_limit, rng):
    """Section 1: blockwise and dense peak memory for each N."""
    rows = []
    for n in lengths:
        q, k, v = random_inputs(n, width, rng)
        started = time.perf_counter()
        _, blockwise_peak = peak_memory(
            lambda: blockwise_attention_forward(q, k, v, causal=True, query_block=block, key_block=block)
        )
        blockwise_seconds = time.perf_counter() - started
        score_bytes = n * n * q.dtype.itemsize  # one (N, N) score matrix
        dense_peak = None
        if score_bytes <= dense_limit:
            _, dense_peak = peak_memory(lambda: attention_forward(q, k, v, causal=True))
        rows.append({
            "N": n,
            "blockwise peak": format_bytes(blockwise_peak),
            "blockwise seconds": f"{blockwise_seconds:.2f}",
            "dense peak": format_bytes(dense_peak) if dense_peak is not None else f"not run ({format_bytes(score_bytes)} scores)",
            "one score matrix": format_bytes(score_bytes),
            "_blockwise_bytes": blockwise_peak,
            "_dense_bytes": dense_peak,
            "_score_bytes": score_bytes,
        })
        print(f"  N={n}: blockwise {format_bytes(blockwise_peak)} in {blockwise_seconds:.2f} s, "
              f"dense {rows[-1]['dense peak']}", flush=True)
    return rows


def ring_memory_sweep(n, width, block, worker_counts, rng):
    """Section 2: the largest per-worker peak memory for each P."""
    q, k, v = random_inputs(n, width, rng)
    rows = []
    for n_workers in worker_counts:
        result = simulate(q, k, v, n_workers=n_workers, block_size=block)
        peaks = [worker.peak_bytes for worker in result.forward.workers]
        rows.append({
            "P": n_workers,
            "max worker peak": format_bytes(max(peaks)),
            "peak x P": format_bytes(max(peaks) * n_workers),
            "_peak_bytes": max(peaks),
        })
        print(f"  P={n_workers}: max worker peak {format_bytes(max(peaks))}", flush=True)
    return rows


def speedup(n, width, block, repeats, rng):
    """Section 3: best compute span and wall time of P = 1 and P = 2; the P = 2 report."""
    q, k, v = random_inputs(n, width, rng)
    best = {}
    reports = {}
    for n_workers in (1, 2):
        spans, walls = [], []
        for _ in range(repeats):
            result = simulate(q, k, v, n_workers=n_workers, block_size=block)
            spans.append(result.forward.compute_span())
            walls.append(result.forward.wall_seconds)
            reports[n_workers] = result.forward
        best[n_workers] = (min(spans), min(walls))
        print(f"  P={n_workers}: compute span {min(spans):.2f} s, wall with start-up {min(walls):.2f} s", flush=True)
    return best, reports


def pipe_transfer_seconds(nbytes, repeats=5):
    """Return the best time to send nbytes of float32 values through a Pipe to a reading thread."""
    block = np.zeros(nbytes // 4, dtype=np.float32)
    reader, writer = Pipe(duplex=False)
    times = []
    try:
        for _ in range(repeats):
            received = []
            thread = threading.Thread(target=lambda: received.append(reader.recv()))
            thread.start()
            started = time.perf_counter()
            writer.send(block)
            thread.join()
            times.append(time.perf_counter() - started)
    finally:
        reader.close()
        writer.close()
    return min(times)


def cost_model(report, n, width, itemsize):
    """Section 4: compute vs transfer time per block, from a P = 2 forward report."""
    n_workers = len(report.workers)
    block = -(-n // n_workers)  # c
    computes = [event.end - event.start for worker in report.workers for event in worker.events if event.kind == "compute"]
    compute_seconds = float(np.median(computes))
    flops = 4.0 * block * block * width  # Q K^T and P V of one (c, c) block pair
    flop_rate = flops / compute_seconds
    block_bytes = 2 * block * width * itemsize  # one K block and one V block
    transfer_seconds = pipe_transfer_seconds(block_bytes)
    bandwidth = block_bytes / transfer_seconds
    # compute 4 c^2 D / F >= transfer 2 c D s / bandwidth  <=>  c >= s F / (2 bandwidth)
    min_block = itemsize * flop_rate / (2 * bandwidth)
    return {
        "block length c": block,
        "compute per block (s)": compute_seconds,
        "FLOPs per block": flops,
        "achieved FLOP/s": flop_rate,
        "bytes per K,V block": block_bytes,
        "transfer per block (s)": transfer_seconds,
        "pipe bandwidth (B/s)": bandwidth,
        "compute / transfer": compute_seconds / transfer_seconds,
        "minimum c for overlap": min_block,
    }


def run_memory_section(args, lengths, rng):
    """Print and return section 1."""
    width, block = args.width, args.block_size
    print(f"\n1. peak memory, blockwise vs dense attention (D={width}, float32, causal, tiles {block}):", flush=True)
    memory_rows = memory_sweep(lengths, width, block, args.dense_limit * GIB, rng)
    print(format_table(memory_rows, ["N", "blockwise peak", "blockwise seconds", "dense peak", "one score matrix"]))
    return [{key: value for key, value in row.items() if key.startswith("_") or key == "N"} for row in memory_rows]


def run_ring_memory_section(args, rng):
    """Print and return section 2."""
    print(f"\n2. ring: largest worker peak memory vs P (N={args.speed_length}, processes, tiles {args.ring_block_size}):", flush=True)
    ring_rows = ring_memory_sweep(args.speed_length, args.width, args.ring_block_size, [1, 2, 4, 8], rng)
    print(format_table(ring_rows, ["P", "max worker peak", "peak x P"]))
    return [{"P": row["P"], "peak_bytes": row["_peak_bytes"]} for row in ring_rows]


def run_speed_sections(args, rng):
    """Print and return sections 3 and 4, which share the P = 2 runs."""
    print(f"\n3. speed-up of P=2 over P=1 processes (N={args.speed_length}, bidirectional, one BLAS thread each):", flush=True)
    best, reports = speedup(args.speed_length, args.width, args.block_size, args.repeats, rng)
    ratio = best[1][0] / best[2][0]
    print(f"  speed-up (compute span): {ratio:.2f}x; with process start-up: {best[1][1] / best[2][1]:.2f}x")

    print("\n4. cost model per block (from the P=2 run):", flush=True)
    model = cost_model(reports[2], args.speed_length, args.width, np.dtype(np.float32).itemsize)
    for name, value in model.items():
        print(f"  {name:<24} {value:.4g}")
    speed = {"P1_span": best[1][0], "P2_span": best[2][0], "P1_wall": best[1][1], "P2_wall": best[2][1], "ratio": ratio}
    return {"speedup": speed, "cost_model": model}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m miniattn bench --suite ring", description=help_description(__doc__))
    parser.add_argument("--quick", action="store_true", help="small sizes that finish in well under a minute")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--width", type=positive_int, default=64, help="head width D (default 64)")
    parser.add_argument("--max-length", type=positive_int, default=131072, help="largest N of the memory sweep (default 131072)")
    parser.add_argument("--dense-limit", type=float, default=2.0, help="run dense attention while one score matrix is at most this many GiB (default 2)")
    parser.add_argument("--speed-length", type=positive_int, default=16384, help="N of the ring memory and speed-up runs (default 16384)")
    parser.add_argument("--block-size", type=positive_int, default=1024, help="online-softmax tile size (default 1024)")
    parser.add_argument("--ring-block-size", type=positive_int, default=256,
                        help="tile size in the ring memory sweep, small so that the blocks, not the tile, dominate (default 256)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="runs per P in the speed-up, best kept (default 3)")
    parser.add_argument("--sections", default="1234", help="which of the four measurements to run, e.g. 34 (default 1234)")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_length, args.speed_length, args.repeats = 8192, 4096, 1
    rng = np.random.default_rng(0)
    lengths = [1024 * 2**i for i in range(20) if 1024 * 2**i <= args.max_length]

    print(f"machine: {machine_description()}")
    results = {"machine": machine_description()}
    if "1" in args.sections:
        results["memory"] = run_memory_section(args, lengths, rng)
    if "2" in args.sections:
        results["ring_memory"] = run_ring_memory_section(args, rng)
    if "3" in args.sections or "4" in args.sections:
        results.update(run_speed_sections(args, rng))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
