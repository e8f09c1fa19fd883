"""``python -m miniattn list``: the history table of attention methods."""

import argparse

from ..methods import METHODS, is_implemented
from . import help_description


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m miniattn list", description=help_description(__doc__, paragraphs=99))
    parser.parse_args(argv)
    header = f"{'year':<5} {'method':<20} {'file':<32} {'time':<24} {'memory':<24} {'status':<12} idea"
    print(header)
    print("-" * len(header))
    for method in METHODS:
        status = "implemented" if is_implemented(method.name) else "planned"
        print(
            f"{method.year:<5} {method.name:<20} {method.file:<32} {method.time:<24} "
            f"{method.memory:<24} {status:<12} {method.idea}"
        )
    return 0
