"""``python -m miniattn sample``: generate text from a checkpoint written by ``train``."""

import argparse
import sys

import numpy as np

from ..training import generate_text, load_checkpoint
from . import help_description


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m miniattn sample", description=help_description(__doc__))
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="a .npz file written by python -m miniattn train")
    parser.add_argument("--prompt", default="def ", help="text to continue (default 'def ')")
    parser.add_argument("--length", type=int, default=300, help="characters to generate (default 300)")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature, > 0 (default 0.8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    args = parser.parse_args(argv)
    if args.length <= 0:
        parser.error(f"--length={args.length} is invalid; expected a positive number of characters")
    if not args.temperature > 0:
        parser.error(f"--temperature={args.temperature} is invalid; expected a positive number")
    if not args.prompt:
        parser.error("--prompt is empty; give at least one character to continue")
    try:
        model, config, vocabulary, _, _ = load_checkpoint(args.checkpoint)
        vocabulary.encode(args.prompt)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = generate_text(
        model, vocabulary, args.prompt, args.length, config["context"],
        rng=np.random.default_rng(args.seed), temperature=args.temperature,
    )
    print(f"# {config['attention']} model, vocabulary of {len(vocabulary)} characters, temperature {args.temperature}")
    print(text)
    return 0
