"""Blockwise attention with an online softmax, the merge of partials, and the blockwise layer."""

import itertools

import numpy as np
import pytest

from miniattn import gradcheck
from miniattn.benchmarks.harness import peak_memory
from miniattn.blockwise_transformer import (
    FF_PARAM_NAMES,
    LAYER_PARAM_NAMES,
    blockwise_transformer_backward,
    blockwise_transformer_forward,
    init_layer_params,
)
from miniattn.core.masks import padding_mask
from miniattn.core.online_softmax import (
    BlockMask,
    blockwise_attention_backward,
    blockwise_attention_forward,
    empty_partial,
    merge_partials,
    partial_attention_forward,
)
from miniattn.core.softmax import logsumexp
from miniattn.nn.functional import feed_forward_backward, feed_forward_forward
from miniattn.transformer import MHA_PARAM_NAMES, attention_backward, attention_forward, mha_backward, mha_forward

TOL = 1e-12


def dense_lse(q, k, allowed):
    """Log-sum-exp of the dense scaled scores over allowed keys, (..., N)."""
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])  # (..., N, M)
    return logsumexp(scores, None if allowed is None else np.broadcast_to(allowed, scores.shape))


def assert_lse_equal(lse, expected):
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(lse[finite], expected[finite], rtol=TOL, atol=TOL)


def random_qkv(rng, n_queries, n_keys, batch=(2, 2), width=4, value_width=3):
    q = rng.standard_normal(batch + (n_queries, width))
    k = rng.standard_normal(batch + (n_keys, width))
    v = rng.standard_normal(batch + (n_keys, value_width))
    return q, k, v


# --- blockwise attention == dense attention ----------------------------------------------------


@pytest.mark.parametrize("n_queries, n_keys", [(5, 9), (9, 5), (64, 64), (65, 127)])
@pytest.mark.parametrize("causal, alignment", [(False, "bottom_right"), (True, "bottom_right"), (True, "top_left")])
@pytest.mark.parametrize("query_block, key_block", [(3, 7), (16, 5), (200, 200)])
def test_blockwise_matches_dense(rng, n_queries, n_keys, causal, alignment, query_block, key_block):
    q, k, v = random_qkv(rng, n_queries, n_keys)
    out, cache = blockwise_attention_forward(
        q, k, v, causal=causal, causal_alignment=alignment, query_block=query_block, key_block=key_block
    )
    expected, dense_cache = attention_forward(q, k, v, causal=causal, causal_alignment=alignment)
    np.testing.assert_allclose(out, expected, rtol=TOL, atol=TOL)
    assert_lse_equal(cache.lse, dense_lse(q, k, dense_cache["allowed"]))

    dout = rng.standard_normal(out.shape)
    for name, got, want in zip("qkv", blockwise_attention_backward(dout, cache), attention_backward(dout, dense_cache)):
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL, err_msg=f"d{name}")


def test_blockwise_key_padding_matches_dense(rng):
    q, k, v = random_qkv(rng, 7, 11)
    mask = padding_mask(np.array([11, 4]), 11)  # (2, 1, 1, 11)
    out, cache = blockwise_attention_forward(q, k, v, mask=mask, causal=True, query_block=2, key_block=3)
    expected, dense_cache = attention_forward(q, k, v, mask=mask, causal=True)
    np.testing.assert_allclose(out, expected, rtol=TOL, atol=TOL)
    assert_lse_equal(cache.lse, dense_lse(q, k, dense_cache["allowed"]))
    dout = rng.standard_normal(out.shape)
    for got, want in zip(blockwise_attention_backward(dout, cache), attention_backward(dout, dense_cache)):
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


def test_blockwise_general_mask_matches_dense(rng):
    q, k, v = random_qkv(rng, 9, 6)
    mask = rng.random((2, 1, 9, 6)) < 0.6  # (B, 1, N, M): broadcast over heads
    mask[0, 0, 4] = False  # one fully masked row
    out, cache = blockwise_attention_forward(q, k, v, mask=mask, query_block=4, key_block=4)
    expected, dense_cache = attention_forward(q, k, v, mask=mask)
    np.testing.assert_allclose(out, expected, rtol=TOL, atol=TOL)
    assert_lse_equal(cache.lse, dense_lse(q, k, dense_cache["allowed"]))
    dout = rng.standard_normal(out.shape)
    for got, want in zip(blockwise_attention_backward(dout, cache), attention_backward(dout, dense_cache)):
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


def test_blockwise_fully_masked_rows_give_zeros(rng):
    # N = 5 queries, M = 2 keys, bottom-right causal: queries 0..2 precede every key.
    q, k, v = random_qkv(rng, 5, 2)
    mask = padding_mask(np.array([2, 0]), 2)  # batch entry 1 has no valid key at all
    out, cache = blockwise_attention_forward(q, k, v, mask=mask, causal=True, query_block=2, key_block=1)
    dq, dk, dv = blockwise_attention_backward(rng.standard_normal(out.shape), cache)
    for array in (out, dq, dk, dv):
        assert np.all(np.isfinite(array))
    assert np.all(out[:, :, :3] == 0.0)
    assert np.all(out[1] == 0.0)
    assert np.all(np.isneginf(cache.lse[:, :, :3]))
    assert np.all(np.isneginf(cache.lse[1]))
    assert np.all(dq[:, :, :3] == 0.0)
    assert np.all(dq[1] == 0.0)
    assert np.all(dk[1] == 0.0)
    assert np.all(dv[1] == 0.0)


def test_blockwise_float32_close_to_dense(rng):
    q, k, v = (x.astype(np.float32) for x in random_qkv(rng, 33, 40))
    out, cache = blockwise_attention_forward(q, k, v, causal=True, query_block=8, key_block=16)
    expected, _ = attention_forward(q, k, v, causal=True)
    assert out.dtype == np.float32
    assert cache.lse.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_blockwise_skips_tiles_in_the_future():
    block_mask = BlockMask(np.arange(8), np.arange(8), causal_offset=0)
    assert block_mask.is_empty(slice(0, 4), slice(4, 8))
    assert not block_mask.is_empty(slice(4, 8), slice(0, 4))
    assert not block_mask.is_empty(slice(3, 5), slice(4, 6))  # the diagonal crosses this tile
    assert block_mask.allowed_count() == 8 * 9 // 2


def test_blockwise_never_holds_a_score_matrix(rng):
    n = 2048
    q, k, v = random_qkv(rng, n, n, batch=(1, 1), width=8, value_width=8)
    score_bytes = n * n * 8
    _, peak = peak_memory(lambda: blockwise_attention_forward(q, k, v, query_block=64, key_block=64))
    assert peak < score_bytes / 8, f"peak {peak} bytes; one score matrix is {score_bytes} bytes"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blockwise_gradcheck(seed):
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, 5, 7, batch=(1, 2), width=3, value_width=2)
    mask = padding_mask(np.array([6]), 7)

    def forward(q, k, v):
        return blockwise_attention_forward(q, k, v, mask=mask, causal=True, query_block=2, key_block=3)

    result = gradcheck(forward, blockwise_attention_backward, [q, k, v], names=["q", "k", "v"], rng=rng)
    result.assert_ok(1e-6)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"query_block": 0}, "query_block"),
        ({"key_block": -2}, "key_block"),
        ({"causal_alignment": "middle"}, "causal_alignment"),
        ({"mask": np.ones((3, 4), dtype=bool)}, "mask"),
    ],
)
def test_blockwise_rejects_bad_options(rng, options, message):
    q, k, v = random_qkv(rng, 5, 7)
    with pytest.raises(ValueError, match=message):
        blockwise_attention_forward(q, k, v, **options)


def test_blockwise_rejects_float_block_size(rng):
    q, k, v = random_qkv(rng, 5, 7)
    with pytest.raises(TypeError, match="key_block"):
        blockwise_attention_forward(q, k, v, key_block=2.5)


# --- merging partial results ------------------------------------------------------------------


def split_partials(rng, n_parts=4):
    """Partial (out, lse) of the same queries over n_parts disjoint key sets, and the full result."""
    q, k, v = random_qkv(rng, 6, 12)
    allowed_everywhere = BlockMask(np.arange(6), np.arange(12))
    full = partial_attention_forward(q, k, v, allowed_everywhere, scale=0.5, query_block=6, key_block=12)
    partials = []
    for keys in np.array_split(np.arange(12), n_parts):
        block_mask = BlockMask(np.arange(6), keys)
        partials.append(partial_attention_forward(q, k[..., keys, :], v[..., keys, :], block_mask, scale=0.5, query_block=4, key_block=2))
    return partials, full


def test_merge_recovers_full_attention(rng):
    partials, (full_out, full_lse) = split_partials(rng)
    out, lse = partials[0]
    for part in partials[1:]:
        out, lse = merge_partials(out, lse, *part)
    np.testing.assert_allclose(out, full_out, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(lse, full_lse, rtol=1e-14, atol=1e-14)


def test_merge_is_commutative_and_associative(rng):
    partials, _ = split_partials(rng, n_parts=3)
    a, b, c = partials
    ab = merge_partials(*a, *b)
    ba = merge_partials(*b, *a)
    np.testing.assert_array_equal(ab[0], ba[0])
    np.testing.assert_array_equal(ab[1], ba[1])
    left = merge_partials(*ab, *c)
    right = merge_partials(*a, *merge_partials(*b, *c))
    for order in itertools.permutations(partials):
        merged = merge_partials(*merge_partials(*order[0], *order[1]), *order[2])
        np.testing.assert_allclose(merged[0], left[0], rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(merged[1], left[1], rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(right[0], left[0], rtol=1e-14, atol=1e-14)


def test_merge_identity_is_exact(rng):
    (out, lse), *_ = split_partials(rng)[0]
    lse = lse.copy()
    lse[0, 0, 1] = -np.inf  # a row that saw no key
    out = out.copy()
    out[0, 0, 1] = 0.0
    zero_out, minus_inf = empty_partial(np.zeros(out.shape[:-1] + (4,)), out)
    for merged_out, merged_lse in (merge_partials(zero_out, minus_inf, out, lse), merge_partials(out, lse, zero_out, minus_inf)):
        np.testing.assert_array_equal(merged_out, out)
        np.testing.assert_array_equal(merged_lse, lse)


# --- Blockwise Parallel Transformer layer == dense layer ------------------------------------------


def dense_layer(x, params, n_heads, causal, activation):
    """y = h + FF(h), h = x + MHA(x), with the dense pairs; returns (y, backward)."""
    attention_params = {name: params[name] for name in MHA_PARAM_NAMES}
    attended, mha_cache = mha_forward(x, x, attention_params, n_heads=n_heads, causal=causal)
    residual = x + attended
    ff_out, ff_cache = feed_forward_forward(residual, params["W_1"], params["b_1"], params["W_2"], params["b_2"], activation)

    def backward(dy):
        dresidual, dw1, db1, dw2, db2 = feed_forward_backward(dy, ff_cache)
        dresidual = dresidual + dy
        dx_q, dx_kv, dparams = mha_backward(dresidual, mha_cache)
        dparams.update(zip(FF_PARAM_NAMES, (dw1, db1, dw2, db2)))
        return dresidual + dx_q + dx_kv, dparams

    return residual + ff_out, backward


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_blockwise_layer_matches_dense_layer(rng, causal, activation):
    x = rng.standard_normal((2, 11, 8))
    params = init_layer_params(8, 2, 12, rng)
    y, cache = blockwise_transformer_forward(x, params, n_heads=2, causal=causal, block_size=3, activation=activation)
    expected, dense_backward = dense_layer(x, params, 2, causal, activation)
    np.testing.assert_allclose(y, expected, rtol=TOL, atol=TOL)

    dy = rng.standard_normal(y.shape)
    dx, dparams = blockwise_transformer_backward(dy, cache)
    expected_dx, expected_dparams = dense_backward(dy)
    np.testing.assert_allclose(dx, expected_dx, rtol=TOL, atol=TOL)
    for name in LAYER_PARAM_NAMES:
        np.testing.assert_allclose(dparams[name], expected_dparams[name], rtol=TOL, atol=TOL, err_msg=name)


@pytest.mark.parametrize("seed, causal", [(0, True), (1, False)])
def test_blockwise_layer_gradcheck(seed, causal):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 5, 4))
    params = init_layer_params(4, 2, 6, rng)
    names = list(LAYER_PARAM_NAMES)

    def forward(x, *weights):
        return blockwise_transformer_forward(x, dict(zip(names, weights)), n_heads=2, causal=causal, block_size=2, activation="gelu")

    def backward(dy, cache):
        dx, dparams = blockwise_transformer_backward(dy, cache)
        return (dx,) + tuple(dparams[name] for name in names)

    result = gradcheck(forward, backward, [x] + [params[name] for name in names], names=["x"] + names, rng=rng)
    result.assert_ok(1e-6)


def test_blockwise_layer_rejects_bad_input(rng):
    x = rng.standard_normal((1, 5, 4))
    params = init_layer_params(4, 2, 6, rng)
    with pytest.raises(ValueError, match="block_size"):
        blockwise_transformer_forward(x, params, n_heads=2, block_size=0)
    with pytest.raises(ValueError, match="W_1"):
        blockwise_transformer_forward(x, {name: params[name] for name in MHA_PARAM_NAMES}, n_heads=2)
    with pytest.raises(ValueError, match="n_heads=3"):
        blockwise_transformer_forward(x, params, n_heads=3)
