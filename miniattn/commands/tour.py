"""``python -m miniattn tour``: every implemented method on the same input, compared.

For each method, in the order of its history, the tour
1. draws which keys one query (the last one) sees,
2. measures the output error and the share of exact attention's probability
   mass on the keys the method attended, against exact attention on the same
   q, k, v,
3. times forward and forward+backward and reports tracemalloc peak memory,
4. runs the method's gradient checks on small float64 inputs,
and ends with one table ordered by year.

The input is the queries, keys and values of a small random attention layer
applied to token embeddings plus sinusoidal positions, so that attention has
both content and positional structure.
"""

import argparse

import numpy as np

from ..benchmarks.harness import best_time, format_bytes, format_table, peak_memory
from ..core.kernels import backend
from ..methods import METHODS, info, is_implemented, make_method
from ..transformer import attention_forward, sinusoidal_positions, split_heads
from .gradcheck import run_method, worst_error

STRIP_WIDTH = 64  # characters in the drawing of the keys one query sees


def synthetic_inputs(n, width, heads, rng, dtype=np.float64):
    """Return q, k, v (1, H, N, D) of a random attention layer over tokens and positions."""
    model_width = width * heads
    vocabulary = 32
    tokens = rng.integers(0, vocabulary, size=n)
    embeddings = rng.standard_normal((vocabulary, model_width))
    x = embeddings[tokens] + 2.0 * sinusoidal_positions(n, model_width)  # (N, C)
    projections = [rng.standard_normal((model_width, model_width)) / np.sqrt(model_width) for _ in range(3)]
    q, k, v = (split_heads((x @ w)[None], heads).astype(dtype) for w in projections)  # (1, H, N, D)
    return 2.0 * q, k, v  # a sharper softmax, as in trained layers


def draw_keys(seen_row, width=STRIP_WIDTH):
    """Draw one query's attended keys as a strip: '#' all keys of a cell seen, '+' some, '.' none."""
    cells = np.array_split(seen_row, min(width, len(seen_row)))
    return "".join("#" if cell.all() else "+" if cell.any() else "." for cell in cells)


def run_one(name, q, k, v, causal_preferred, repeat, seed):
    """Run one method on the tour input; return a result row (a dict)."""
    method = make_method(name, rng=np.random.default_rng(seed))
    causal = causal_preferred
    try:
        out, cache = method.forward(q, k, v, causal=causal)
    except ValueError:
        causal = not causal_preferred  # e.g. a method defined only bidirectionally
        out, cache = method.forward(q, k, v, causal=causal)
    exact, exact_cache = attention_forward(q, k, v, causal=causal)
    probs = exact_cache[3]  # (1, H, N, M) exact attention probabilities

    seen = method.keys_seen(cache)
    if seen is None:  # every allowed key takes part
        allowed = exact_cache[7]
        seen = np.ones(probs.shape, dtype=bool) if allowed is None else allowed
    seen = np.broadcast_to(seen, probs.shape)
    mass_kept = float(np.mean(np.sum(np.where(seen, probs, 0.0), axis=-1)))
    error = float(np.linalg.norm(out - exact) / np.linalg.norm(exact))

    dout = np.ones_like(out)

    def forward_backward():
        result, result_cache = method.forward(q, k, v, causal=causal)
        return method.backward(dout, result_cache)

    forward_time = best_time(lambda: method.forward(q, k, v, causal=causal), repeat=repeat)
    total_time = best_time(forward_backward, repeat=repeat)
    _, peak = peak_memory(forward_backward)
    check = worst_error(run_method(name, np.random.default_rng(seed)))
    return {
        "name": name,
        "causal": causal,
        "strip": draw_keys(seen[0, 0, -1]),
        "keys_seen": float(seen[0, 0, -1].mean()),
        "error": error,
        "mass_kept": mass_kept,
        "forward_s": forward_time,
        "forward_backward_s": total_time,
        "peak_bytes": peak,
        "gradcheck": check,
    }


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m miniattn tour", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1024, help="sequence length N of the tour input (default 1024)")
    parser.add_argument("--d", type=int, default=32, help="head width D (default 32)")
    parser.add_argument("--heads", type=int, default=2, help="number of heads H (default 2)")
    parser.add_argument("--methods", default="", help="comma-separated method names (default: all implemented)")
    parser.add_argument("--repeat", type=int, default=3, help="timing repeats, minimum reported (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the input and the methods' random state")
    args = parser.parse_args(argv)
    if args.n < 8:
        parser.error(f"--n={args.n} is too small; expected N >= 8")

    names = [item for item in args.methods.split(",") if item] or [m.name for m in METHODS if is_implemented(m.name)]
    for name in names:
        info(name)
        if not is_implemented(name):
            parser.error(f"method {name!r} is registered but not implemented yet")

    rng = np.random.default_rng(args.seed)
    q, k, v = synthetic_inputs(args.n, args.d, args.heads, rng)
    print(f"tour input: q, k, v of shape {q.shape} (float64), kernels: {backend()}")
    print(f"each strip shows which of the {args.n} keys the last query sees ('#' all, '+' some, '.' none)\n")

    rows = []
    for name in names:
        row = run_one(name, q, k, v, True, args.repeat, args.seed)
        method = info(name)
        mode = "causal" if row["causal"] else "bidirectional"
        print(f"{method.year} {name} ({mode}): {method.idea}")
        print(f"  keys seen  |{row['strip']}|")
        print(
            f"  output error {row['error']:.1e}, attention mass kept {row['mass_kept']:.3f}, "
            f"forward+backward {row['forward_backward_s'] * 1e3:.1f} ms, peak {format_bytes(row['peak_bytes'])}, "
            f"gradcheck max rel error {row['gradcheck']:.1e}\n"
        )
        rows.append(row)

    table = [
        {
            "year": info(row["name"]).year,
            "method": row["name"],
            "mode": "causal" if row["causal"] else "bidir",
            "keys seen": f"{row['keys_seen']:.0%}",
            "output error": f"{row['error']:.1e}",
            "mass kept": f"{row['mass_kept']:.3f}",
            "forward": f"{row['forward_s'] * 1e3:.1f} ms",
            "fwd+bwd": f"{row['forward_backward_s'] * 1e3:.1f} ms",
            "peak memory": format_bytes(row["peak_bytes"]),
            "gradcheck": f"{row['gradcheck']:.1e}",
        }
        for row in sorted(rows, key=lambda row: info(row["name"]).year)
    ]
    print(format_table(table, list(table[0])))
    return 0
