"""The gradient checker catches wrong gradients; the kernels' two backends agree."""

import numpy as np
import pytest

from miniattn import gradcheck
from miniattn.core import kernels


def square_forward(x):
    return x**2, (x,)


def square_backward(dout, cache):
    (x,) = cache
    return 2 * x * dout


def wrong_square_backward(dout, cache):
    (x,) = cache
    return 2.1 * x * dout


@pytest.mark.parametrize("shape", [(3, 4), (40, 30)])  # elementwise and directional modes
def test_gradcheck_passes_correct_backward(rng, shape):
    x = rng.standard_normal(shape)
    result = gradcheck(square_forward, square_backward, [x], rng=rng)
    assert result.max_rel_error < 1e-8


@pytest.mark.parametrize("shape", [(3, 4), (40, 30)])
def test_gradcheck_catches_wrong_backward(rng, shape):
    x = rng.standard_normal(shape)
    result = gradcheck(square_forward, wrong_square_backward, [x], rng=rng)
    assert result.max_rel_error > 1e-2
    with pytest.raises(AssertionError):
        result.assert_ok(1e-6)


def test_gradcheck_reports_each_input(rng):
    a, b = rng.standard_normal((2, 3)), rng.standard_normal((3, 2))

    def forward(a, b):
        return a @ b, (a, b)

    def backward(dout, cache):
        a, b = cache
        return dout @ b.T, a.T @ dout

    result = gradcheck(forward, backward, [a, b], names=["a", "b"], rng=rng)
    assert [check.name for check in result.inputs] == ["a", "b"]
    assert "max rel error" in str(result)
    result.assert_ok(1e-7)


def test_gradcheck_rejects_float32(rng):
    with pytest.raises(TypeError, match="float64"):
        gradcheck(square_forward, square_backward, [np.ones(3, dtype=np.float32)])


BACKENDS = kernels.available_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scatter_add_matches_add_at_with_duplicates(rng, backend, dtype):
    rows = rng.standard_normal((50, 7)).astype(dtype)
    indices = rng.integers(0, 6, size=50)  # many duplicates
    out = kernels.scatter_add_rows(rows, indices, 9, backend=backend)
    expected = np.zeros((9, 7), dtype=dtype)
    np.add.at(expected, indices, rows)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, expected)  # same order of additions: bit for bit


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_add_empty_indices(backend):
    out = kernels.scatter_add_rows(np.zeros((0, 3)), np.zeros(0, dtype=np.int64), 4, backend=backend)
    np.testing.assert_array_equal(out, np.zeros((4, 3)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_rows_matches_fancy_indexing(rng, backend):
    x = rng.standard_normal((8, 5))
    indices = np.array([3, 3, 0, 7, 1], dtype=np.int32)  # int32 indices are converted
    np.testing.assert_array_equal(kernels.gather_rows(x, indices, backend=backend), x[indices])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_rows_non_contiguous_input(rng, backend):
    x = rng.standard_normal((5, 8))[:, ::2]
    indices = np.array([4, 0, 2])
    np.testing.assert_array_equal(kernels.gather_rows(x, indices, backend=backend), x[indices])


def test_scatter_add_gather_adjoint(rng):
    x = rng.standard_normal((6, 4))
    indices = rng.integers(0, 6, size=15)
    g = rng.standard_normal((15, 4))
    lhs = np.sum(kernels.gather_rows(x, indices) * g)
    rhs = np.sum(x * kernels.scatter_add_rows(g, indices, 6))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12)


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: kernels.scatter_add_rows(np.zeros((2, 3)), np.array([0, 5]), 4), IndexError),
        (lambda: kernels.scatter_add_rows(np.zeros((2, 3)), np.array([0]), 4), ValueError),
        (lambda: kernels.gather_rows(np.zeros((2, 3)), np.array([0.5])), TypeError),
        (lambda: kernels.gather_rows(np.zeros((2, 3), dtype=np.int64), np.array([0])), TypeError),
        (lambda: kernels.resolve_backend("fortran"), ValueError),
    ],
)
def test_kernels_reject_bad_input(call, error):
    with pytest.raises(error):
        call()


def test_backend_is_reported():
    assert kernels.backend() in ("numpy", "cython")
