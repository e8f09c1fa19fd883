"""Input checks shared by every public entry point.

Each check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right
kind, wrong value) with a message that names the argument, the value received
and what was expected. Checks return nothing; they only raise.
"""

import numbers

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_float_array(name, x, *, min_ndim=1, finite=True):
    """Check that x is a float32/float64 ndarray with at least min_ndim axes."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; expected float32 or float64 "
            f"(convert with {name}.astype(np.float64))"
        )
    if x.ndim < min_ndim:
        raise ValueError(f"{name} has shape {x.shape}; expected at least {min_ndim} dimensions")
    # One float64 sum finds a NaN or inf without a boolean array the size of x:
    # NaN and inf propagate, and a sum of finite float32 values cannot overflow in
    # float64. A float64 sum can overflow on huge finite values, so a non-finite
    # sum is confirmed entry by entry before raising.
    if finite:
        with np.errstate(over="ignore", invalid="ignore"):
            total = np.sum(x, dtype=np.float64)
    if finite and not np.isfinite(total) and not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        values = "value" if bad == 1 else "values"
        raise ValueError(f"{name} contains {bad} non-finite {values} (NaN or inf); expected finite values")


def check_layer_inputs(x, params, param_names, n_heads):
    """Check a layer's input x (B, N, C), its parameter dict and the head count H dividing C."""
    check_float_array("x", x, min_ndim=3)
    if x.ndim != 3:
        raise ValueError(f"x has shape {x.shape}; expected (B, N, C)")
    missing = [name for name in param_names if name not in params]
    if missing:
        raise ValueError(f"params is missing {missing}; expected keys {list(param_names)}")
    check_int("n_heads", n_heads, minimum=1)
    if x.shape[-1] % n_heads:
        raise ValueError(f"model width {x.shape[-1]} is not divisible by n_heads={n_heads}")


def check_upstream(name, grad, shape):
    """Check an upstream gradient: a finite float array with the shape of the forward's output."""
    check_float_array(name, grad)
    if grad.shape != tuple(shape):
        raise ValueError(
            f"{name} has shape {grad.shape}; expected {tuple(shape)}, the shape of the forward's output"
        )


def check_same_dtype(**arrays):
    """Check that all given arrays share one dtype."""
    dtypes = {name: array.dtype for name, array in arrays.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{name}={dtype}" for name, dtype in dtypes.items())
        raise TypeError(f"inputs must share one dtype, got {listed}")


def check_attention_inputs(q, k, v):
    """Check q (..., N, D), k (..., M, D) and v (..., M, Dv) for attention."""
    check_float_array("q", q, min_ndim=2)
    check_float_array("k", k, min_ndim=2)
    check_float_array("v", v, min_ndim=2)
    check_same_dtype(q=q, k=k, v=v)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q has width D={q.shape[-1]} but k has width {k.shape[-1]}; "
            f"queries and keys must have the same last dimension (q {q.shape}, k {k.shape})"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k has M={k.shape[-2]} keys but v has {v.shape[-2]} rows; "
            f"expected the same key length (k {k.shape}, v {v.shape})"
        )
    if not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        raise ValueError(
            f"q, k and v must share their leading (batch, head) dimensions, got "
            f"q {q.shape}, k {k.shape}, v {v.shape}"
        )


def check_mask(mask, scores_shape, name="mask"):
    """Check that a boolean mask broadcasts to scores_shape (..., N, M)."""
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"{name} must be a boolean numpy.ndarray, got {type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise TypeError(
            f"{name} has dtype {mask.dtype}; expected bool (True where a query may attend a key)"
        )
    try:
        broadcast = np.broadcast_shapes(mask.shape, tuple(scores_shape))
    except ValueError:
        broadcast = None
    if broadcast != tuple(scores_shape):
        raise ValueError(
            f"{name} has shape {mask.shape}, which does not broadcast to the score shape "
            f"{tuple(scores_shape)} (..., N, M)"
        )


def check_int(name, value, *, minimum=None, maximum=None):
    """Check that value is an integer within [minimum, maximum]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} is invalid; expected an integer >= {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value} is invalid; expected an integer <= {maximum}")


def check_real(name, value, *, minimum=None, maximum=None, open_interval=False):
    """Check that value is a finite real number in [minimum, maximum] (or the open interval)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not np.isfinite(value):
        raise ValueError(f"{name}={value} is invalid; expected a finite number")
    low_bad = minimum is not None and (value <= minimum if open_interval else value < minimum)
    high_bad = maximum is not None and (value >= maximum if open_interval else value > maximum)
    if low_bad or high_bad:
        left, right = ("(", ")") if open_interval else ("[", "]")
        low = "-inf" if minimum is None else minimum
        high = "inf" if maximum is None else maximum
        raise ValueError(f"{name}={value} is invalid; expected a value in {left}{low}, {high}{right}")


def check_choice(name, value, choices):
    """Check that value is one of choices."""
    if value not in choices:
        expected = ", ".join(repr(choice) for choice in choices)
        raise ValueError(f"{name}={value!r} is invalid; expected one of {expected}")


def check_generator(name, rng):
    """Check that rng is a numpy.random.Generator."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"{name} must be a numpy.random.Generator (np.random.default_rng(seed)), "
            f"got {type(rng).__name__}"
        )
