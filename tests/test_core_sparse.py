"""Sparse attention over CSR key lists: dense equality, gradients, backends, bad input."""

import numpy as np
import pytest

from miniattn import gradcheck
from miniattn.core import kernels
from miniattn.core.sparse import (
    check_csr,
    csr_entry_rows,
    csr_from_mask,
    csr_from_rows,
    csr_to_dense,
    sparse_attention_backward,
    sparse_attention_forward,
)
from miniattn.transformer import attention_backward, attention_forward

BACKENDS = kernels.available_backends()

# Rows with repeats, an empty row first and last, a full row and a single key.
ROWS_WITH_REPEATS = [[], [0, 0, 3], [1, 2, 2, 2, 8], [5], [], list(range(9)), [8, 8], []]


def random_inputs(rng, leading=(2, 3), n_queries=8, n_keys=9, width=4, value_width=5, dtype=np.float64):
    q = rng.standard_normal(leading + (n_queries, width)).astype(dtype)
    k = rng.standard_normal(leading + (n_keys, width)).astype(dtype)
    v = rng.standard_normal(leading + (n_keys, value_width)).astype(dtype)
    return q, k, v


def random_pattern(rng, n_queries, n_keys, max_per_row=6):
    rows = [rng.integers(0, n_keys, size=rng.integers(0, max_per_row + 1)) for _ in range(n_queries)]
    return csr_from_rows(rows, n_keys)


def max_error(a, b):
    return float(np.max(np.abs(a - b), initial=0.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_sparse_equals_dense_with_repeats(rng, backend, with_bias):
    q, k, v = random_inputs(rng)
    indptr, indices = csr_from_rows(ROWS_WITH_REPEATS, 9)
    bias = rng.standard_normal(indices.shape[0]) if with_bias else None

    out, cache = sparse_attention_forward(q, k, v, indptr, indices, bias=bias, backend=backend)
    allowed, logit_bias = csr_to_dense(indptr, indices, 9, bias)
    expected, dense_cache = attention_forward(q, k, v, mask=allowed, bias=logit_bias)
    assert max_error(out, expected) < 1e-12

    dout = rng.standard_normal(out.shape)
    for got, want in zip(sparse_attention_backward(dout, cache), attention_backward(dout, dense_cache)):
        assert max_error(got, want) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_empty_rows_give_zero(rng, backend):
    q, k, v = random_inputs(rng)
    indptr, indices = csr_from_rows(ROWS_WITH_REPEATS, 9)
    out, cache = sparse_attention_forward(q, k, v, indptr, indices, backend=backend)
    empty = np.diff(indptr) == 0
    assert np.all(out[..., empty, :] == 0.0)
    dq, _, _ = sparse_attention_backward(rng.standard_normal(out.shape), cache)
    assert np.all(dq[..., empty, :] == 0.0)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_all_rows_empty(rng, backend):
    q, k, v = random_inputs(rng, n_queries=3)
    indptr = np.zeros(4, dtype=np.int64)
    out, cache = sparse_attention_forward(q, k, v, indptr, np.zeros(0, dtype=np.int64), backend=backend)
    assert np.all(out == 0.0)
    for grad in sparse_attention_backward(rng.standard_normal(out.shape), cache):
        assert np.all(grad == 0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_random_patterns_equal_dense(seed):
    rng = np.random.default_rng(seed)
    q, k, v = random_inputs(rng, leading=(3,), n_queries=11, n_keys=6)
    indptr, indices = random_pattern(rng, 11, 6)
    allowed, logit_bias = csr_to_dense(indptr, indices, 6)
    expected, dense_cache = attention_forward(q, k, v, mask=allowed, bias=logit_bias)
    dout = rng.standard_normal(expected.shape)
    dense_grads = attention_backward(dout, dense_cache)
    for backend in BACKENDS:
        out, cache = sparse_attention_forward(q, k, v, indptr, indices, backend=backend)
        assert max_error(out, expected) < 1e-12
        for got, want in zip(sparse_attention_backward(dout, cache), dense_grads):
            assert max_error(got, want) < 1e-12


def test_sparse_backends_agree(rng):
    if "cython" not in BACKENDS:
        pytest.skip("the compiled extension is not built")
    q, k, v = random_inputs(rng, leading=(2, 2), n_queries=40, n_keys=33, width=8, value_width=3)
    indptr, indices = random_pattern(rng, 40, 33, max_per_row=12)
    bias = rng.standard_normal(indices.shape[0])
    dout = rng.standard_normal((2, 2, 40, 3))
    results = {}
    for backend in BACKENDS:
        out, cache = sparse_attention_forward(q, k, v, indptr, indices, bias=bias, backend=backend)
        results[backend] = (out,) + sparse_attention_backward(dout, cache)
    for got, want in zip(results["cython"], results["numpy"]):
        assert max_error(got, want) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_float32_close_to_float64(rng, backend):
    q, k, v = random_inputs(rng)
    indptr, indices = csr_from_rows(ROWS_WITH_REPEATS, 9)
    out64, _ = sparse_attention_forward(q, k, v, indptr, indices, backend=backend)
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    out32, cache = sparse_attention_forward(q32, k32, v32, indptr, indices, backend=backend)
    assert out32.dtype == np.float32
    assert max_error(out32, out64) < 1e-5
    grads = sparse_attention_backward(np.ones_like(out32), cache)
    assert all(grad.dtype == np.float32 for grad in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_gradcheck(rng, backend):
    q, k, v = random_inputs(rng, leading=(2,), n_queries=8, n_keys=9, width=3, value_width=2)
    indptr, indices = csr_from_rows(ROWS_WITH_REPEATS, 9)
    bias = rng.standard_normal(indices.shape[0])

    def forward(q, k, v):
        return sparse_attention_forward(q, k, v, indptr, indices, bias=bias, backend=backend)

    result = gradcheck(forward, sparse_attention_backward, [q, k, v], names=["q", "k", "v"], rng=rng)
    result.assert_ok(1e-6)


def test_sparse_custom_scale(rng):
    q, k, v = random_inputs(rng)
    indptr, indices = csr_from_rows(ROWS_WITH_REPEATS, 9)
    allowed, logit_bias = csr_to_dense(indptr, indices, 9)
    for backend in BACKENDS:
        out, _ = sparse_attention_forward(q, k, v, indptr, indices, scale=0.3, backend=backend)
        expected, _ = attention_forward(q, k, v, mask=allowed, bias=logit_bias, scale=0.3)
        assert max_error(out, expected) < 1e-12


def test_csr_to_dense_log_multiplicity():
    indptr, indices = csr_from_rows([[2, 2, 2], [0, 1]], 3)
    allowed, logit_bias = csr_to_dense(indptr, indices, 3)
    assert allowed.tolist() == [[False, False, True], [True, True, False]]
    assert logit_bias[0, 2] == pytest.approx(np.log(3.0))
    assert logit_bias[1, 0] == 0.0


def test_csr_to_dense_without_repeats_has_no_bias():
    indptr, indices = csr_from_rows([[0, 2], [1]], 3)
    _, logit_bias = csr_to_dense(indptr, indices, 3)
    assert logit_bias is None


def test_csr_to_dense_combines_repeated_biases():
    indptr, indices = csr_from_rows([[1, 1]], 2)
    _, logit_bias = csr_to_dense(indptr, indices, 2, bias=np.array([0.5, -1.0]))
    assert logit_bias[0, 1] == pytest.approx(np.log(np.exp(0.5) + np.exp(-1.0)))


def test_csr_from_mask_round_trip(rng):
    allowed = rng.random((6, 7)) < 0.4
    allowed[2] = False
    indptr, indices = csr_from_mask(allowed)
    again, logit_bias = csr_to_dense(indptr, indices, 7)
    assert np.array_equal(again, allowed)
    assert logit_bias is None
    assert np.array_equal(csr_entry_rows(indptr), np.nonzero(allowed)[0])


def test_csr_from_rows_sorts_each_row():
    indptr, indices = csr_from_rows([[3, 1, 3], [2, 0]], 4)
    assert indptr.tolist() == [0, 3, 5]
    assert indices.tolist() == [1, 3, 3, 0, 2]


@pytest.mark.parametrize(
    "indptr, indices, message",
    [
        ([0, 2, 3], [1, 0, 2], "not sorted"),
        ([1, 2, 3], [0, 1, 2], "indptr\\[0\\]"),
        ([0, 2, 1, 3], [0, 1, 2], "decreases"),
        ([0, 1, 2], [0, 1, 2], "indptr\\[-1\\]"),
        ([0, 1, 3], [0, 1, 9], "expected keys in"),
        ([0, 1, 3], [0, -1, 2], "expected keys in"),
        ([0, 1], [0], "N \\+ 1"),
    ],
)
def test_check_csr_rejects_bad_patterns(indptr, indices, message):
    n_queries = 2 if len(indptr) != 4 else 3
    with pytest.raises(ValueError, match=message):
        check_csr(np.array(indptr), np.array(indices), n_queries, 4)


def test_check_csr_rejects_float_indices():
    with pytest.raises(TypeError, match="integer"):
        check_csr(np.array([0, 1]), np.array([0.0]), 1, 2)


def test_check_csr_allows_decrease_across_rows():
    check_csr(np.array([0, 2, 3]), np.array([2, 3, 0]), 2, 4)


def test_sparse_rejects_bad_bias_and_dout(rng):
    q, k, v = random_inputs(rng)
    indptr, indices = csr_from_rows(ROWS_WITH_REPEATS, 9)
    with pytest.raises(ValueError, match="one logit per listed pair"):
        sparse_attention_forward(q, k, v, indptr, indices, bias=np.zeros(3))
    with pytest.raises(TypeError, match="dtype"):
        sparse_attention_forward(q, k, v, indptr, indices, bias=np.zeros(indices.shape[0], dtype=int))
    out, cache = sparse_attention_forward(q, k, v, indptr, indices)
    with pytest.raises(ValueError, match="dout has shape"):
        sparse_attention_backward(np.zeros(out.shape[:-1]), cache)
    with pytest.raises(ValueError, match="backend"):
        sparse_attention_forward(q, k, v, indptr, indices, backend="gpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_int32_indices_and_strided_inputs(rng, backend):
    q, k, v = random_inputs(rng)
    indptr, indices = csr_from_rows(ROWS_WITH_REPEATS, 9)
    expected, _ = sparse_attention_forward(q, k, v, indptr, indices, backend=backend)
    q_view = np.swapaxes(np.ascontiguousarray(np.swapaxes(q, -1, -2)), -1, -2)  # same values, not C-contiguous
    assert not q_view.flags.c_contiguous
    out, _ = sparse_attention_forward(
        q_view, k, v, indptr.astype(np.int32), indices.astype(np.int32), backend=backend
    )
    assert np.array_equal(out, expected)


def test_sparse_backends_agree_float32(rng):
    if "cython" not in BACKENDS:
        pytest.skip("the compiled extension is not built")
    q, k, v = random_inputs(rng, leading=(2,), n_queries=30, n_keys=25, width=8, value_width=4, dtype=np.float32)
    indptr, indices = random_pattern(rng, 30, 25, max_per_row=10)
    dout = rng.standard_normal((2, 30, 4)).astype(np.float32)
    results = {}
    for backend in BACKENDS:
        out, cache = sparse_attention_forward(q, k, v, indptr, indices, backend=backend)
        results[backend] = (out,) + sparse_attention_backward(dout, cache)
    for got, want in zip(results["cython"], results["numpy"]):
        assert got.dtype == np.float32
        assert max_error(got, want) < 1e-5


def test_sparse_threads_share_the_kernel(rng):
    # The compiled kernel releases the GIL; concurrent calls must give the serial results.
    from concurrent.futures import ThreadPoolExecutor

    inputs = [random_inputs(np.random.default_rng(seed), leading=(2,), n_queries=50, n_keys=40) for seed in range(4)]
    indptr, indices = random_pattern(rng, 50, 40, max_per_row=20)
    serial = [sparse_attention_forward(q, k, v, indptr, indices)[0] for q, k, v in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda qkv: sparse_attention_forward(*qkv, indptr, indices)[0], inputs))
    for got, want in zip(parallel, serial):
        assert np.array_equal(got, want)
