"""Longformer: window, dilation and global patterns against definitions, dense equality, gradients."""

import numpy as np
import pytest

from miniattn import gradcheck, methods
from miniattn import longformer as lf
from miniattn.core import kernels
from miniattn.core.masks import padding_mask
from miniattn.transformer import attention_backward as dense_backward
from miniattn.transformer import attention_forward as dense_forward

BACKENDS = kernels.available_backends()


def brute_force_masks(n_queries, n_keys, window, dilation, global_indices, causal):
    """Return (local, global) bool (N, M) masks from the definitions, one pair (i, j) at a time."""
    global_set = set(global_indices)
    local = np.zeros((n_queries, n_keys), dtype=bool)
    glob = np.zeros((n_queries, n_keys), dtype=bool)
    for i in range(n_queries):
        p = i + n_keys - n_queries
        for j in range(n_keys):
            if causal and j > p:
                continue
            if p in global_set:
                glob[i, j] = True
                continue
            offset = j - p
            in_window = offset % dilation == 0 and -window <= offset // dilation <= (0 if causal else window)
            local[i, j] = in_window or j in global_set
    return local, glob


CASES = [
    # (N, M, window, dilation, global_indices)
    (11, 11, 2, 1, []),
    (11, 11, 2, 2, [0]),
    (13, 13, 3, 3, [0, 5, 12]),
    (9, 12, 2, 1, [1, 10]),
    (12, 7, 1, 2, [3]),
    (5, 5, 4, 1, []),
]


@pytest.mark.parametrize("n_queries, n_keys, window, dilation, global_indices", CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_masks_match_definitions(n_queries, n_keys, window, dilation, global_indices, causal):
    local, glob, rows = lf.longformer_masks(
        n_queries, n_keys, window=window, dilation=dilation, global_indices=global_indices, causal=causal
    )
    want_local, want_global = brute_force_masks(n_queries, n_keys, window, dilation, global_indices, causal)
    assert np.array_equal(local, want_local)
    assert np.array_equal(glob, want_global)
    assert np.array_equal(rows, want_global.any(axis=1) | np.isin(np.arange(n_queries) + n_keys - n_queries,
                                                                    global_indices))


def dense_oracle(q, k, v, qg, kg, vg, local, glob, padding=None):
    """Dense masked attention for local rows plus dense global-projection attention for global rows."""
    local_mask = local if padding is None else local & padding
    global_mask = glob if padding is None else glob & padding
    local_out, local_cache = dense_forward(q, k, v, mask=local_mask)
    global_out, global_cache = dense_forward(qg, kg, vg, mask=global_mask)
    return local_out + global_out, local_cache, global_cache


def stacked_masks(n_queries, n_keys, window, dilations, global_indices, causal):
    pairs = [
        lf.longformer_masks(n_queries, n_keys, window=window, dilation=d, global_indices=global_indices, causal=causal)
        for d in dilations
    ]
    return np.stack([pair[0] for pair in pairs])[None], np.stack([pair[1] for pair in pairs])[None]


@pytest.mark.parametrize("n_queries, n_keys, window, dilation, global_indices", CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("separate", [False, True])
def test_attention_equals_dense_oracle(rng, n_queries, n_keys, window, dilation, global_indices, causal, separate):
    heads = 2
    dilations = (dilation, 1)
    q = rng.standard_normal((2, heads, n_queries, 4))
    k = rng.standard_normal((2, heads, n_keys, 4))
    v = rng.standard_normal((2, heads, n_keys, 3))
    qg, kg, vg = (rng.standard_normal(x.shape) for x in (q, k, v)) if separate else (q, k, v)
    local, glob = stacked_masks(n_queries, n_keys, window, dilations, global_indices, causal)
    expected, local_cache, global_cache = dense_oracle(q, k, v, qg, kg, vg, local, glob)
    dout = rng.standard_normal(expected.shape)
    local_grads = dense_backward(dout, local_cache)
    global_grads = dense_backward(dout, global_cache)
    if separate:
        want = tuple(local_grads) + tuple(global_grads)
    else:
        want = tuple(a + b for a, b in zip(local_grads, global_grads))

    extra = dict(q_global=qg, k_global=kg, v_global=vg) if separate else {}
    for backend in BACKENDS:
        out, cache = lf.attention_forward(
            q, k, v, window=window, dilation=dilations, global_indices=global_indices, causal=causal,
            backend=backend, **extra,
        )
        assert np.max(np.abs(out - expected)) < 1e-12
        grads = lf.attention_backward(dout, cache)
        assert len(grads) == len(want)
        for got, expected_grad in zip(grads, want):
            assert np.max(np.abs(got - expected_grad)) < 1e-12


def test_edge_rows_see_clipped_window():
    local, _, _ = lf.longformer_masks(8, 8, window=2, dilation=1, global_indices=[], causal=False)
    assert np.flatnonzero(local[0]).tolist() == [0, 1, 2]
    assert np.flatnonzero(local[7]).tolist() == [5, 6, 7]
    assert np.flatnonzero(local[4]).tolist() == [2, 3, 4, 5, 6]


def test_global_key_in_window_counted_once(rng):
    indptr, indices = lf.local_pattern(6, 6, window=2, global_indices=[3], causal=False)
    row = indices[indptr[2] : indptr[3]]
    assert row.tolist() == [0, 1, 2, 3, 4]
    assert len(set(row.tolist())) == len(row)


def test_full_window_without_globals_equals_dense(rng):
    q, k, v = (rng.standard_normal((1, 2, 7, 3)) for _ in range(3))
    for causal in (False, True):
        out, _ = lf.attention_forward(q, k, v, window=6, causal=causal)
        expected, _ = dense_forward(q, k, v, causal=causal)
        assert np.max(np.abs(out - expected)) < 1e-12


def test_all_global_equals_dense_with_global_projections(rng):
    q, k, v, qg, kg, vg = (rng.standard_normal((1, 2, 6, 3)) for _ in range(6))
    out, _ = lf.attention_forward(
        q, k, v, window=1, global_indices=range(6), q_global=qg, k_global=kg, v_global=vg
    )
    expected, _ = dense_forward(qg, kg, vg)
    assert np.max(np.abs(out - expected)) < 1e-12


def test_padding_never_leaks(rng):
    # Batch entry 1 has 6 valid tokens of 10: its valid rows must equal a run on those 6 tokens alone,
    # and its padded keys must get zero gradient.
    n, valid = 10, 6
    q, k, v = (rng.standard_normal((2, 2, n, 4)) for _ in range(3))
    padding = padding_mask(np.array([n, valid]), n)  # (B, 1, 1, M)
    options = dict(window=2, dilation=(1, 2), global_indices=[0, 3])
    out, cache = lf.attention_forward(q, k, v, mask=padding, **options)
    short, short_cache = lf.attention_forward(q[1:, :, :valid], k[1:, :, :valid], v[1:, :, :valid], **options)
    assert np.max(np.abs(out[1, :, :valid] - short[0])) < 1e-12

    dout = rng.standard_normal(out.shape)
    dout[1, :, valid:] = 0.0  # padded query rows carry no loss
    dq, dk, dv = lf.attention_backward(dout, cache)
    short_grads = lf.attention_backward(dout[1:, :, :valid], short_cache)
    assert np.all(dk[1, :, valid:] == 0.0)
    assert np.all(dv[1, :, valid:] == 0.0)
    for got, want in zip((dq, dk, dv), short_grads):
        assert np.max(np.abs(got[1, :, :valid] - want[0])) < 1e-12


def test_fully_masked_rows_give_zero(rng):
    q, k, v = (rng.standard_normal((1, 1, 6, 3)) for _ in range(3))
    allowed = np.ones((6, 6), dtype=bool)
    allowed[:, :3] = False  # queries 0 and 1 (window 1) see only keys < 3
    out, cache = lf.attention_forward(q, k, v, window=1, mask=allowed)
    assert np.all(out[0, 0, :2] == 0.0)
    dq, _, _ = lf.attention_backward(rng.standard_normal(out.shape), cache)
    assert np.all(dq[0, 0, :2] == 0.0)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck_cases_pass(seed):
    rng = np.random.default_rng(seed)
    for label, forward, backward, inputs, names in lf.gradcheck_cases(rng):
        result = gradcheck(forward, backward, inputs, names=names, rng=rng)
        assert result.max_rel_error < 1e-6, f"{label}: {result}"


def test_method_object_protocol(rng):
    method = methods.make_method("longformer", window=2, dilation=(1, 2), global_indices=[1])
    assert method.name == "longformer"
    q, k, v = (rng.standard_normal((2, 2, 9, 4)) for _ in range(3))
    out, cache = method.forward(q, k, v, causal=True)
    seen = method.keys_seen(cache)
    assert np.array_equal(seen[0, 1], method.mask(9, 9, causal=True, head=1))
    assert not np.array_equal(seen[0, 0], seen[0, 1])
    dq, dk, dv = method.backward(np.ones_like(out), cache)
    assert dq.shape == q.shape
    assert dk.shape == k.shape
    assert dv.shape == v.shape


def test_default_window_fits_short_sequences(rng):
    method = lf.make_method()
    q, k, v = (rng.standard_normal((1, 1, 5, 3)) for _ in range(3))
    out, _ = method.forward(q, k, v)
    expected, _ = dense_forward(q, k, v)
    assert np.max(np.abs(out - expected)) < 1e-12


def test_one_sided_window_conversion():
    assert lf.one_sided_window(512) == 256
    with pytest.raises(ValueError, match="odd"):
        lf.one_sided_window(7)


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(window=0), ValueError, "window=0"),
        (dict(window=-3), ValueError, "window=-3"),
        (dict(window=8), ValueError, "larger than M - 1"),
        (dict(window=1.5), TypeError, "window"),
        (dict(window=2, dilation=0), ValueError, "dilation=0"),
        (dict(window=2, dilation=8), ValueError, "dilation=8"),
        (dict(window=2, dilation=(1, 2, 3)), ValueError, "one per head"),
        (dict(window=2, global_indices=[1, 8]), ValueError, "global_indices contains 8"),
        (dict(window=2, global_indices=[-1]), ValueError, "global_indices contains -1"),
        (dict(window=2, global_indices=[2, 2]), ValueError, "more than once"),
        (dict(window=2, global_indices=[0.5]), TypeError, "integers"),
    ],
)
def test_bad_options_raise(rng, options, error, message):
    q, k, v = (rng.standard_normal((1, 2, 8, 3)) for _ in range(3))
    with pytest.raises(error, match=message):
        lf.attention_forward(q, k, v, **options)


def test_partial_global_projections_raise(rng):
    q, k, v = (rng.standard_normal((1, 1, 5, 3)) for _ in range(3))
    with pytest.raises(ValueError, match="all three"):
        lf.attention_forward(q, k, v, window=1, q_global=q)
    wide_values = np.zeros((1, 1, 5, 4))
    with pytest.raises(ValueError, match="v_global has shape"):
        lf.attention_forward(q, k, v, window=1, q_global=q, k_global=k, v_global=wide_values)


def test_method_reuses_patterns_per_shape(rng):
    method = lf.make_method(window=2, global_indices=[0])
    q, k, v = (rng.standard_normal((1, 2, 8, 3)) for _ in range(3))
    first, _ = method.forward(q, k, v)
    second, _ = method.forward(q, k, v)
    method.forward(q, k, v, causal=True)
    assert len(method.patterns) == 2
    assert np.array_equal(first, second)


def test_layer_gradcheck_with_global_projections(rng):
    params = lf.init_layer_params(4, 2, rng)
    for name in params:  # move the global projections away from their local copies
        params[name] = params[name] + 0.1 * rng.standard_normal(params[name].shape)
    names = list(lf.LAYER_PARAM_NAMES)
    x = rng.standard_normal((2, 6, 4))

    def forward(x, *arrays):
        return lf.self_attention_forward(
            x, dict(zip(names, arrays)), n_heads=2, window=1, dilation=(1, 2), global_indices=[0, 4], causal=True
        )

    def backward(dy, cache):
        dx, dparams = lf.self_attention_backward(dy, cache)
        return (dx,) + tuple(dparams[name] for name in names)

    inputs = [x] + [params[name] for name in names]
    result = gradcheck(forward, backward, inputs, names=["x"] + names, rng=rng)
    assert result.max_rel_error < 1e-6, str(result)


def test_layer_global_rows_use_global_projections(rng):
    params = lf.init_layer_params(4, 2, rng)
    x = rng.standard_normal((1, 6, 4))
    y, _ = lf.self_attention_forward(x, params, n_heads=2, window=1, global_indices=[2])
    params["W_q_global"] = params["W_q_global"] + 1.0
    changed, _ = lf.self_attention_forward(x, params, n_heads=2, window=1, global_indices=[2])
    differs = np.any(np.abs(changed - y) > 1e-12, axis=-1)[0]  # (N,)
    assert differs.tolist() == [False, False, True, False, False, False]


def test_layer_rejects_missing_params(rng):
    params = lf.init_layer_params(4, 2, rng)
    del params["W_k_global"]
    with pytest.raises(ValueError, match="W_k_global"):
        lf.self_attention_forward(rng.standard_normal((1, 6, 4)), params, n_heads=2, window=1)
