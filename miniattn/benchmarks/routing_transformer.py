"""Routing attention benchmark: probability mass covered, and time against N.

``python -m miniattn bench --suite routing_transformer [--quick] [--json PATH]``

1. Coverage. For a growing number of clusters Kc, the share of dense
   attention's probability mass that falls on keys a query attends in some
   cluster: coverage = mean_i sum_{j attended by i} P_ij, with P the dense
   softmax. A query routed to no cluster covers 0; the mean over routed
   queries only is reported too. Two inputs: "clustered" (queries and keys
   near a few shared directions, the structure routing is built for) and
   "random" (Gaussian). Two kinds of centroids: "random"
   (drawn on the unit sphere) and "fitted" (a few online k-means steps on the
   same input). The fraction of keys seen is the coverage that a random key
   set of the same size would get on average.
2. Time. Forward plus backward time of routing attention with
   Kc = round(sqrt(N)) clusters against N, next to dense attention, with the
   fitted log-log exponent (about 1.5 expected for routing, 2 for dense).

On a machine shared with other work, set OPENBLAS_NUM_THREADS=1 (or the
variable of your BLAS): a multi-threaded BLAS that waits for busy cores adds
tens of milliseconds to small products and hides the scaling. --clock cpu
then measures the CPU time of the one thread, which excludes waiting for a
core.
"""

import argparse
import math
import time

import numpy as np

from ..commands import help_description
from ..routing_transformer import (
    init_centroids,
    nearest_centroids,
    routing_attention_backward,
    routing_attention_forward,
    routing_keys_seen,
    update_centroids,
)
from ..transformer import attention_backward, attention_forward, attention_probabilities
from .harness import best_time, fit_loglog_slope, format_table, machine_description, positive_int, write_json


def clustered_inputs(rng, n_tokens, width, n_topics, noise=0.3):
    """Queries and keys near n_topics random directions; values Gaussian. Shapes (1, 1, N, D)."""
    directions = rng.standard_normal((n_topics, width))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    topic_q = rng.integers(0, n_topics, size=n_tokens)
    topic_k = rng.integers(0, n_topics, size=n_tokens)
    scale = math.sqrt(width)  # |q . k| / sqrt(D) of order sqrt(D): peaked attention within a topic
    q = scale * (directions[topic_q] + noise * rng.standard_normal((n_tokens, width)) / math.sqrt(width))
    k = scale * (directions[topic_k] + noise * rng.standard_normal((n_tokens, width)) / math.sqrt(width))
    v = rng.standard_normal((n_tokens, width))
    return q[None, None], k[None, None], v[None, None]


def random_inputs(rng, n_tokens, width):
    """Gaussian queries, keys and values (1, 1, N, D)."""
    return tuple(rng.standard_normal((1, 1, n_tokens, width)) for _ in range(3))


def fit_centroids(rng, q, k, n_clusters, steps=10, decay=0.5):
    """Centroids after `steps` online k-means steps on the queries and keys, from random ones."""
    centroids = init_centroids(rng, q.shape[1], n_clusters, q.shape[-1])
    items = np.concatenate([q, k], axis=2)
    for _ in range(steps):
        centroids = update_centroids(centroids, items, nearest_centroids(items, centroids), decay=decay)
    return centroids


def coverage(q, k, v, centroids, causal):
    """Return (mass covered, mass covered per routed query, fraction routed, fraction of keys seen)."""
    _, dense_cache = attention_forward(q, k, v, causal=causal)
    probabilities = attention_probabilities(dense_cache)  # (1, 1, N, M)
    _, cache = routing_attention_forward(q, k, v, centroids, causal=causal)
    seen = routing_keys_seen(cache)  # (1, 1, N, M)
    n_queries, n_keys = q.shape[2], k.shape[2]
    allowed = np.tril(np.ones((n_queries, n_keys), bool)) if causal else np.ones((n_queries, n_keys), bool)
    covered = np.sum(probabilities * seen, axis=-1)  # (1, 1, N)
    is_routed = cache["counts"] > 0  # (1, 1, N)
    mass = float(np.mean(covered))
    mass_routed = float(np.mean(covered[is_routed])) if np.any(is_routed) else 0.0
    routed = float(np.mean(is_routed))
    seen_fraction = float(seen.sum() / (allowed.sum() * q.shape[0] * q.shape[1]))
    return mass, mass_routed, routed, seen_fraction


def run_coverage(rng, n_tokens, width, cluster_counts, n_topics, causal):
    rows = []
    inputs = {
        "clustered": clustered_inputs(rng, n_tokens, width, n_topics),
        "random": random_inputs(rng, n_tokens, width),
    }
    for input_name, (q, k, v) in inputs.items():
        for n_clusters in cluster_counts:
            for centroid_kind in ("random", "fitted"):
                if centroid_kind == "random":
                    centroids = init_centroids(rng, 1, n_clusters, width)
                else:
                    centroids = fit_centroids(rng, q, k, n_clusters)
                mass, mass_routed, routed, seen_fraction = coverage(q, k, v, centroids, causal)
                rows.append(
                    {
                        "input": input_name,
                        "clusters": n_clusters,
                        "centroids": centroid_kind,
                        "mass covered": round(mass, 3),
                        "per routed query": round(mass_routed, 3),
                        "queries routed": round(routed, 3),
                        "keys seen": round(seen_fraction, 3),
                    }
                )
    return rows


def best_cpu_time(function, *, repeat=3):
    """Return the minimum CPU time in seconds of function() over `repeat` calls.

    CPU time (time.process_time, summed over the process's threads) leaves
    out the time the process waits for a core, so it varies less than wall
    time on a shared machine.
    """
    times = []
    for _ in range(repeat):
        begin = time.process_time()
        function()
        times.append(time.process_time() - begin)
    return min(times)


def run_timing(rng, sizes, width, causal, repeat, dense_max, clock="wall"):
    rows = []
    for n_tokens in sizes:
        q, k, v = random_inputs(rng, n_tokens, width)
        n_clusters = max(1, round(math.sqrt(n_tokens)))
        centroids = init_centroids(rng, 1, n_clusters, width)
        dout = rng.standard_normal(q.shape)

        def routing_step():
            _, cache = routing_attention_forward(q, k, v, centroids, causal=causal)
            routing_attention_backward(dout, cache)

        def dense_step():
            _, cache = attention_forward(q, k, v, causal=causal)
            attention_backward(dout, cache)

        timer = best_cpu_time if clock == "cpu" else best_time
        row = {"N": n_tokens, "clusters": n_clusters, "routing s": timer(routing_step, repeat=repeat)}
        row["dense s"] = timer(dense_step, repeat=repeat) if n_tokens <= dense_max else None
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m miniattn bench --suite routing_transformer", description=help_description(__doc__, paragraphs=99),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--width", type=positive_int, default=64, help="head width D (default 64)")
    parser.add_argument("--coverage-n", type=positive_int, default=None, help="sequence length of the coverage run (default 1024, quick 256)")
    parser.add_argument("--topics", type=positive_int, default=16, help="directions in the clustered input (default 16)")
    parser.add_argument("--causal", action="store_true", help="causal attention (default bidirectional)")
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=None,
                        help="sequence lengths of the timing run (default 256 .. 8192, quick 128 .. 1024)")
    parser.add_argument("--dense-max", type=positive_int, default=4096, help="largest N timed for dense attention (default 4096)")
    parser.add_argument("--repeat", type=positive_int, default=3, help="timing repeats, the minimum is kept (default 3)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or CPU time of this process (steadier on a shared machine; default wall)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    coverage_n = args.coverage_n or (256 if args.quick else 1024)
    sizes = args.sizes or ([128, 256, 512, 1024] if args.quick else [256, 512, 1024, 2048, 4096, 8192])
    cluster_counts = [c for c in (1, 2, 4, 8, 16, 32, 64) if c <= coverage_n]
    mode = "causal" if args.causal else "bidirectional"
    print(f"machine: {machine_description()}")

    print(f"\n1. dense probability mass covered, N = M = {coverage_n}, D = {args.width}, {mode}, "
          f"clustered input with {args.topics} directions")
    coverage_rows = run_coverage(rng, coverage_n, args.width, cluster_counts, args.topics, args.causal)
    print(format_table(coverage_rows, ["input", "clusters", "centroids", "mass covered", "per routed query", "queries routed", "keys seen"]))

    print(f"\n2. forward + backward {args.clock} time, Kc = round(sqrt(N)) clusters, D = {args.width}, {mode}")
    timing_rows = run_timing(rng, sizes, args.width, args.causal, args.repeat, args.dense_max, args.clock)
    table = [
        {
            "N": row["N"],
            "clusters": row["clusters"],
            "routing ms": f"{1e3 * row['routing s']:.2f}",
            "dense ms": "-" if row["dense s"] is None else f"{1e3 * row['dense s']:.2f}",
        }
        for row in timing_rows
    ]
    print(format_table(table, ["N", "clusters", "routing ms", "dense ms"]))
    routing_slope = fit_loglog_slope([r["N"] for r in timing_rows], [r["routing s"] for r in timing_rows])
    upper = timing_rows[-3:]
    upper_slope = fit_loglog_slope([r["N"] for r in upper], [r["routing s"] for r in upper])
    dense_rows = [r for r in timing_rows if r["dense s"] is not None]
    dense_slope = fit_loglog_slope([r["N"] for r in dense_rows], [r["dense s"] for r in dense_rows])
    print(f"fitted exponent: routing {routing_slope:.2f} (largest three N: {upper_slope:.2f}), dense {dense_slope:.2f}")

    write_json(args.json, {
        "machine": machine_description(),
        "arguments": vars(args),
        "coverage": coverage_rows,
        "timing": timing_rows,
        "exponents": {"routing": routing_slope, "routing_largest_three": upper_slope, "dense": dense_slope},
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
