"""Transformer-XL: how far back the recurrence reaches, and the cost of a segment.

Reachable context. A random L-layer model runs over a sequence of T
positions in segments of N. For each input position p (from the first on),
the input at p is perturbed and the whole sequence rerun; the farthest p
whose perturbation changes the output at the last position gives the
measured reach T - 1 - p. The table compares it with the reach predicted by
composing the one-pass mask of the recurrence L times (recurrence_mask) and
with the lower bound (N - 1) + L * mem_len. Without memory the reach stops at
the segment start. Each layer adds at least mem_len positions: a memory state
at position s was itself computed from keys back to its own segment's start
minus mem_len, so the bound is exact only when mem_len is a multiple of N.

Time per segment. For one segment of N positions after a full memory of
mem_len positions, the suite times the decoder forward and forward+backward.
The alternative without memory that gives each segment the same context
recomputes all mem_len + N positions from scratch (the "recompute window"
column, forward only), and the last column divides it by the cached forward.
"""

import argparse

import numpy as np

from ..commands import help_description
from ..core.kernels import backend
from ..transformer_xl import (
    XLConfig,
    decoder_backward,
    decoder_forward,
    empty_memory,
    init_layer_params,
    process_segments,
    recurrence_mask,
)
from .harness import best_time, format_table, machine_description, positive_int, write_json


def make_params(n_layers, width, n_heads, rng, dtype):
    """Draw n_layers layers of parameters (feed-forward width 4 C) in the given dtype."""
    params = [init_layer_params(width, n_heads, 4 * width, rng) for _ in range(n_layers)]
    return [{name: value.astype(dtype) for name, value in layer.items()} for layer in params]


def predicted_reach(total_len, segment_len, mem_len, n_layers):
    """Return how far back the last position reaches through n_layers applications of the mask."""
    mask = recurrence_mask(total_len, segment_len, mem_len).astype(np.int64)  # (T, T)
    reached = np.zeros(total_len, dtype=np.int64)
    reached[-1] = 1
    for _ in range(n_layers):
        reached = (reached @ mask > 0).astype(np.int64)  # positions that some reached query attends
    return total_len - 1 - int(np.flatnonzero(reached)[0])


def measured_reach(x, params, config, segment_len, threshold=1e-12):
    """Return T - 1 - p for the first position p whose perturbation changes the last output."""
    baseline, _, _ = process_segments(x, params, config, segment_len)
    direction = np.random.default_rng(1).standard_normal(x.shape[-1])
    for position in range(x.shape[1]):
        nudged = x.copy()
        nudged[:, position] += direction
        out, _, _ = process_segments(nudged, params, config, segment_len)
        if np.max(np.abs(out[:, -1] - baseline[:, -1])) > threshold:
            return x.shape[1] - 1 - position
    return 0


def reach_rows(layer_counts, mem_lengths, segment_len, total_len, width, n_heads, rng):
    """Measure and predict the reach for every (layers, mem_len) pair on one random sequence."""
    rows = []
    x = rng.standard_normal((1, total_len, width))
    for n_layers in layer_counts:
        params = make_params(n_layers, width, n_heads, rng, np.float64)
        for mem_len in mem_lengths:
            config = XLConfig(n_heads=n_heads, mem_len=mem_len)
            rows.append({
                "layers": n_layers,
                "mem_len": mem_len,
                "measured_reach": measured_reach(x, params, config, segment_len),
                "predicted_reach": predicted_reach(total_len, segment_len, mem_len, n_layers),
                "lower_bound": segment_len - 1 + n_layers * mem_len,
            })
    return rows


def time_row(segment_len, mem_len, n_layers, width, n_heads, dtype, repeat, rng):
    """Time one segment after a full memory, and the recomputed window without memory."""
    params = make_params(n_layers, width, n_heads, rng, dtype)
    config = XLConfig(n_heads=n_heads, mem_len=mem_len)
    segment = rng.standard_normal((1, segment_len, width)).astype(dtype)
    mems = [rng.standard_normal((1, mem_len, width)).astype(dtype) for _ in range(n_layers)]
    dout = rng.standard_normal(segment.shape).astype(dtype)

    def forward():
        return decoder_forward(segment, mems, params, config)

    def forward_backward():
        out, _, cache = decoder_forward(segment, mems, params, config)
        return decoder_backward(dout, cache)

    window = rng.standard_normal((1, mem_len + segment_len, width)).astype(dtype)
    no_memory = XLConfig(n_heads=n_heads, mem_len=0)

    def recompute():
        return decoder_forward(window, empty_memory(n_layers, 1, width, dtype=dtype), params, no_memory)

    forward_time = best_time(forward, repeat=repeat)
    row = {
        "N": segment_len,
        "mem_len": mem_len,
        "forward_s": forward_time,
        "forward_backward_s": best_time(forward_backward, repeat=repeat),
        "recompute_s": best_time(recompute, repeat=repeat),
    }
    row["recompute_vs_cached"] = row["recompute_s"] / forward_time
    return row


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m miniattn bench --suite transformer_xl", description=help_description(__doc__))
    parser.add_argument("--segment", type=positive_int, default=8, help="segment length N of the reach study (default 8)")
    parser.add_argument("--length", type=positive_int, default=64, help="sequence length T of the reach study (default 64)")
    parser.add_argument("--layers", default="1,2,3", help="comma-separated layer counts of the reach study (default 1,2,3)")
    parser.add_argument("--mem", default="0,4,8,16", help="comma-separated mem_len of the reach study (default 0,4,8,16)")
    parser.add_argument("--time-n", default="64,128", help="comma-separated segment lengths N to time (default 64,128)")
    parser.add_argument("--width", type=positive_int, default=128, help="model width C of the timing (default 128)")
    parser.add_argument("--heads", type=positive_int, default=4, help="number of heads H of the timing (default 4)")
    parser.add_argument("--time-layers", type=positive_int, default=2, help="layers of the timed model (default 2)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="timing dtype (default float32)")
    parser.add_argument("--repeat", type=positive_int, default=5, help="timing repeats, minimum reported (default 5)")
    parser.add_argument("--quick", action="store_true", help="small run: 1-2 layers, T = 32, N = 64 only, 3 repeats")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)

    layer_counts = [1, 2] if args.quick else [int(item) for item in args.layers.split(",")]
    mem_lengths = [int(item) for item in args.mem.split(",")]
    total_len = 32 if args.quick else args.length
    time_sizes = [64] if args.quick else [int(item) for item in args.time_n.split(",")]
    repeat = 3 if args.quick else args.repeat
    rng = np.random.default_rng(0)
    print(f"machine: {machine_description()}, kernels: {backend()}")

    print(f"\nreachable context: T = {total_len}, segments of N = {args.segment}, width 16, 2 heads, float64")
    reach = reach_rows(layer_counts, mem_lengths, args.segment, total_len, 16, 2, rng)
    columns = ["layers", "mem_len", "measured_reach", "predicted_reach", "lower_bound"]
    print(format_table(reach, columns))
    print("reach: positions back from the last one whose input changes its output; lower_bound = (N - 1) + layers * mem_len")

    print(f"\ntime per segment: {args.time_layers} layers, C = {args.width}, H = {args.heads}, {args.dtype}, best of {repeat}")
    timing = []
    for segment_len in time_sizes:
        for factor in (0, 1, 2, 4):
            timing.append(time_row(segment_len, factor * segment_len, args.time_layers, args.width, args.heads,
                                   np.dtype(args.dtype), repeat, rng))
    table = [
        {
            "N": row["N"],
            "mem_len": row["mem_len"],
            "forward": f"{row['forward_s'] * 1e3:.2f} ms",
            "forward+backward": f"{row['forward_backward_s'] * 1e3:.2f} ms",
            "recompute window": f"{row['recompute_s'] * 1e3:.2f} ms",
            "recompute / cached": f"{row['recompute_vs_cached']:.2f}",
        }
        for row in timing
    ]
    print(format_table(table, list(table[0])))
    write_json(args.json, {"machine": machine_description(), "suite": "transformer_xl", "reach": reach, "timing": timing})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(None))
