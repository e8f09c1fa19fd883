"""Finite-difference gradient checks for forward/backward pairs.

Point ``gradcheck`` at any pair that follows miniattn's convention:

    out, cache = forward(*inputs)
    grads = backward(dout, cache)       # one gradient per input, in order

It draws a random upstream gradient g shaped like ``out`` and checks the
hand-written gradients of the scalar L(x) = sum(g * forward(x)) against
central differences in float64:

    dL/du ~ (L(x + h u) - L(x - h u)) / (2 h)

For an input with at most ``max_elementwise`` entries, u runs over every unit
vector (one entry at a time, h = eps * max(1, |x_i|)). The default eps = 1e-5
is near the step that balances the central difference's truncation error,
O(h^2), against round-off, O(1e-16 |L| / h). For a larger input,
u is each of ``n_directions`` random Gaussian directions scaled to unit
length, and the analytic value is the inner product <grad, u>. Unit length
keeps the step h u as short as one entry's step: with entries of size 1, the
step would grow as sqrt(size), and so would the central difference's
truncation error, which reached 8e-6 on a correct tanh layer of 10,000 entries.

The error reported per input is the maximum over entries (or directions) of

    |analytic - numeric| / max(|analytic|, |numeric|, floor)

with floor = 1e-3 * (the largest analytic gradient entry over all inputs,
at least 1e-10). Entries much smaller than the largest gradient, including
gradients that are exactly zero, are therefore compared with an absolute
tolerance: round-off in L(x +- h u) is about 1e-16 |L| / h ~ 1e-11 |L|, and
dividing that noise by a tiny gradient would report a failure that is not
there. A gradient that is wrong by a factor still shows an error of that
factor unless it is over 1000 times smaller than the largest one.

Discrete choices made inside a forward (hash buckets, top-k selections,
random features) must be held fixed by the caller, for example by computing
them once and closing over them, because a finite-difference step that flips
one makes L jump.
"""

from dataclasses import dataclass, field

import numpy as np


@dataclass
class InputCheck:
    """Result for one input: its name, shape, mode and maximum relative error."""

    name: str
    shape: tuple
    mode: str  # "elementwise" or "directional (n)"
    max_rel_error: float


@dataclass
class GradcheckResult:
    """Per-input results of a gradient check; ``max_rel_error`` is the worst input."""

    inputs: list = field(default_factory=list)

    @property
    def max_rel_error(self):
        return max((check.max_rel_error for check in self.inputs), default=0.0)

    def passed(self, tol=1e-6):
        """Return True when every input's error is at most tol."""
        return self.max_rel_error <= tol

    def assert_ok(self, tol=1e-6):
        """Raise AssertionError listing the inputs whose error exceeds tol."""
        failing = [check for check in self.inputs if not check.max_rel_error <= tol]
        if failing:
            raise AssertionError(f"gradient check failed (tolerance {tol:.1e}):\n{self}")

    def __str__(self):
        name_width = max([12] + [len(check.name) + 1 for check in self.inputs])
        lines = [f"{'input':<{name_width}} {'shape':<20} {'mode':<18} max rel error"]
        for check in self.inputs:
            lines.append(
                f"{check.name:<{name_width}} {str(check.shape):<20} {check.mode:<18} {check.max_rel_error:.2e}"
            )
        return "\n".join(lines)


def _as_tuple(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _weighted_sum(outputs, upstream):
    """Return L = sum over outputs of sum(g * out), ignoring non-finite masked entries."""
    return sum(float(np.sum(g * out)) for g, out in zip(upstream, outputs))


def gradcheck(
    forward,
    backward,
    inputs,
    *,
    names=None,
    rng=None,
    eps=1e-5,
    max_elementwise=256,
    n_directions=6,
):
    """Compare backward(dout, cache) with central finite differences of forward.

    Inputs:
    - forward: callable(*inputs) -> (out, cache); out is an array or a tuple of arrays
    - backward: callable(dout, cache) -> one gradient per input (a tuple, or a
      single array when there is one input); dout matches out
    - inputs: sequence of float64 arrays, the differentiable inputs
    - names: optional names for the inputs, used in the report
    - rng: numpy.random.Generator for the upstream gradient and directions
    - eps: relative finite-difference step
    - max_elementwise: inputs with at most this many entries are checked entry by entry
    - n_directions: random directions for larger inputs

    Returns a GradcheckResult; call ``.assert_ok(tol)`` or read ``.max_rel_error``.
    """
    inputs = [np.array(x, copy=True) for x in inputs]
    for position, x in enumerate(inputs):
        if x.dtype != np.float64:
            raise TypeError(
                f"gradcheck input {position} has dtype {x.dtype}; finite differences need "
                f"float64 inputs (convert with .astype(np.float64))"
            )
    if names is None:
        names = [f"input{position}" for position in range(len(inputs))]
    if len(names) != len(inputs):
        raise ValueError(f"got {len(names)} names for {len(inputs)} inputs")
    rng = np.random.default_rng(0) if rng is None else rng

    outputs, cache = forward(*inputs)
    outputs = _as_tuple(outputs)
    upstream = tuple(rng.standard_normal(np.shape(out)) for out in outputs)
    dout = upstream if len(upstream) > 1 else upstream[0]
    grads = _as_tuple(backward(dout, cache))
    if len(grads) != len(inputs):
        raise ValueError(f"backward returned {len(grads)} gradients for {len(inputs)} inputs")

    def loss_at(position, x_new):
        args = list(inputs)
        args[position] = x_new
        new_outputs, _ = forward(*args)
        return _weighted_sum(_as_tuple(new_outputs), upstream)

    grads = [np.asarray(grad, dtype=np.float64) for grad in grads]
    for position, (x, grad) in enumerate(zip(inputs, grads)):
        if grad.shape != x.shape:
            raise ValueError(
                f"gradient for {names[position]} has shape {grad.shape}; expected {x.shape}"
            )
    largest = max((float(np.max(np.abs(grad), initial=0.0)) for grad in grads), default=0.0)
    floor = max(1e-3 * largest, 1e-10)

    result = GradcheckResult()
    for position, (x, grad) in enumerate(zip(inputs, grads)):
        errors = []
        if x.size <= max_elementwise:
            mode = "elementwise"
            for flat_index in range(x.size):
                step = eps * max(1.0, abs(float(x.flat[flat_index])))
                plus, minus = x.copy(), x.copy()
                plus.flat[flat_index] += step
                minus.flat[flat_index] -= step
                numeric = (loss_at(position, plus) - loss_at(position, minus)) / (2 * step)
                analytic = float(grad.flat[flat_index])
                errors.append(abs(analytic - numeric) / max(abs(analytic), abs(numeric), floor))
        else:
            mode = f"directional ({n_directions})"
            step = eps * max(1.0, float(np.max(np.abs(x))))
            for _ in range(n_directions):
                direction = rng.standard_normal(x.shape)
                direction /= np.linalg.norm(direction)  # unit length: see the module docstring
                numeric = (
                    loss_at(position, x + step * direction) - loss_at(position, x - step * direction)
                ) / (2 * step)
                analytic = float(np.sum(grad * direction))
                errors.append(abs(analytic - numeric) / max(abs(analytic), abs(numeric), floor))
        result.inputs.append(InputCheck(names[position], x.shape, mode, max(errors, default=0.0)))
    return result
