"""``python -m miniattn train``: train the character language model with any attention method.

The model is a decoder-only Transformer (``miniattn.nn.DecoderLM``) trained
with Adam by miniattn's own backward passes, by default on the Python
standard library's source files. Progress shows the training loss, tokens per
second and the tracemalloc peak memory. Every --eval-every steps the command
prints the validation loss beside the unigram baseline, the cross-entropy of
character frequencies alone. The model is saved as a .npz checkpoint that
``python -m miniattn sample`` reads.

With --compare A,B,... several methods are trained on the same budget and
text, and a table lists validation loss against time and memory.
"""

import argparse
import sys

import numpy as np

from .. import plots
from ..benchmarks.harness import format_bytes, format_table, machine_description, write_json
from ..methods import is_implemented, method_names
from ..training import (
    MODEL_DEFAULTS,
    TRAIN_DEFAULTS,
    build_model,
    cache_dir,
    check_method_name,
    context_options,
    load_checkpoint,
    load_corpus,
    model_config,
    parse_option,
    save_checkpoint,
    train,
)
from . import help_description

DEFAULT_STEPS = 800
BAR_WIDTH = 24


class Progress:
    """Print a progress bar that redraws in place on a terminal, one line per validation otherwise."""

    def __init__(self, label, steps, time_budget, stream=None):
        self.label = label
        self.steps = steps
        self.time_budget = time_budget
        self.stream = sys.stderr if stream is None else stream
        self.interactive = self.stream.isatty()

    def fraction(self, event):
        fractions = []
        if self.steps is not None:
            fractions.append(event["step"] / self.steps)
        if self.time_budget is not None:
            fractions.append(event["time_s"] / self.time_budget)
        return min(1.0, max(fractions))

    def __call__(self, event):
        if event["kind"] == "step":
            if self.interactive:
                filled = int(round(self.fraction(event) * BAR_WIDTH))
                bar = "#" * filled + "." * (BAR_WIDTH - filled)
                self.stream.write(
                    f"\r{self.label} [{bar}] step {event['step']} loss {event['loss']:.3f} "
                    f"{event['tokens_per_s']:,.0f} tok/s peak {format_bytes(event['peak_bytes'])} "
                )
                self.stream.flush()
            return
        if self.interactive:
            self.stream.write("\n")
        self.stream.write(
            f"{self.label} step {event['step']}: loss {event['loss']:.3f}, validation {event['validation_loss']:.3f} "
            f"(unigram {event['unigram_loss']:.3f}, {versus_unigram(event['validation_loss'], event['unigram_loss'])}), "
            f"{event['time_s']:.0f} s, "
            f"{event['tokens_per_s']:,.0f} tok/s, peak {format_bytes(event['peak_bytes'])}\n"
        )
        self.stream.flush()


def versus_unigram(loss, unigram_loss):
    """Return '12% below' or '3% above': the loss relative to the unigram baseline."""
    change = 1.0 - loss / unigram_loss
    return f"{change:.0%} below" if change >= 0 else f"{-change:.0%} above"


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m miniattn train", description=help_description(__doc__))
    parser.add_argument("--attention", help=f"attention method (default {MODEL_DEFAULTS['attention']}); "
                        f"python -m miniattn list shows them")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option, repeatable, e.g. --option window=16 (ints, floats, true/false, "
                             "none, comma lists, strings)")

    parser.add_argument("--compare", metavar="A,B,...", help="train each listed method on the same budget "
                        "and print a table; 'all' means every implemented method")
    parser.add_argument("--text", metavar="PATH", help="a UTF-8 text file (default: standard-library sources)")
    parser.add_argument("--context", type=int, help=f"characters per training sequence N (default {MODEL_DEFAULTS['context']})")
    parser.add_argument("--max-length", type=int, help="rows of the learned position table (default: the context); "
                        "longer tables are trained at random offsets")

    parser.add_argument("--width", type=int, help=f"model width C (default {MODEL_DEFAULTS['width']})")
    parser.add_argument("--heads", type=int, help=f"attention heads H (default {MODEL_DEFAULTS['n_heads']})")
    parser.add_argument("--layers", type=int, help=f"decoder blocks L (default {MODEL_DEFAULTS['n_layers']})")
    parser.add_argument("--dtype", choices=["float32", "float64"], help="parameter dtype (default float32)")

    parser.add_argument("--steps", type=int, help=f"training steps (default {DEFAULT_STEPS} unless --time-budget is given)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS", help="stop after this many seconds of training")
    parser.add_argument("--batch-size", type=int, default=TRAIN_DEFAULTS["batch_size"],
                        help=f"sequences per step B (default {TRAIN_DEFAULTS['batch_size']})")
    parser.add_argument("--lr", type=float, default=TRAIN_DEFAULTS["lr"], help=f"Adam learning rate (default {TRAIN_DEFAULTS['lr']})")
    parser.add_argument("--eval-every", type=int, default=TRAIN_DEFAULTS["eval_every"],
                        help=f"steps between validations (default {TRAIN_DEFAULTS['eval_every']})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial parameters and the batches (default 0)")

    parser.add_argument("--save", metavar="PATH", help="checkpoint file to write (default: "
                        "$MINIATTN_CACHE or ~/.cache/miniattn, train-METHOD.npz)")
    parser.add_argument("--no-save", action="store_true", help="do not write a checkpoint")
    parser.add_argument("--resume", metavar="PATH", help="continue training a checkpoint; its configuration is "
                        "used, and model options given here must match it")
    parser.add_argument("--json", metavar="PATH", help="also write the history (or comparison) as JSON")
    parser.add_argument("--plot", metavar="DIR", help="write loss curves as PNG files to DIR (needs matplotlib)")
    return parser


def requested_settings(args):
    """Return the model settings given on the command line (None for those left out)."""
    settings = {
        "context": args.context, "max_length": args.max_length, "width": args.width, "n_heads": args.heads,
        "n_layers": args.layers, "attention": args.attention, "dtype": args.dtype,
    }
    settings = {key: value for key, value in settings.items() if value is not None}
    if args.option:
        settings["attention_options"] = dict(parse_option(text) for text in args.option)
    return settings


def check_budget(parser, args):
    """Reject non-positive budgets and sizes; return (steps, time_budget)."""
    if args.steps is not None and args.steps <= 0:
        parser.error(f"--steps={args.steps} is invalid; expected a positive number of steps, e.g. --steps 200")
    if args.time_budget is not None and not args.time_budget > 0:
        parser.error(f"--time-budget={args.time_budget} is invalid; expected a positive number of seconds, "
                     f"e.g. --time-budget 60")
    for flag, value in (("--context", args.context), ("--width", args.width), ("--heads", args.heads),
                        ("--layers", args.layers), ("--batch-size", args.batch_size), ("--eval-every", args.eval_every),
                        ("--max-length", args.max_length)):
        if value is not None and value <= 0:
            parser.error(f"{flag}={value} is invalid; expected a positive integer")
    if not args.lr > 0:
        parser.error(f"--lr={args.lr} is invalid; expected a positive learning rate")
    steps = args.steps if args.steps is not None or args.time_budget is not None else DEFAULT_STEPS
    return steps, args.time_budget


def final_eval(history):
    return [event for event in history if event["kind"] == "eval"][-1]


def train_one(args, settings, steps, time_budget, corpus=None, label=None):
    """Build (or resume) one model, train it and return (history, model, config, corpus)."""
    optimizer = None
    if args.resume:
        model, config, vocabulary, optimizer, _ = load_checkpoint(args.resume, requested=settings)
        corpus = load_corpus(args.text, config["context"], vocabulary=vocabulary)
    else:
        context = settings.get("context", MODEL_DEFAULTS["context"])
        name = settings.get("attention", MODEL_DEFAULTS["attention"])
        check_method_name(name)
        heads = settings.get("n_heads", MODEL_DEFAULTS["n_heads"])
        options = context_options(name, context, settings.get("attention_options", {}), heads)
        settings = dict(settings, attention_options=options)
        corpus = load_corpus(args.text, context) if corpus is None else corpus
        config = model_config(len(corpus.vocabulary), **settings)
        model = build_model(config, seed=args.seed)
    if optimizer is not None:
        optimizer.lr = args.lr
    label = label or config["attention"]
    print(
        f"{label}: {model.parameter_count():,} parameters, context {config['context']}, width {config['width']}, "
        f"{config['n_heads']} heads, {config['n_layers']} layers, {config['dtype']}, options {config['attention_options']}"
    )
    progress = Progress(label, steps, time_budget)
    history, optimizer = train(
        model, corpus, config["context"], steps=steps, time_budget=time_budget, optimizer=optimizer, seed=args.seed,
        callback=progress, batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every,
    )
    return history, model, config, corpus, optimizer


def run_single(args, settings, steps, time_budget):
    history, model, config, corpus, optimizer = train_one(args, settings, steps, time_budget)
    last = final_eval(history)
    print(
        f"validation loss {last['validation_loss']:.3f} nats/char after {last['step']} steps and {last['time_s']:.0f} s; "
        f"unigram baseline {corpus.unigram_loss:.3f} ({versus_unigram(last['validation_loss'], corpus.unigram_loss)})"
    )
    if not args.no_save:
        path = args.save or cache_dir() / f"train-{config['attention']}.npz"
        save_checkpoint(path, model, config, corpus.vocabulary, optimizer,
                        extra={"validation_loss": last["validation_loss"], "unigram_loss": corpus.unigram_loss})
        print(f"checkpoint saved to {path}; generate text with: python -m miniattn sample --checkpoint {path}")
    write_json(args.json, {"config": config, "history": history, "machine": machine_description()})
    if args.plot:
        report_plots(plots.loss_curves({config["attention"]: history}, args.plot, corpus.unigram_loss))
    return 0


def run_compare(parser, args, settings, steps, time_budget):
    names = method_names() if args.compare == "all" else [item.strip() for item in args.compare.split(",") if item.strip()]
    if args.compare == "all":
        names = [name for name in names if is_implemented(name)]
    if not names:
        parser.error("--compare needs at least one method name, e.g. --compare transformer,longformer")
    for name in names:
        check_method_name(name)
    if args.resume or args.attention:
        parser.error("--compare trains fresh models; drop --resume and --attention")
    if args.option:
        parser.error("--compare uses each method's default options for the context; drop --option")

    context = settings.get("context", MODEL_DEFAULTS["context"])
    corpus = load_corpus(args.text, context)
    results, histories = [], {}
    for name in names:
        try:
            history, model, config, _, _ = train_one(args, dict(settings, attention=name), steps, time_budget, corpus, name)
        except ValueError as error:
            print(f"{name}: skipped: {error}")
            results.append({"method": name, "error": str(error)})
            continue
        last = final_eval(history)
        histories[name] = history
        results.append({
            "method": name, "options": config["attention_options"], "steps": last["step"], "time_s": last["time_s"],
            "tokens_per_s": last["tokens_per_s"], "peak_bytes": last["peak_bytes"],
            "validation_loss": last["validation_loss"], "unigram_loss": corpus.unigram_loss,
        })

    print()
    print(f"{corpus.description}, unigram baseline {corpus.unigram_loss:.3f} nats/char")
    table = []
    for row in results:
        if "error" in row:
            table.append({"method": row["method"], "validation loss": "skipped (cannot run causally)"})
            continue
        table.append({
            "method": row["method"],
            "steps": row["steps"],
            "time": f"{row['time_s']:.0f} s",
            "tok/s": f"{row['tokens_per_s']:,.0f}",
            "peak memory": format_bytes(row["peak_bytes"]),
            "validation loss": f"{row['validation_loss']:.3f}",
            "vs unigram": versus_unigram(row["validation_loss"], row["unigram_loss"]),
        })
    print(format_table(table, ["method", "steps", "time", "tok/s", "peak memory", "validation loss", "vs unigram"]))

    write_json(args.json, {"results": results, "histories": histories, "machine": machine_description()})
    if args.plot:
        report_plots(plots.loss_curves(histories, args.plot, corpus.unigram_loss))
    return 0


def report_plots(paths):
    """Print the written figure paths, or how to enable plotting when matplotlib is missing."""
    if paths is None:
        print(plots.MISSING_MESSAGE)
        return
    for path in paths:
        print(f"figure written to {path}")


def main(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    steps, time_budget = check_budget(parser, args)
    try:
        settings = requested_settings(args)
        if args.compare:
            return run_compare(parser, args, settings, steps, time_budget)
        return run_single(args, settings, steps, time_budget)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
