"""``python -m miniattn tour``: every implemented method on the same input, compared.

For each method, in the order of its history, the tour
1. draws which keys one query (the last one) sees,
2. measures the output error and the share of exact attention's probability
   mass on the keys the method attended, against exact attention on the same
   q, k, v,
3. times forward and forward+backward and reports tracemalloc peak memory,
4. runs the method's gradient checks on small float64 inputs,
and ends with one table ordered by year.

The input is real: the queries, keys and values of the last layer of a
character language model, trained by miniattn itself on the Python standard
library's source (or --text), on a passage of N characters it has not been
trained on. Learned attention is peaked and local, so the approximation
errors are those a trained model would see, not those of random vectors.
The model is trained once with a bounded budget and saved under
$MINIATTN_CACHE or ~/.cache/miniattn (or --checkpoint); later tours reuse it.
"""

import argparse
import pathlib
import sys
import time

import numpy as np

from .. import gradcheck, plots
from ..benchmarks.harness import best_time, format_bytes, format_table, peak_memory
from ..core.kernels import backend
from ..methods import METHODS, info, is_implemented, make_method
from ..training import build_model, cache_dir, load_checkpoint, load_corpus, model_config, save_checkpoint, train
from ..transformer import attention_forward, attention_probabilities
from .gradcheck import run_method, worst_error
from .train import Progress, report_plots
from . import help_description

STRIP_WIDTH = 64  # characters in the drawing of the keys one query sees
SLICE_LENGTH = 32  # positions of the real input checked by finite differences
SLICE_TOLERANCE = 1e-5

# The tour's language model: windows of TRAIN_CONTEXT characters at random
# offsets train a position table of max(N, MIN_POSITIONS) rows.
TRAIN_CONTEXT = 64
MIN_POSITIONS = 1024
TRAIN_STEPS = 2000
TRAIN_SECONDS = 90.0
WEAK_MODEL_RATIO = 0.9  # a validation loss above this share of the unigram baseline earns a note


def draw_keys(seen_row, width=STRIP_WIDTH):
    """Draw one query's attended keys as a strip: '#' all keys of a cell seen, '+' some, '.' none."""
    cells = np.array_split(seen_row, min(width, len(seen_row)))
    symbols = []
    for cell in cells:
        if cell.all():
            symbols.append("#")
        elif cell.any():
            symbols.append("+")
        else:
            symbols.append(".")
    return "".join(symbols)


def slice_gradcheck(name, q, k, v, causal, seed):
    """Check the method's backward on the last SLICE_LENGTH positions of head 0 of the real input.

    A fresh method object is built, because some draw state sized by the first
    input (routing centroids: sqrt(N) clusters). Its random state stays fixed
    during the check. Returns the max relative error against central finite
    differences of the forward, or NaN when the method rejects an input this short.
    """
    method = make_method(name, rng=np.random.default_rng(seed))
    q_slice, k_slice, v_slice = (np.ascontiguousarray(x[:, :1, -SLICE_LENGTH:]) for x in (q, k, v))  # (1, 1, S, D)

    def forward(q_in, k_in, v_in):
        return method.forward(q_in, k_in, v_in, causal=causal)

    try:
        result = gradcheck(forward, method.backward, [q_slice, k_slice, v_slice], names=["q", "k", "v"],
                           rng=np.random.default_rng(seed))
    except ValueError:
        return float("nan")
    return result.max_rel_error


KMEANS_STEPS = 10  # online k-means steps that fit routing centroids to the passage


def tour_method(name, q, k, v, causal, seed):
    """Build a method for the tour input; fit whatever the method learns from its inputs.

    The Routing Transformer learns its centroids by online k-means while it
    trains, and mixes local-window heads with routing heads. Random centroids
    would route the passage at random, so the tour gives it half its heads as
    local heads and fits the centroids with KMEANS_STEPS online k-means steps
    on the passage itself (decay 0.5, so that the steps converge quickly).
    """
    if name != "routing_transformer":
        return make_method(name, rng=np.random.default_rng(seed))
    method = make_method(name, rng=np.random.default_rng(seed), local_heads=q.shape[1] // 2, decay=0.5)
    for _ in range(KMEANS_STEPS):
        _, cache = method.forward(q, k, v, causal=causal)
        method.update_centroids(cache)
    return method


def run_one(name, q, k, v, causal_preferred, repeat, seed):
    """Run one method on the tour input; return a result row (a dict)."""
    method = tour_method(name, q, k, v, causal_preferred, seed)
    causal = causal_preferred
    try:
        out, cache = method.forward(q, k, v, causal=causal)
    except ValueError:
        causal = not causal_preferred  # e.g. a method defined only bidirectionally
        out, cache = method.forward(q, k, v, causal=causal)
    exact, exact_cache = attention_forward(q, k, v, causal=causal)
    probs = attention_probabilities(exact_cache)  # (1, H, N, M) exact attention probabilities

    seen = method.keys_seen(cache)
    if seen is None:  # every allowed key takes part
        allowed = exact_cache["allowed"]
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
    slice_check = slice_gradcheck(name, q, k, v, causal, seed)
    return {
        "name": name,
        "causal": causal,
        "strip": draw_keys(seen[0, 0, -1]),
        "pattern": np.array(seen[0, 0]),  # (N, M) of head 0, for --plot
        "keys_seen": float(seen[0, 0, -1].mean()),
        "error": error,
        "mass_kept": mass_kept,
        "forward_s": forward_time,
        "forward_backward_s": total_time,
        "peak_bytes": peak,
        "gradcheck": check,
        "slice_gradcheck": slice_check,
    }


def tour_model(args):
    """Load the tour's language model from its checkpoint, or train and save it.

    Returns (model, config, corpus, history); history is None for a loaded model.
    """
    path = pathlib.Path(args.checkpoint) if args.checkpoint else cache_dir() / "tour-lm.npz"
    if path.is_file() and not args.retrain:
        model, config, vocabulary, _, extra = load_checkpoint(path)
        differences = []
        if args.heads is not None and args.heads != config["n_heads"]:
            differences.append(f"heads: checkpoint {config['n_heads']}, requested {args.heads}")
        if args.d is not None and args.d != config["width"] // config["n_heads"]:
            differences.append(f"head width d: checkpoint {config['width'] // config['n_heads']}, requested {args.d}")
        if config["max_length"] < args.n:
            differences.append(f"positions: checkpoint N <= {config['max_length']}, requested --n {args.n}")
        if differences:
            raise ValueError(
                f"checkpoint {str(path)!r} was trained with another configuration ({'; '.join(differences)}); "
                f"drop those options, or pass --retrain to train a new model"
            )
        try:
            corpus = load_corpus(args.text, config["context"], vocabulary=vocabulary)
        except ValueError as error:
            raise ValueError(f"{error} (for the tour: pass --retrain)") from None
        print(
            f"reusing the language model in {path} (validation loss {extra.get('validation_loss', float('nan')):.3f}, "
            f"unigram {extra.get('unigram_loss', float('nan')):.3f}); pass --retrain to train it again"
        )
        return model, config, corpus, None

    heads = 4 if args.heads is None else args.heads
    corpus = load_corpus(args.text, TRAIN_CONTEXT)
    config = model_config(
        len(corpus.vocabulary), context=TRAIN_CONTEXT, max_length=max(args.n, MIN_POSITIONS),
        width=heads * (16 if args.d is None else args.d), n_heads=heads, attention="transformer",
    )
    model = build_model(config, seed=args.seed)
    print(
        f"training the tour's language model ({model.parameter_count():,} parameters, dense attention) on "
        f"{corpus.description} for {args.train_steps} steps or {args.train_time:.0f} s, whichever comes first"
    )
    history, optimizer = train(
        model, corpus, TRAIN_CONTEXT, steps=args.train_steps, time_budget=args.train_time, seed=args.seed,
        callback=Progress("tour model", args.train_steps, args.train_time), eval_every=max(1, args.train_steps // 6),
    )
    last = history[-1]
    save_checkpoint(path, model, config, corpus.vocabulary, optimizer,
                    extra={"validation_loss": last["validation_loss"], "unigram_loss": corpus.unigram_loss})
    print(f"saved the tour's language model to {path}")
    if last["validation_loss"] > WEAK_MODEL_RATIO * corpus.unigram_loss:
        print(
            f"note: after {last['step']} steps the validation loss {last['validation_loss']:.3f} is close to the unigram "
            f"baseline {corpus.unigram_loss:.3f}, so attention is still nearly untrained; on a busy machine try "
            f"OPENBLAS_NUM_THREADS=1, or a longer --train-time with --retrain"
        )
    return model, config, corpus, history


def passage_ids(corpus, n):
    """Return n character ids of held-out text: the validation part, or the end of the text when that is short."""
    if len(corpus.validation_ids) >= n:
        return corpus.validation_ids[:n]
    every_id = np.concatenate([corpus.train_ids, corpus.validation_ids])
    if len(every_id) < n:
        raise ValueError(
            f"{corpus.description} has {len(every_id)} characters, fewer than --n {n}; pass a longer --text or a smaller --n"
        )
    return every_id[-n:]


def real_inputs(args):
    """Return q, k, v (1, H, N, D) float64 of the model's last layer on a held-out passage.

    Also returns the passage, the layer index and the training history (None
    when the model was loaded).
    """
    model, config, corpus, history = tour_model(args)
    ids = passage_ids(corpus, args.n)  # (N,)
    layer = config["n_layers"] - 1
    q, k, v = (array.astype(np.float64) for array in model.attention_inputs(ids[None], layer))  # (1, H, N, D)
    return q, k, v, corpus.vocabulary.decode(ids), layer, history


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m miniattn tour", description=help_description(__doc__))
    parser.add_argument("--n", type=int, default=1024, help="sequence length N of the tour input (default 1024)")
    parser.add_argument("--methods", default="", help="comma-separated method names (default: all implemented)")
    parser.add_argument("--repeat", type=int, default=3, help="timing repeats, minimum reported (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, its batches and the methods' random state")
    parser.add_argument("--text", metavar="PATH", help="UTF-8 text to train on and take the passage from "
                        "(default: standard-library sources)")
    parser.add_argument("--checkpoint", metavar="PATH", help="the language model to reuse or to save "
                        "(default: $MINIATTN_CACHE or ~/.cache/miniattn, tour-lm.npz)")
    parser.add_argument("--retrain", action="store_true", help="train the language model again even if a checkpoint exists")
    parser.add_argument("--train-steps", type=int, default=TRAIN_STEPS, help=f"training steps (default {TRAIN_STEPS})")
    parser.add_argument("--train-time", type=float, default=TRAIN_SECONDS,
                        help=f"training time budget in seconds (default {TRAIN_SECONDS:.0f})")
    parser.add_argument("--heads", type=int, help="heads H of a newly trained model (default 4)")
    parser.add_argument("--d", type=int, help="head width D of a newly trained model (default 16)")
    parser.add_argument("--plot", metavar="DIR", help="write each method's pattern and its error against time as PNG files")
    parser.add_argument(
        "--save-inputs", metavar="PATH",
        help="also save the tour's q, k, v (1, H, N, D) to a .npz file, e.g. for bench --suite performer --qkv PATH",
    )
    args = parser.parse_args(argv)
    if args.n < 8:
        parser.error(f"--n={args.n} is too small; expected N >= 8")
    if args.train_steps <= 0:
        parser.error(f"--train-steps={args.train_steps} is invalid; expected a positive number of steps")
    if not args.train_time > 0:
        parser.error(f"--train-time={args.train_time} is invalid; expected a positive number of seconds")
    for flag, value in (("--heads", args.heads), ("--d", args.d), ("--repeat", args.repeat)):
        if value is not None and value <= 0:
            parser.error(f"{flag}={value} is invalid; expected a positive integer")

    names = [item for item in args.methods.split(",") if item] or [m.name for m in METHODS if is_implemented(m.name)]
    for name in names:
        try:
            info(name)
        except ValueError as error:
            parser.error(str(error))
        if not is_implemented(name):
            parser.error(f"method {name!r} is registered but not implemented yet")

    started = time.perf_counter()
    try:
        q, k, v, passage, layer, history = real_inputs(args)
        if args.save_inputs:
            np.savez(args.save_inputs, q=q, k=k, v=v)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\ntour input: q, k, v of layer {layer} on a held-out passage, shape {q.shape} (float64), kernels: {backend()}")
    print(f"passage begins: {passage[:72]!r}")
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
            f"gradcheck max rel error {row['gradcheck']:.1e} (the method's own small cases), "
            f"{row['slice_gradcheck']:.1e} (last {SLICE_LENGTH} positions of the passage)\n"
        )
        rows.append(row)

    table = [
        {
            "year": info(row["name"]).year,
            "method": row["name"],
            "mode": "causal" if row["causal"] else "bidir",
            "last query sees": f"{row['keys_seen']:.0%}",
            "output error": f"{row['error']:.1e}",
            "mass kept": f"{row['mass_kept']:.3f}",
            "forward": f"{row['forward_s'] * 1e3:.1f} ms",
            "fwd+bwd": f"{row['forward_backward_s'] * 1e3:.1f} ms",
            "peak memory": format_bytes(row["peak_bytes"]),
            "gradcheck": f"{row['gradcheck']:.1e}",
            "on passage": f"{row['slice_gradcheck']:.1e}",
        }
        for row in sorted(rows, key=lambda row: info(row["name"]).year)
    ]
    print(
        "mode: causal, or bidir for a method that runs only bidirectionally.\n"
        "last query sees: the share of keys the last query attends (1 query of N); mass kept averages all.\n"
        "output error: |out - exact| / |exact| against exact attention on the same q, k, v (Frobenius norms).\n"
        "  Reformer shares queries and keys (it ignores k), so its error is against a different function;\n"
        "  Transformer-XL adds relative position terms, and Performer approximates the softmax weights.\n"
        "mass kept: the share of exact attention's probability mass on the keys the method lets each query\n"
        "  see, averaged over heads and queries (1.000 for methods that see every key).\n"
        "forward, fwd+bwd: best of the timed calls; peak memory: tracemalloc peak of one forward+backward.\n"
        "gradcheck: the largest relative error of the method's own small float64 cases; on passage: the same\n"
        f"  check on the last {SLICE_LENGTH} positions of the passage.\n"
    )
    trained = "training included" if history is not None else "with the saved model"
    print(f"tour finished in {time.perf_counter() - started:.0f} s, {trained}; the methods by year:\n")
    print(format_table(table, list(table[0])))
    for row in rows:
        if np.isnan(row["slice_gradcheck"]):
            print(f"note: {row['name']} rejects an input of {SLICE_LENGTH} positions, so its check on the passage was skipped.")
        elif row["slice_gradcheck"] > SLICE_TOLERANCE:
            print(
                f"note: {row['name']}'s gradient check on the passage gives {row['slice_gradcheck']:.1e}. Its backward "
                f"makes a documented approximation or holds a data-dependent choice fixed that finite differences "
                f"move; its own gradient-check cases fix those choices (see {info(row['name']).file})."
            )
    if args.plot:
        patterns = plots.keys_seen_patterns({row["name"]: row["pattern"] for row in rows}, args.plot)
        if patterns is not None:
            patterns += plots.tour_summary(rows, args.plot)
            if history is not None:
                patterns += plots.loss_curves({"tour model": history}, args.plot)
        report_plots(patterns)
    return 0
