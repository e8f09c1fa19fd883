"""Reformer benchmarks: coverage of dense attention, time against N, hashing backends, memory.

Run with ``python -m miniattn.benchmarks.reformer`` (add ``--quick`` for a small
run, ``--json PATH`` to save the numbers). Four measurements:

1. coverage: the share of dense shared-QK attention's probability mass that
   falls on the keys LSH attention sees, for 1, 2, 4 and 8 hash rounds, on
   clustered inputs (queries near one of several centres), averaged over queries;
2. scaling: LSH attention forward and forward+backward time against N with a
   fixed chunk length, and the fitted log-log slope (N log N predicts just
   above 1);
3. hashing: compiled hashing and sort against the NumPy twins at N = 65,536
   with 4 rounds, separately and together (both hashing paths include the
   same blocked BLAS projection);
4. memory: tracemalloc peak of forward + backward of a reversible and an
   ordinary stack at several depths, less the parameter gradients allocated
   during the call (the parameters exist before it and are not counted).
"""

import argparse
import sys
import time

import numpy as np

from ..commands import help_description
from .. import reformer
from ..core import hashing, kernels
from ..transformer import attention_forward
from .harness import best_time, fit_loglog_slope, format_bytes, format_table, machine_description, peak_memory, write_json


def clustered_vectors(rng, n_positions, width, n_clusters=16, spread=0.3):
    """Return (N, D) vectors scattered around n_clusters random unit centres, scaled by 4."""
    centres = rng.standard_normal((n_clusters, width))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, n_clusters, size=n_positions)
    return 4.0 * (centres[labels] + spread * rng.standard_normal((n_positions, width)) / np.sqrt(width))


def dense_shared_qk_probabilities(qk):
    """Dense attention probabilities (N, N) of shared-QK attention with the self-penalty."""
    n_positions = qk.shape[-2]
    unit, _ = reformer.normalize_forward(qk)
    scores = qk @ unit.T  # (N, D) @ (D, N) -> (N, N)
    scores -= reformer.SELF_PENALTY * np.eye(n_positions)
    scores -= scores.max(axis=1, keepdims=True)
    probs = np.exp(scores)
    return probs / probs.sum(axis=1, keepdims=True)


def measure_coverage(rng, n_positions, width, chunk_length, rounds):
    """Return rows of mean and minimum covered dense probability mass per round count."""
    qk = clustered_vectors(rng, n_positions, width)
    v = rng.standard_normal((n_positions, width))
    dense = dense_shared_qk_probabilities(qk)
    n_buckets = max(2, 2 * n_positions // chunk_length)
    rows = []
    for n_rounds in rounds:
        rotations = hashing.draw_rotations(rng, n_rounds, width, n_buckets)
        _, cache = reformer.lsh_attention_forward(qk, v, n_buckets=n_buckets, chunk_length=chunk_length, rotations=rotations)
        seen = reformer.window_counts(cache) > 0
        covered = np.sum(dense * seen, axis=1)  # (N,)
        rows.append({
            "rounds": n_rounds,
            "mean covered mass": f"{covered.mean():.3f}",
            "min covered mass": f"{covered.min():.3f}",
            "keys seen per query": f"{seen.sum(axis=1).mean():.0f}",
        })
    return rows, n_buckets


def measure_scaling(rng, sizes, width, chunk_length, n_rounds):
    """Return rows of forward and forward+backward time per N, and the fitted slopes."""
    rows, forward_times, total_times = [], [], []
    for n_positions in sizes:
        qk = rng.standard_normal((1, 1, n_positions, width))
        v = rng.standard_normal((1, 1, n_positions, width))
        n_buckets = max(2, 2 * n_positions // chunk_length)
        rotations = hashing.draw_rotations(rng, n_rounds, width, n_buckets)
        options = {"n_buckets": n_buckets, "chunk_length": chunk_length, "rotations": rotations}
        forward_time = best_time(lambda: reformer.lsh_attention_forward(qk, v, **options))
        dout = rng.standard_normal(qk.shape)

        def forward_backward():
            _, cache = reformer.lsh_attention_forward(qk, v, **options)
            reformer.lsh_attention_backward(dout, cache)

        total_time = best_time(forward_backward)
        dense_time = None
        if n_positions <= 4096:
            dense_time = best_time(lambda: attention_forward(qk, qk, v))
        forward_times.append(forward_time)
        total_times.append(total_time)
        rows.append({
            "N": n_positions,
            "buckets": n_buckets,
            "forward ms": f"{1e3 * forward_time:.1f}",
            "fwd+bwd ms": f"{1e3 * total_time:.1f}",
            "fwd us / (N log2 N)": f"{1e6 * forward_time / (n_positions * np.log2(n_positions)):.3f}",
            "dense fwd ms": "-" if dense_time is None else f"{1e3 * dense_time:.1f}",
        })
    return rows, fit_loglog_slope(sizes, forward_times), fit_loglog_slope(sizes, total_times)


def best_cpu_time(function, *, repeat=5):
    """Return the minimum process CPU time in seconds of function() over `repeat` calls.

    On a shared machine this is less inflated than wall time for
    single-threaded code; threads of a multi-threaded BLAS add up in it.
    """
    times = []
    for _ in range(repeat):
        begin = time.process_time()
        function()
        times.append(time.process_time() - begin)
    return min(times)


def measure_hashing(rng, n_positions, width, n_buckets, n_rounds):
    """Return rows of NumPy and compiled wall and CPU time for hashing, sorting, and both."""
    x = rng.standard_normal((n_positions, width))
    rotations = hashing.draw_rotations(rng, n_rounds, width, n_buckets)
    ids = hashing.lsh_hash(x, rotations)

    timings = {}
    for backend in kernels.available_backends():
        calls = (
            lambda: hashing.lsh_hash(x, rotations, backend=backend),
            lambda: hashing.lsh_sort(ids, backend=backend),
            lambda: hashing.lsh_sort(hashing.lsh_hash(x, rotations, backend=backend), backend=backend),
        )
        timings[backend] = [(best_time(call, repeat=5), best_cpu_time(call)) for call in calls]

    # The projection both backends share, blocked as lsh_hash blocks it.
    columns = rotations.transpose(1, 0, 2).reshape(width, -1)  # (D, K h)

    def project():
        for start in range(0, n_positions, hashing.BLOCK_ROWS):
            x[start:start + hashing.BLOCK_ROWS] @ columns

    projection = (best_time(project, repeat=5), best_cpu_time(project))
    for backend in timings:
        total_wall, total_cpu = timings[backend][2]
        timings[backend].append((total_wall - projection[0], total_cpu - projection[1]))

    rows = [{"measure": "shared projection x R", "numpy ms": f"{1e3 * projection[0]:.1f}",
             "numpy cpu ms": f"{1e3 * projection[1]:.1f}"}]
    for label, index in (
        ("hash (projection + argmax)", 0),
        ("sort", 1),
        ("hash + sort", 2),
        ("hash + sort less projection", 3),
    ):
        numpy_wall, numpy_cpu = timings["numpy"][index]
        row = {"measure": label, "numpy ms": f"{1e3 * numpy_wall:.1f}", "numpy cpu ms": f"{1e3 * numpy_cpu:.1f}"}
        if "cython" in timings:
            cython_wall, cython_cpu = timings["cython"][index]
            row["cython ms"] = f"{1e3 * cython_wall:.1f}"
            row["cython cpu ms"] = f"{1e3 * cython_cpu:.1f}"
            row["speed-up"] = f"{numpy_wall / cython_wall:.1f}x"
            row["cpu speed-up"] = f"{numpy_cpu / cython_cpu:.1f}x"
        rows.append(row)
    return rows


def measure_memory(rng, depths, batch, n_positions, width, n_heads, ff_width, chunk_length, n_rounds):
    """Return rows of peak activation memory of reversible and ordinary stacks per depth."""
    n_buckets = max(2, 2 * n_positions // chunk_length)
    x = rng.standard_normal((batch, n_positions, width))
    dout = rng.standard_normal(x.shape)
    rows = []
    for depth in depths:
        layers = [
            reformer.init_reformer_layer(
                width, n_heads, ff_width, rng, n_buckets=n_buckets, chunk_length=chunk_length,
                n_rounds=n_rounds, dropout=0.1, ff_chunks=4,
            )
            for _ in range(depth)
        ]
        peaks = {}
        for label, forward, backward in (
            ("reversible", reformer.reversible_stack_forward, reformer.reversible_stack_backward),
            ("ordinary", reformer.ordinary_stack_forward, reformer.ordinary_stack_backward),
        ):
            seed = int(rng.integers(2**31))

            def run():
                out, cache = forward(x, layers, rng=np.random.default_rng(seed))
                return backward(dout, cache)

            (dx, grads), peak = peak_memory(run)
            gradient_bytes = dx.nbytes + sum(grad.nbytes for layer_grads in grads for grad in layer_grads.values())
            peaks[label] = peak - gradient_bytes
        rows.append({
            "layers": depth,
            "reversible": format_bytes(peaks["reversible"]),
            "ordinary": format_bytes(peaks["ordinary"]),
            "reversible bytes": peaks["reversible"],
            "ordinary bytes": peaks["ordinary"],
        })
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m miniattn bench --suite reformer", description=help_description(__doc__))
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run of a few seconds")
    parser.add_argument("--json", metavar="PATH", help="also write the measured numbers to this JSON file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs and rotations")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)

    if args.quick:
        coverage_n, sizes, hashing_n, depths = 256, [256, 512, 1024], 8192, [2, 4]
    else:
        coverage_n, sizes, hashing_n, depths = 1024, [1024, 2048, 4096, 8192, 16384], 65536, [2, 4, 6, 8, 10, 12]

    print(f"machine: {machine_description()}; backend: {kernels.backend()}")

    coverage_rows, coverage_buckets = measure_coverage(rng, coverage_n, 32, 64, (1, 2, 4, 8))
    print(f"\n1. covered dense attention mass, N={coverage_n}, D=32, chunk 64, {coverage_buckets} buckets")
    print(format_table(coverage_rows, ["rounds", "mean covered mass", "min covered mass", "keys seen per query"]))

    scaling_rows, forward_slope, total_slope = measure_scaling(rng, sizes, 64, 64, 2)
    print("\n2. LSH attention time against N (B=H=1, D=64, chunk 64, 2 rounds, buckets 2N/64)")
    print(format_table(scaling_rows, ["N", "buckets", "forward ms", "fwd+bwd ms", "fwd us / (N log2 N)", "dense fwd ms"]))
    print(f"log-log slope: forward {forward_slope:.2f}, forward+backward {total_slope:.2f}")

    hashing_rows = measure_hashing(rng, hashing_n, 64, 32, 4)
    print(f"\n3. hashing + sort, N={hashing_n}, D=64, 32 buckets, 4 rounds")
    print(format_table(hashing_rows, [
        "measure", "numpy ms", "cython ms", "speed-up", "numpy cpu ms", "cython cpu ms", "cpu speed-up",
    ]))

    memory_rows = measure_memory(rng, depths, 1, 256, 64, 2, 256, 32, 2)
    print("\n4. peak activation memory of forward + backward (B=1, N=256, C=64, H=2, FF 256, chunk 32, 2 rounds)")
    print(format_table(memory_rows, ["layers", "reversible", "ordinary"]))
    first, last = memory_rows[0], memory_rows[-1]
    reversible_ratio = last["reversible bytes"] / first["reversible bytes"]
    ordinary_ratio = last["ordinary bytes"] / first["ordinary bytes"]
    print(
        f"{last['layers']} vs {first['layers']} layers: reversible x{reversible_ratio:.2f}, "
        f"ordinary x{ordinary_ratio:.2f}"
    )

    write_json(args.json, {
        "machine": machine_description(),
        "backend": kernels.backend(),
        "coverage": coverage_rows,
        "scaling": {"rows": scaling_rows, "forward_slope": forward_slope, "total_slope": total_slope},
        "hashing": hashing_rows,
        "memory": {"rows": memory_rows, "reversible_ratio": reversible_ratio, "ordinary_ratio": ordinary_ratio},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
