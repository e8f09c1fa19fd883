"""``python -m miniattn gradcheck [METHOD ...]``: prove every backward with finite differences.

For each method, the cases come from the method module's ``gradcheck_cases(rng)``
when it defines one (methods with special inputs, such as shared query-key
attention, do), and otherwise from the generic case below: the method object
on small float64 q (1, 2, 5, 4), k and v (1, 2, 7, 4), bidirectional and
causal. A case the method rejects as unsupported (ValueError) is reported as
skipped, not hidden.

The name ``layers`` checks the layer classes and both models of
``miniattn.nn`` (inputs and every parameter); it runs by default after the
methods.
"""

import argparse
import importlib
import sys

import numpy as np

from ..core.gradcheck import gradcheck
from ..methods import METHODS, info, is_implemented, make_method
from . import help_description

TOLERANCE = 1e-6


def generic_cases(name, rng):
    """Return the generic (label, forward, backward, inputs, names) cases of a method."""
    cases = []
    for causal in (False, True):
        method = make_method(name, rng=np.random.default_rng(0))
        q = rng.standard_normal((1, 2, 5, 4))
        k = rng.standard_normal((1, 2, 7, 4))
        v = rng.standard_normal((1, 2, 7, 4))

        def forward(q, k, v, method=method, causal=causal):
            return method.forward(q, k, v, causal=causal)

        label = "causal, N=5, M=7" if causal else "bidirectional, N=5, M=7"
        cases.append((label, forward, method.backward, [q, k, v], ["q", "k", "v"]))
    return cases


def method_cases(name, rng):
    """Return the gradient-check cases of a method: its own, or the generic ones."""
    module = importlib.import_module(info(name).module)
    if hasattr(module, "gradcheck_cases"):
        return module.gradcheck_cases(rng)
    return generic_cases(name, rng)


def run_method(name, rng):
    """Run every case of one method; return a list of (label, result or skip reason)."""
    outcomes = []
    for label, forward, backward, inputs, names in method_cases(name, rng):
        try:
            result = gradcheck(forward, backward, inputs, names=names, rng=rng)
        except ValueError as error:
            outcomes.append((label, f"skipped: {error}"))
            continue
        outcomes.append((label, result))
    return outcomes


def worst_error(outcomes):
    """Return the largest max_rel_error over the checked cases (0.0 when none ran)."""
    errors = [result.max_rel_error for _, result in outcomes if not isinstance(result, str)]
    return max(errors, default=0.0)


LAYERS = "layers"


def print_result(label, result, tol):
    """Print one case's verdict and its per-input table; return True when it passed."""
    passed = result.passed(tol)
    status = "ok" if passed else "FAILED"
    print(f"{label}: max rel error {result.max_rel_error:.1e} ({status}, tolerance {tol:.0e})")
    for line in str(result).splitlines()[1:]:
        print(f"    {line}")
    return passed


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m miniattn gradcheck", description=help_description(__doc__))
    parser.add_argument(
        "methods", nargs="*", help="method names, or 'layers' for miniattn.nn (default: every implemented method, then layers)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs and upstream gradients")
    parser.add_argument("--tol", type=float, default=TOLERANCE, help="maximum relative error that passes (default 1e-6)")
    args = parser.parse_args(argv)

    if not args.tol > 0:
        parser.error(f"--tol={args.tol} is invalid; expected a positive maximum relative error")
    names = args.methods or [method.name for method in METHODS if is_implemented(method.name)] + [LAYERS]
    for name in names:
        if name == LAYERS:
            continue
        try:
            info(name)
        except ValueError as error:  # names the unknown method and lists the known ones
            parser.error(str(error))
        if not is_implemented(name):
            parser.error(f"method {name!r} is registered but not implemented yet")

    failures = 0
    for name in names:
        rng = np.random.default_rng(args.seed)
        if name == LAYERS:
            from ..nn.checks import check_all_layers

            outcomes = check_all_layers(rng)
        else:
            outcomes = run_method(name, rng)
        for label, result in outcomes:
            if isinstance(result, str):
                print(f"{name}: {label}: {result}")
                continue
            failures += not print_result(f"{name}: {label}", result, args.tol)
    if failures:
        print(f"{failures} gradient check(s) failed", file=sys.stderr)
        return 1
    print(f"all gradient checks passed (tolerance {args.tol:.0e})")
    return 0
