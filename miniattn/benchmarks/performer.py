"""Performer (FAVOR+) benchmark: approximation error against F, and cost against N.

Two parts, both measured within one run:

1. Quality: the relative error |out - exact| / |exact| of FAVOR+ against exact
   softmax attention as the number of random features F grows, for
   orthogonal and i.i.d. features, on inputs with structure (queries and keys
   of low rank, or clustered around shared centres) as well as i.i.d.
   Gaussian ones, with the fitted log-log slope (about -0.5 expected).
   ``--qkv FILE.npz`` replaces the synthetic inputs by saved arrays q, k, v
   (..., N, D), e.g. from a trained model.
2. Cost: forward time, peak memory (tracemalloc) and backward time of
   bidirectional and causal FAVOR+ and of dense attention against N, with the fitted scaling
   exponents over N >= 4,096 and the first N at which FAVOR+ is faster than
   dense attention. Dense attention runs only up to --dense-max-n, because
   its N x N matrix outgrows memory.

Run: python -m miniattn.benchmarks.performer [--quick] [--json PATH]
"""

import argparse
import sys
import zipfile

import numpy as np

from ..commands import help_description
from ..core.validate import check_attention_inputs, check_float_array
from ..performer import draw_features, favor_attention_backward, favor_attention_forward
from ..transformer import attention_backward, attention_forward
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


# --- quality: error against F ---------------------------------------------------------


def synthetic_inputs(kind, length, width, rng, *, logit_scale=1.0):
    """Return q, k, v (length, width) of one kind: "gaussian", "low_rank" or "clustered".

    Queries and keys are rescaled so that |x~| = |x| D^-1/4 is about
    sqrt(logit_scale) on average, which makes the logits q.k / sqrt(D) spread over
    a few units: attention that is peaked but not one-hot.
    """
    if kind == "gaussian":
        q = rng.standard_normal((length, width))
        k = rng.standard_normal((length, width))
    elif kind == "low_rank":
        rank = 4
        basis = rng.standard_normal((rank, width))  # (r, D), shared by queries and keys
        q = rng.standard_normal((length, rank)) @ basis + 0.1 * rng.standard_normal((length, width))
        k = rng.standard_normal((length, rank)) @ basis + 0.1 * rng.standard_normal((length, width))
    elif kind == "clustered":
        centres = rng.standard_normal((8, width))  # (clusters, D)
        q = centres[rng.integers(0, 8, length)] + 0.3 * rng.standard_normal((length, width))
        k = centres[rng.integers(0, 8, length)] + 0.3 * rng.standard_normal((length, width))
    else:
        raise ValueError(f"kind={kind!r} is invalid; expected 'gaussian', 'low_rank' or 'clustered'")
    target = np.sqrt(logit_scale) * width**0.25  # mean |x| giving mean |x~| = sqrt(logit_scale)
    q *= target / np.mean(np.linalg.norm(q, axis=-1))
    k *= target / np.mean(np.linalg.norm(k, axis=-1))
    v = rng.standard_normal((length, width))
    return q, k, v


def error_against_features(inputs, feature_counts, seeds, *, causal=False):
    """Return {orthogonal: errors (len(seeds), len(feature_counts))}, relative errors per feature draw."""
    q, k, v = inputs
    exact, _ = attention_forward(q, k, v, causal=causal)
    results = {}
    for orthogonal in (True, False):
        errors = np.empty((len(seeds), len(feature_counts)))
        for column, count in enumerate(feature_counts):
            for row, seed in enumerate(seeds):
                features = draw_features(count, q.shape[-1], np.random.default_rng(seed), orthogonal=orthogonal)
                out, _ = favor_attention_forward(q, k, v, features, causal=causal)
                errors[row, column] = np.linalg.norm(out - exact) / np.linalg.norm(exact)
        results[orthogonal] = errors
    return results


def load_qkv(path):
    """Return float64 (q, k, v) from an .npz file with the float arrays q, k and v (..., N, D).

    Raises ValueError or TypeError naming the file and what is wrong with it.
    """
    try:
        saved = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile):
        saved = None
    if not hasattr(saved, "files"):  # missing, unreadable, or a single .npy array
        raise ValueError(f"--qkv {path!r} is not a readable .npz file; expected one written by "
                         f"python -m miniattn tour --save-inputs FILE.npz")
    with saved:
        missing = [name for name in ("q", "k", "v") if name not in saved.files]
        if missing:
            raise ValueError(f"--qkv {path!r} has no array {', '.join(missing)}; expected arrays q, k and v")
        arrays = {name: saved[name] for name in ("q", "k", "v")}
    try:
        for name, array in arrays.items():
            check_float_array(name, array, min_ndim=2)
        check_attention_inputs(arrays["q"], arrays["k"], arrays["v"])
    except (ValueError, TypeError) as error:
        raise type(error)(f"--qkv {path!r}: {error}") from None
    return tuple(arrays[name].astype(np.float64) for name in ("q", "k", "v"))


def run_quality(args, report):
    feature_counts = args.features_list
    seeds = range(args.seeds)
    if args.qkv:
        cases = {args.qkv: load_qkv(args.qkv)}
    else:
        rng = np.random.default_rng(args.seed)
        cases = {
            kind: synthetic_inputs(kind, args.quality_n, args.width, rng)
            for kind in ("gaussian", "low_rank", "clustered")
        }
    tables = {"median": [], "mean": []}
    records = []
    for name, inputs in cases.items():
        scaled_norm = float(np.mean(np.linalg.norm(inputs[0], axis=-1)) * inputs[0].shape[-1] ** -0.25)
        for causal in (False, True):
            results = error_against_features(inputs, feature_counts, seeds, causal=causal)
            for orthogonal, errors in results.items():
                label = {"inputs": name, "causal": causal, "features": "orthogonal" if orthogonal else "iid"}
                record = {**label, "mean_scaled_query_norm": scaled_norm, "errors": errors.tolist()}
                # The estimator is heavy-tailed: a rare feature draw aligned with a large
                # key gives a large error, so the median is reported beside the mean.
                for statistic, summary in (("median", np.median(errors, axis=0)), ("mean", errors.mean(axis=0))):
                    slope = fit_loglog_slope(feature_counts, summary)
                    row = dict(label)
                    row.update({f"F={count}": f"{error:.4f}" for count, error in zip(feature_counts, summary)})
                    row["slope"] = f"{slope:.2f}"
                    tables[statistic].append(row)
                    record[f"{statistic}_slope"] = slope
                records.append(record)
            print(f"quality: {name} causal={causal} done", file=sys.stderr)
    columns = ["inputs", "causal", "features"] + [f"F={count}" for count in feature_counts] + ["slope"]
    for statistic, rows in tables.items():
        print(f"\nRelative error |out - exact| / |exact|, {statistic} over {args.seeds} feature draws "
              f"(N = {args.quality_n}, D = {args.width}, float64)")
        print(format_table(rows, columns))
    report["quality"] = {"feature_counts": feature_counts, "seeds": args.seeds, "results": records}


# --- cost: time and memory against N ----------------------------------------------------


def run_cost(args, report):
    rng = np.random.default_rng(args.seed)
    features = draw_features(args.num_features, args.width, rng, dtype=np.float32)
    runners = {
        "favor": (lambda q, k, v: favor_attention_forward(q, k, v, features), favor_attention_backward),
        "favor_causal": (
            lambda q, k, v: favor_attention_forward(q, k, v, features, causal=True), favor_attention_backward
        ),
        "dense": (lambda q, k, v: attention_forward(q, k, v), attention_backward),
    }
    measured = {name: {"n": [], "time": [], "memory": [], "backward_time": []} for name in runners}
    rows = []
    for length in args.lengths:
        q, k, v = (0.5 * rng.standard_normal((1, 1, length, args.width)).astype(np.float32) for _ in range(3))
        row = {"N": length}
        for name, (forward, backward) in runners.items():
            if name == "dense" and length > args.dense_max_n:
                row[f"{name} time"] = row[f"{name} memory"] = row[f"{name} backward"] = "-"
                continue
            seconds = best_time(lambda: forward(q, k, v), repeat=args.repeat)
            (out, cache), peak = peak_memory(lambda: forward(q, k, v))
            dout = np.ones_like(out)
            backward_seconds = best_time(lambda: backward(dout, cache), repeat=args.repeat)
            del out, cache
            measured[name]["n"].append(length)
            measured[name]["time"].append(seconds)
            measured[name]["memory"].append(peak)
            measured[name]["backward_time"].append(backward_seconds)
            row[f"{name} time"] = f"{seconds * 1e3:.1f} ms"
            row[f"{name} memory"] = format_bytes(peak)
            row[f"{name} backward"] = f"{backward_seconds * 1e3:.1f} ms"
            print(f"cost: N={length} {name} {seconds * 1e3:.1f} ms {format_bytes(peak)} "
                  f"backward {backward_seconds * 1e3:.1f} ms", file=sys.stderr)
        rows.append(row)

    columns = ["N"] + [f"{name} {what}" for name in runners for what in ("time", "memory")]
    print(f"\nForward time (best of {args.repeat}) and peak memory (tracemalloc; the cache the backward "
          f"needs is included), F = {args.num_features}, D = {args.width}, float32, B = H = 1")
    print(format_table(rows, columns))
    print(f"\nBackward time (best of {args.repeat})")
    print(format_table(rows, ["N"] + [f"{name} backward" for name in runners]))

    exponents = {}
    for name, values in measured.items():
        sizes = np.array(values["n"])
        keep = sizes >= args.fit_from
        if np.count_nonzero(keep) >= 2:
            exponents[name] = {
                what: fit_loglog_slope(sizes[keep], np.array(values[what])[keep])
                for what in ("time", "memory", "backward_time")
            }
    print(f"\nScaling exponents over N >= {args.fit_from} (log-log slope):")
    if not exponents:
        print(f"  none: fewer than two measured N at or above {args.fit_from}")
    for name, exponent in exponents.items():
        print(f"  {name:<13} time {exponent['time']:.2f}   memory {exponent['memory']:.2f}   "
              f"backward time {exponent['backward_time']:.2f}")

    dense_sizes = measured["dense"]["n"]
    overtakes = {}
    for name in ("favor", "favor_causal"):
        method_times = [t for n, t in zip(measured[name]["n"], measured[name]["time"]) if n in dense_sizes]
        overtakes[name] = crossover(dense_sizes, method_times, measured["dense"]["time"])
        print(f"  {name} is faster than dense attention from N = {overtakes[name]} on")
    report["cost"] = {
        "num_features": args.num_features, "width": args.width, "dtype": "float32",
        "measured": measured, "exponents": exponents, "overtakes_dense_at": overtakes,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m miniattn bench --suite performer", description=help_description(__doc__, paragraphs=99),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small run (N up to 8192, fewer F and seeds)")
    parser.add_argument("--json", metavar="PATH", help="write the measurements as JSON to PATH")
    parser.add_argument("--qkv", metavar="FILE.npz", help="quality inputs from saved arrays q, k, v (..., N, D)")
    parser.add_argument("--part", choices=("all", "quality", "cost"), default="all", help="which part to run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs and features")
    parser.add_argument("--width", type=positive_int, default=64, help="head width D")
    parser.add_argument("--num-features", type=positive_int, default=256, help="F for the cost part")
    parser.add_argument("--repeat", type=positive_int, default=3, help="timed calls per point; the best is kept")
    parser.add_argument("--dense-max-n", type=positive_int, default=16384,
                        help="largest N for dense attention (its float32 N x N matrix takes 4 N^2 bytes)")
    parser.add_argument("--fit-from", type=positive_int, default=4096, help="smallest N in the exponent fits")
    args = parser.parse_args(argv)
    if args.qkv:
        try:
            load_qkv(args.qkv)
        except (ValueError, TypeError) as error:
            parser.error(str(error))
    if args.quick:
        args.lengths = [512, 1024, 2048, 4096, 8192]
        args.features_list = [16, 64, 256]
        args.seeds, args.quality_n = 3, 256
        args.dense_max_n = min(args.dense_max_n, 8192)
    else:
        args.lengths = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
        args.features_list = [16, 32, 64, 128, 256, 512, 1024]
        args.seeds, args.quality_n = 10, 1024

    report = {"machine": machine_description(), "command": "python -m miniattn.benchmarks.performer "
              + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"machine: {report['machine']}")
    if args.part in ("all", "quality"):
        run_quality(args, report)
    if args.part in ("all", "cost"):
        run_cost(args, report)
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
