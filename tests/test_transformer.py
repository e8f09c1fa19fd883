"""Scaled dot-product and multi-head attention: values, gradients, masks, errors."""

import numpy as np
import pytest

from miniattn import gradcheck
from miniattn.core.masks import causal_mask, padding_mask
from miniattn import transformer
from miniattn.transformer import (
    MHA_PARAM_NAMES,
    DenseAttention,
    attention_backward,
    attention_forward,
    attention_probabilities,
    init_mha_params,
    mha_backward,
    mha_forward,
    sinusoidal_positions,
)

TOL = 1e-6  # maximum relative error allowed in every gradient check


def loop_attention(q, k, v, allowed, scale):
    """Reference: one softmax of a vector per query row, written as plainly as possible."""
    out = np.zeros(q.shape[:-1] + (v.shape[-1],))
    for index in np.ndindex(q.shape[:-2]):
        for i in range(q.shape[-2]):
            keys = [j for j in range(k.shape[-2]) if allowed[index + (i, j)]]
            if not keys:
                continue
            scores = np.array([scale * q[index + (i,)] @ k[index + (j,)] for j in keys])
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            out[index + (i,)] = sum(w * v[index + (j,)] for w, j in zip(weights, keys))
    return out


def random_qkv(rng, n, m, batch=(2, 3), width=4, value_width=5):
    q = rng.standard_normal(batch + (n, width))
    k = rng.standard_normal(batch + (m, width))
    v = rng.standard_normal(batch + (m, value_width))
    return q, k, v


# N > Dv + 1 = 6 takes the path that appends a column of ones to V; the others do not.
@pytest.mark.parametrize("n, m", [(4, 4), (3, 6), (6, 3), (8, 5)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_row_loop(rng, n, m, causal):
    q, k, v = random_qkv(rng, n, m)
    mask = padding_mask(np.array([m, m - 1]), m)
    out, _ = attention_forward(q, k, v, mask=mask, causal=causal)
    allowed = np.broadcast_to(mask & (causal_mask(n, m) if causal else True), q.shape[:-2] + (n, m))
    np.testing.assert_allclose(out, loop_attention(q, k, v, allowed, 1 / np.sqrt(4)), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n, m", [(3, 5), (5, 3), (4, 4), (8, 3)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_attention_gradcheck(n, m, causal, seed):
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, n, m, batch=(2, 2))
    mask = padding_mask(np.array([m - 1, m]), m)
    result = gradcheck(
        lambda q, k, v: attention_forward(q, k, v, mask=mask, causal=causal),
        attention_backward,
        [q, k, v],
        names=["q", "k", "v"],
        rng=rng,
    )
    result.assert_ok(TOL)


@pytest.mark.parametrize(
    "row_block, n, m, bias_shape", [(None, 3, 5, (1, 3, 3, 5)), (2, 5, 4, (5, 4))]
)  # None: the default block, larger than N
def test_attention_bias_gradcheck(rng, monkeypatch, row_block, n, m, bias_shape):
    if row_block is not None:
        monkeypatch.setattr(transformer, "ROW_BLOCK", row_block)
    q, k, v = random_qkv(rng, n, m)
    bias = rng.standard_normal(bias_shape)
    result = gradcheck(
        lambda q, k, v, bias: attention_forward(q, k, v, bias=bias, bias_grad=True, causal=True),
        attention_backward,
        [q, k, v, bias],
        names=["q", "k", "v", "bias"],
        rng=rng,
    )
    result.assert_ok(TOL)


@pytest.mark.parametrize("row_block", [1, 2, 3])
@pytest.mark.parametrize("bias_shape", [None, (1, 3, 7, 5), (2, 1, 1, 5)])
def test_row_blocks_equal_one_block(rng, monkeypatch, row_block, bias_shape):
    # Causal with N > M leaves the first two rows fully masked, and the padding
    # mask broadcasts over the query rows, so blocks meet both kinds of mask.
    q, k, v = random_qkv(rng, 7, 5)
    mask = padding_mask(np.array([5, 3]), 5)  # (2, 1, 1, 5)
    bias = None if bias_shape is None else rng.standard_normal(bias_shape)
    options = {"mask": mask, "causal": True, "bias": bias, "bias_grad": bias is not None}
    dout = rng.standard_normal((2, 3, 7, 5))
    expected, expected_cache = attention_forward(q, k, v, **options)
    expected_grads = attention_backward(dout, expected_cache)

    monkeypatch.setattr(transformer, "ROW_BLOCK", row_block)
    out, cache = attention_forward(q, k, v, **options)
    grads = attention_backward(dout, cache)
    assert cache["row_block"] == row_block
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        attention_probabilities(cache), attention_probabilities(expected_cache), rtol=0, atol=1e-12
    )
    assert len(grads) == len(expected_grads)
    for grad, expected_grad in zip(grads, expected_grads):
        np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=1e-12)
    assert np.all(out[..., :2, :] == 0.0)


def test_probabilities_rows_sum_to_one(rng):
    q, k, v = random_qkv(rng, 5, 3)
    _, cache = attention_forward(q, k, v, causal=True)  # the first 2 queries see no key
    probs = attention_probabilities(cache)
    np.testing.assert_allclose(np.sum(probs[..., 2:, :], axis=-1), 1.0, rtol=1e-12)
    assert np.all(probs[..., :2, :] == 0.0)


def test_attention_top_left_alignment_differs_when_n_differs_from_m(rng):
    q, k, v = random_qkv(rng, 2, 5)
    bottom, _ = attention_forward(q, k, v, causal=True)
    top, _ = attention_forward(q, k, v, causal=True, causal_alignment="top_left")
    expected_top = loop_attention(q, k, v, np.broadcast_to(np.tri(2, 5, dtype=bool), (2, 3, 2, 5)), 0.5)
    np.testing.assert_allclose(top, expected_top, rtol=1e-12)
    assert not np.allclose(bottom, top)


def test_fully_masked_rows_give_zero_output_and_gradients(rng):
    q, k, v = random_qkv(rng, 5, 2)  # bottom-right causal: the first 3 queries see no key
    out, cache = attention_forward(q, k, v, causal=True)
    assert np.all(out[..., :3, :] == 0.0)
    dq, dk, dv = attention_backward(rng.standard_normal(out.shape), cache)
    assert np.all(np.isfinite(dq)) and np.all(np.isfinite(dk)) and np.all(np.isfinite(dv))
    assert np.all(dq[..., :3, :] == 0.0)


def test_fully_padded_key_set_gives_zeros(rng):
    q, k, v = random_qkv(rng, 3, 4)
    out, _ = attention_forward(q, k, v, mask=padding_mask(np.array([0, 4]), 4))
    assert np.all(out[0] == 0.0)
    assert np.all(np.isfinite(out))


def test_float32_large_logits_do_not_overflow(rng):
    q, k, v = (x.astype(np.float32) for x in random_qkv(rng, 4, 6))
    q *= 100.0
    k *= 100.0  # logits of magnitude ~1e4
    out, cache = attention_forward(q, k, v)
    grads = attention_backward(np.ones_like(out), cache)
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out))
    assert all(np.all(np.isfinite(g)) and g.dtype == np.float32 for g in grads)


def test_causal_output_ignores_future_tokens(rng):
    q, k, v = random_qkv(rng, 6, 6)
    out, _ = attention_forward(q, k, v, causal=True)
    k2, v2 = k.copy(), v.copy()
    k2[..., 4, :] += 1.0
    v2[..., 4, :] -= 2.0
    out2, _ = attention_forward(q, k2, v2, causal=True)
    np.testing.assert_array_equal(out[..., :4, :], out2[..., :4, :])
    assert not np.allclose(out[..., 4:, :], out2[..., 4:, :])


def test_cross_attention_invariant_to_memory_permutation(rng):
    q, k, v = random_qkv(rng, 3, 7)
    order = rng.permutation(7)
    out, _ = attention_forward(q, k, v)
    permuted, _ = attention_forward(q, k[..., order, :], v[..., order, :])
    np.testing.assert_allclose(out, permuted, rtol=1e-12)


def mha_pair(n_heads, causal=False, mask=None):
    names = list(MHA_PARAM_NAMES)

    def forward(x_q, x_kv, *params):
        return mha_forward(x_q, x_kv, dict(zip(names, params)), n_heads=n_heads, causal=causal, mask=mask)

    def backward(dy, cache):
        dx_q, dx_kv, dparams = mha_backward(dy, cache)
        return (dx_q, dx_kv) + tuple(dparams[name] for name in names)

    return forward, backward, names


@pytest.mark.parametrize(
    "n, m, causal",
    [(3, 5, False), (4, 4, True), (5, 3, True)],  # cross-attention, decoder self-attention, KV-cache shape
)
def test_mha_gradcheck(rng, n, m, causal):
    x_q, x_kv = rng.standard_normal((2, n, 8)), rng.standard_normal((2, m, 6))
    params = init_mha_params(8, 2, rng, kv_width=6)
    values = [params[name] + 0.1 * rng.standard_normal(params[name].shape) for name in MHA_PARAM_NAMES]
    mask = padding_mask(np.array([m, m - 1]), m)
    forward, backward, names = mha_pair(2, causal=causal, mask=mask)
    result = gradcheck(forward, backward, [x_q, x_kv] + values, names=["x_q", "x_kv"] + names, rng=rng)
    result.assert_ok(TOL)


def test_mha_self_attention_equivariant_to_permutation(rng):
    x = rng.standard_normal((1, 5, 8))
    params = init_mha_params(8, 2, rng)
    order = rng.permutation(5)
    y, _ = mha_forward(x, x, params, n_heads=2)
    y_permuted, _ = mha_forward(x[:, order], x[:, order], params, n_heads=2)
    np.testing.assert_allclose(y[:, order], y_permuted, rtol=1e-12, atol=1e-14)


def test_mha_with_dense_method_object_equals_default(rng):
    x = rng.standard_normal((2, 4, 8))
    params = init_mha_params(8, 4, rng)
    y, _ = mha_forward(x, x, params, n_heads=4, causal=True)
    y_object, _ = mha_forward(x, x, params, n_heads=4, causal=True, attention=DenseAttention())
    np.testing.assert_array_equal(y, y_object)


def test_sinusoidal_positions_interleave_sin_and_cos():
    encoding = sinusoidal_positions(7, 6)
    position, pair = 5, 1
    angle = position / 10000 ** (2 * pair / 6)
    assert encoding[position, 2 * pair] == pytest.approx(np.sin(angle), rel=1e-14)
    assert encoding[position, 2 * pair + 1] == pytest.approx(np.cos(angle), rel=1e-14)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda q, k, v: attention_forward(q, k[..., :3], v), ValueError, "width"),
        (lambda q, k, v: attention_forward(q, k, v[..., :2, :]), ValueError, "keys"),
        (lambda q, k, v: attention_forward(q.astype(np.int64), k, v), TypeError, "int64"),
        (lambda q, k, v: attention_forward(q.astype(np.complex128), k, v), TypeError, "complex128"),
        (lambda q, k, v: attention_forward(q, k.astype(np.float32), v), TypeError, "dtype"),
        (lambda q, k, v: attention_forward(q, k, v, mask=np.ones((3, 3), dtype=bool)), ValueError, "broadcast"),
        (lambda q, k, v: attention_forward(q, k, v, mask=np.ones((3, 5))), TypeError, "bool"),
        (lambda q, k, v: attention_forward(q, k, v, scale=float("nan")), ValueError, "scale"),
        (lambda q, k, v: attention_forward(q, k, v, causal_alignment="left"), ValueError, "causal_alignment"),
        (lambda q, k, v: attention_forward(q * np.nan, k, v), ValueError, "non-finite"),
    ],
)
def test_attention_rejects_bad_input(rng, call, error, message):
    q, k, v = random_qkv(rng, 3, 5)
    with pytest.raises(error, match=message):
        call(q, k, v)


def test_mha_rejects_width_not_divisible_by_heads(rng):
    with pytest.raises(ValueError, match="divisible"):
        init_mha_params(10, 3, rng)
    params = init_mha_params(8, 2, rng)
    with pytest.raises(ValueError, match="divisible"):
        mha_forward(rng.standard_normal((1, 3, 8)), rng.standard_normal((1, 3, 8)), params, n_heads=3)
