"""Sparse Transformer: patterns against their set definitions, dense equality, gradients."""

import numpy as np
import pytest

from miniattn import gradcheck, methods
from miniattn.core import kernels
from miniattn.core.masks import padding_mask
from miniattn import sparse_transformer as st
from miniattn.transformer import attention_backward as dense_backward
from miniattn.transformer import attention_forward as dense_forward

BACKENDS = kernels.available_backends()


def brute_force_sets(n_queries, n_keys, pattern, stride, causal, summary_width=1, summary_set=0):
    """Return bool (N, M) masks of A1 and A2 from the set definitions, one pair (i, j) at a time."""
    first = np.zeros((n_queries, n_keys), dtype=bool)
    second = np.zeros((n_queries, n_keys), dtype=bool)
    low = stride - summary_width * (summary_set + 1)
    high = stride - summary_width * summary_set
    for i in range(n_queries):
        p = i + n_keys - n_queries
        for j in range(n_keys):
            if causal and j > p:
                continue
            if pattern == "strided":
                first[i, j] = (p - stride < j <= p) if causal else abs(p - j) < stride
                second[i, j] = (p - j) % stride == 0
            else:
                first[i, j] = j // stride == p // stride
                second[i, j] = low <= j % stride < high
    return first, second


CASES = [
    # (N, M, pattern, stride, summary_width, n_summary_sets)
    (13, 13, "strided", 4, None, None),
    (10, 13, "strided", 3, None, None),
    (13, 9, "strided", 3, None, None),
    (13, 13, "fixed", 4, 1, 1),
    (11, 14, "fixed", 5, 2, 2),
    (9, 7, "fixed", 3, 1, 3),
]


@pytest.mark.parametrize("n_queries, n_keys, pattern, stride, width, n_sets", CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_factor_sets_match_definitions(n_queries, n_keys, pattern, stride, width, n_sets, causal):
    for head in range(3):
        summary_set = head % n_sets if n_sets else 0
        first, second = brute_force_sets(
            n_queries, n_keys, pattern, stride, causal, width or 1, summary_set
        )
        options = dict(pattern=pattern, stride=stride, summary_width=width, n_summary_sets=n_sets, causal=causal)
        merged = st.sparse_transformer_mask(n_queries, n_keys, head, 3, combine="merged", **options)
        assert np.array_equal(merged, first | second)
        even = st.sparse_transformer_mask(n_queries, n_keys, head, 3, combine="alternating", layer=2, **options)
        odd = st.sparse_transformer_mask(n_queries, n_keys, head, 3, combine="alternating", layer=1, **options)
        assert np.array_equal(even, first)
        assert np.array_equal(odd, second)
        split = st.sparse_transformer_mask(n_queries, n_keys, head, 3, combine="split", **options)
        assert np.array_equal(split, first if head < 2 else second)


@pytest.mark.parametrize("n", [5, 12, 17])
@pytest.mark.parametrize("stride", [1, 2, 3, 5])
def test_strided_reaches_every_past_key_in_two_steps(n, stride):
    first, second = brute_force_sets(n, n, "strided", stride, True)
    sparse_first = st.sparse_transformer_mask(n, n, combine="alternating", layer=0, stride=stride, causal=True)
    sparse_second = st.sparse_transformer_mask(n, n, combine="alternating", layer=1, stride=stride, causal=True)
    two_steps = (sparse_second.astype(int) @ sparse_first.astype(int)) > 0
    assert np.array_equal(two_steps, np.tril(np.ones((n, n), dtype=bool)))
    assert np.array_equal(sparse_first, first)


@pytest.mark.parametrize("n, stride, width", [(12, 4, 1), (17, 5, 2), (9, 3, 3)])
def test_fixed_reaches_every_past_key(n, stride, width):
    options = dict(pattern="fixed", stride=stride, summary_width=width, causal=True, combine="alternating")
    block = st.sparse_transformer_mask(n, n, layer=0, **options)
    summary = st.sparse_transformer_mask(n, n, layer=1, **options)
    reach = block | ((summary.astype(int) @ block.astype(int)) > 0)
    assert np.array_equal(reach, np.tril(np.ones((n, n), dtype=bool)))


def run_both(q, k, v, allowed, rng, **options):
    """Check sparse == dense forward and backward on every backend."""
    expected, dense_cache = dense_forward(q, k, v, mask=allowed)
    dout = rng.standard_normal(expected.shape)
    dense_grads = dense_backward(dout, dense_cache)
    for backend in BACKENDS:
        out, cache = st.attention_forward(q, k, v, backend=backend, **options)
        assert np.max(np.abs(out - expected)) < 1e-12
        for got, want in zip(st.attention_backward(dout, cache), dense_grads):
            assert np.max(np.abs(got - want)) < 1e-12


@pytest.mark.parametrize("combine", st.COMBINES)
@pytest.mark.parametrize("n_queries, n_keys, pattern, stride, width, n_sets", CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_attention_equals_dense_masked(rng, combine, n_queries, n_keys, pattern, stride, width, n_sets, causal):
    heads = 3
    q = rng.standard_normal((2, heads, n_queries, 4))
    k = rng.standard_normal((2, heads, n_keys, 4))
    v = rng.standard_normal((2, heads, n_keys, 3))
    options = dict(
        pattern=pattern, stride=stride, summary_width=width, n_summary_sets=n_sets, combine=combine,
        layer=1, causal=causal,
    )
    allowed = np.stack([st.sparse_transformer_mask(n_queries, n_keys, h, heads, **options) for h in range(heads)])
    run_both(q, k, v, allowed[None], rng, **options)


def test_fully_masked_rows_give_zero(rng):
    # Fixed A2 with the summary at the end of each block: early queries see no key.
    options = dict(pattern="fixed", stride=4, summary_width=1, combine="alternating", layer=1, causal=True)
    q, k, v = (rng.standard_normal((1, 1, 8, 3)) for _ in range(3))
    out, cache = st.attention_forward(q, k, v, **options)
    empty = ~st.sparse_transformer_mask(8, 8, **options).any(axis=1)
    assert empty.tolist()[:3] == [True, True, True]
    assert np.all(out[0, 0, empty] == 0.0)
    dq, _, _ = st.attention_backward(rng.standard_normal(out.shape), cache)
    assert np.all(dq[0, 0, empty] == 0.0)
    run_both(q, k, v, st.sparse_transformer_mask(8, 8, **options), rng, **options)


def test_causal_more_queries_than_keys_has_empty_rows(rng):
    q = rng.standard_normal((1, 2, 7, 3))
    k = rng.standard_normal((1, 2, 4, 3))
    v = rng.standard_normal((1, 2, 4, 3))
    out, _ = st.attention_forward(q, k, v, stride=2, causal=True)
    assert np.all(out[:, :, :3] == 0.0)
    allowed = st.sparse_transformer_mask(7, 4, stride=2, causal=True)
    run_both(q, k, v, allowed, rng, stride=2, causal=True)


def test_padding_mask_is_intersected(rng):
    q, k, v = (rng.standard_normal((2, 2, 9, 3)) for _ in range(3))
    padding = padding_mask(np.array([9, 5]), 9)  # (B, 1, 1, M)
    allowed = st.sparse_transformer_mask(9, 9, stride=3, causal=False) & padding
    expected, dense_cache = dense_forward(q, k, v, mask=allowed)
    out, cache = st.attention_forward(q, k, v, stride=3, causal=False, mask=padding)
    assert np.max(np.abs(out - expected)) < 1e-12
    dout = rng.standard_normal(out.shape)
    grads = st.attention_backward(dout, cache)
    for got, want in zip(grads, dense_backward(dout, dense_cache)):
        assert np.max(np.abs(got - want)) < 1e-12
    assert np.all(grads[1][1, :, 5:] == 0.0)


def test_stride_covering_everything_equals_dense(rng):
    q, k, v = (rng.standard_normal((1, 2, 6, 3)) for _ in range(3))
    out, _ = st.attention_forward(q, k, v, stride=6, causal=True)
    expected, _ = dense_forward(q, k, v, causal=True)
    assert np.max(np.abs(out - expected)) < 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck_cases_pass(seed):
    rng = np.random.default_rng(seed)
    for label, forward, backward, inputs, names in st.gradcheck_cases(rng):
        result = gradcheck(forward, backward, inputs, names=names, rng=rng)
        assert result.max_rel_error < 1e-6, f"{label}: {result}"


def test_method_object_protocol(rng):
    method = methods.make_method("sparse_transformer", pattern="fixed", stride=3, summary_width=1)
    assert method.name == "sparse_transformer"
    q, k, v = (rng.standard_normal((2, 2, 7, 4)) for _ in range(3))
    out, cache = method.forward(q, k, v, causal=True)
    seen = method.keys_seen(cache)
    assert seen.shape == (2, 2, 7, 7)
    assert np.array_equal(seen[0, 0], method.mask(7, 7, causal=True))
    expected, _ = dense_forward(q, k, v, mask=seen)
    assert np.max(np.abs(out - expected)) < 1e-12
    dq, dk, dv = method.backward(np.ones_like(out), cache)
    assert dq.shape == q.shape
    assert dk.shape == k.shape
    assert dv.shape == v.shape


def test_default_stride_is_ceil_sqrt():
    assert [st.default_stride(m) for m in (0, 1, 2, 4, 5, 16, 17)] == [1, 1, 2, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(stride=0), ValueError, "stride=0"),
        (dict(stride=-2), ValueError, "stride=-2"),
        (dict(stride=2.5), TypeError, "stride"),
        (dict(pattern="dilated"), ValueError, "pattern"),
        (dict(combine="sum"), ValueError, "combine"),
        (dict(layer=-1), ValueError, "layer"),
        (dict(summary_width=2), ValueError, "fixed pattern only"),
        (dict(pattern="fixed", stride=4, summary_width=0), ValueError, "summary_width"),
        (dict(pattern="fixed", stride=4, summary_width=3, n_summary_sets=2), ValueError, "c \\* S <= l"),
    ],
)
def test_bad_options_raise(options, error, message):
    with pytest.raises(error, match=message):
        st.make_method(**options)


def test_stride_longer_than_keys_raises(rng):
    q, k, v = (rng.standard_normal((1, 1, 5, 3)) for _ in range(3))
    with pytest.raises(ValueError, match="larger than the key length"):
        st.attention_forward(q, k, v, stride=6)


def test_bad_mask_raises(rng):
    q, k, v = (rng.standard_normal((1, 1, 5, 3)) for _ in range(3))
    with pytest.raises(ValueError, match="does not broadcast"):
        st.attention_forward(q, k, v, stride=2, mask=np.ones((3, 5), dtype=bool))
    with pytest.raises(ValueError, match="expected \\(B, H, N, D\\)"):
        st.attention_forward(q[0], k[0], v[0], stride=2)


def test_method_reuses_patterns_per_shape(rng):
    method = st.make_method(stride=3)
    q, k, v = (rng.standard_normal((1, 2, 8, 3)) for _ in range(3))
    first, _ = method.forward(q, k, v)
    second, _ = method.forward(q, k, v)
    method.forward(q[:, :, :5], k, v)
    assert len(method.patterns) == 2
    assert np.array_equal(first, second)


def test_float32_gradients_keep_input_dtype(rng):
    q, k, v = (rng.standard_normal((1, 2, 9, 4)).astype(np.float32) for _ in range(3))
    out, cache = st.attention_forward(q, k, v, stride=3)
    assert out.dtype == np.float32
    grads = st.attention_backward(rng.standard_normal(out.shape), cache)
    assert [grad.dtype for grad in grads] == [np.float32] * 3
    with pytest.raises(ValueError, match="dout has shape"):
        st.attention_backward(np.zeros((1, 2, 9, 5)), cache)
