"""Every attention method's backward rejects an upstream gradient that does not fit its output."""

import numpy as np
import pytest

from miniattn.methods import METHODS, is_implemented, make_method

NAMES = [method.name for method in METHODS if is_implemented(method.name)]


@pytest.fixture(params=NAMES)
def forward_result(request, rng):
    method = make_method(request.param, rng=np.random.default_rng(0))
    q, k, v = (rng.standard_normal((1, 2, 16, 8)) for _ in range(3))  # (B, H, N, D)
    out, cache = method.forward(q, k, v, causal=True)
    return method, out, cache


def test_backward_rejects_wrong_shape(forward_result):
    method, out, cache = forward_result
    with pytest.raises(ValueError, match="dout has shape"):
        method.backward(np.ones(out.shape[:-1] + (out.shape[-1] + 1,)), cache)


def test_backward_rejects_non_finite(forward_result):
    method, out, cache = forward_result
    dout = np.ones_like(out)
    dout[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="dout contains 1 non-finite"):
        method.backward(dout, cache)


def test_backward_rejects_list(forward_result):
    method, out, cache = forward_result
    with pytest.raises(TypeError, match="dout must be a numpy.ndarray"):
        method.backward(np.ones_like(out).tolist(), cache)
