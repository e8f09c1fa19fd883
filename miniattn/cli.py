"""The command line: ``python -m miniattn COMMAND``.

Each command lives in its own module with a ``main(argv)`` function; this
file only dispatches. ``python -m miniattn`` alone prints the command list.
"""

import importlib
import os
import sys

# command -> (module with main(argv), one-line help)
COMMANDS = {
    "list": ("miniattn.commands.list_methods", "list the attention methods: year, idea, file, cost"),
    "gradcheck": ("miniattn.commands.gradcheck", "check every backward against finite differences"),
    "bench": ("miniattn.commands.bench", "time and peak memory of the methods against N"),
    "tour": ("miniattn.commands.tour", "run every method on the same input and compare"),
    "train": ("miniattn.commands.train", "train the character language model with any attention method"),
    "sample": ("miniattn.commands.sample", "generate text from a trained language model checkpoint"),
    "ring": ("miniattn.commands.ring", "run Ring Attention on worker processes and draw the timeline"),
}


def usage():
    lines = ["usage: python -m miniattn COMMAND [options]", "", "commands:"]
    for name, (_, help_text) in COMMANDS.items():
        lines.append(f"  {name:<10} {help_text}")
    lines.append("")
    lines.append("Run python -m miniattn COMMAND --help for the options of one command.")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return module.main(rest) or 0
    except BrokenPipeError:  # output piped into a program that stopped reading (head, less)
        sys.stdout = open(os.devnull, "w")
        return 0
