"""BigBird: the block-sparse path against dense masked attention, the adjacency generator, bad input."""

import numpy as np
import pytest

import miniattn
from miniattn import bigbird
from miniattn.core import kernels
from miniattn.methods import make_method
from miniattn.transformer import attention_backward, attention_forward

BACKENDS = kernels.available_backends()
EXACT = 1e-12  # float64 agreement of the sparse path with dense attention
GRAD_TOL = 1e-6  # gradcheck tolerance (max relative error)


def random_qkv(rng, shape):
    return tuple(rng.standard_normal(shape) for _ in range(3))


def pattern_counts(indptr, indices, n):
    """Count how often each (query, key) pair is listed, straight from the CSR arrays."""
    counts = np.zeros((n, n), dtype=np.int64)
    rows = np.repeat(np.arange(n), np.diff(indptr))
    np.add.at(counts, (rows, indices), 1)
    return counts


def assert_matches_dense(rng, q, k, v, allowed, logit_bias, *, mask=None, backend=None, **options):
    """Check forward and backward of bigbird.attention_forward against dense attention to 1e-12."""
    out, cache = bigbird.attention_forward(q, k, v, mask=mask, backend=backend, **options)
    dense_mask = allowed if mask is None else np.logical_and(allowed, mask)
    expected, dense_cache = attention_forward(q, k, v, mask=dense_mask, bias=logit_bias)
    assert cache["path"] == "block_sparse"
    np.testing.assert_allclose(out, expected, rtol=0, atol=EXACT)

    dout = rng.standard_normal(out.shape)
    grads = bigbird.attention_backward(dout, cache)
    expected_grads = attention_backward(dout, dense_cache)
    for name, grad, expected_grad in zip("qkv", grads, expected_grads):
        np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=EXACT, err_msg=f"d{name}")
    return out, grads


# --- pattern and dense specification ----------------------------------------------


@pytest.mark.parametrize("duplicates", ["merge", "count"])
@pytest.mark.parametrize("global_tokens", [None, (3, 10, 21)])
def test_pattern_matches_mask(rng, duplicates, global_tokens):
    n, block_size = 23, 2
    n_blocks = bigbird.n_blocks_for(n, block_size)
    random_blocks = bigbird.random_block_adjacency(n_blocks, 2, 3, rng)
    random_blocks[1, 4] = [0, 4]  # a global and a window block drawn again: keys reached twice
    allowed, logit_bias = bigbird.bigbird_mask(
        n, block_size, random_blocks, global_tokens=global_tokens, duplicates=duplicates
    )
    assert allowed.shape == (3, n, n)
    for head in range(3):
        indptr, indices = bigbird.bigbird_pattern(
            n, block_size, random_blocks[head], global_tokens=global_tokens, duplicates=duplicates
        )
        counts = pattern_counts(indptr, indices, n)
        np.testing.assert_array_equal(counts > 0, allowed[head])
        if duplicates == "merge":
            assert logit_bias is None
            assert counts.max() == 1
        else:
            np.testing.assert_allclose(logit_bias[head], np.log(np.maximum(counts, 1)), rtol=0, atol=0)
    if duplicates == "count":
        assert logit_bias[1].max() == pytest.approx(np.log(2))


def test_mask_edge_rows(rng):
    n, block_size, n_random = 40, 4, 2
    n_blocks = n // block_size
    random_blocks = bigbird.random_block_adjacency(n_blocks, n_random, 1, rng)[0]
    allowed, _ = bigbird.bigbird_mask(n, block_size, random_blocks)
    keys_per_row = allowed.sum(axis=1)  # (N,)
    block_of = np.arange(n) // block_size
    key_block_seen = allowed[:, ::block_size]  # (N, nb): whole blocks are seen or not

    for i in (0, n_blocks - 1):
        assert np.all(keys_per_row[block_of == i] == n)
    for i in (1, n_blocks - 2):
        assert np.all(keys_per_row[block_of == i] == (4 + n_random) * block_size)
    for i in range(2, n_blocks - 2):
        assert np.all(keys_per_row[block_of == i] == (5 + n_random) * block_size)

    row = 1 * block_size  # first query of block 1
    expected = {0, 1, 2, n_blocks - 1, *random_blocks[1]}
    assert set(np.flatnonzero(key_block_seen[row])) == expected
    row = (n_blocks - 2) * block_size  # first query of block nb - 2
    expected = {0, n_blocks - 3, n_blocks - 2, n_blocks - 1, *random_blocks[n_blocks - 2]}
    assert set(np.flatnonzero(key_block_seen[row])) == expected


def test_mask_partial_last_block():
    n, block_size = 22, 4  # blocks of 4, 4, 4, 4, 4, 2
    allowed, _ = bigbird.bigbird_mask(n, block_size, None)
    assert allowed.shape == (n, n)
    assert np.all(allowed[20:])  # the short last block is global
    assert np.all(allowed[:, 20:])
    np.testing.assert_array_equal(allowed[8], np.isin(np.arange(n) // 4, [0, 1, 2, 3, 5]))


# --- block-sparse path == dense masked attention -------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [24, 23, 21])
def test_dense_equality_merge(rng, backend, n):
    block_size, n_random, n_heads = 2, 2, 2
    n_blocks = bigbird.n_blocks_for(n, block_size)
    random_blocks = bigbird.random_block_adjacency(n_blocks, n_random, n_heads, rng)
    q, k, v = random_qkv(rng, (2, n_heads, n, 3))
    allowed, logit_bias = bigbird.bigbird_mask(n, block_size, random_blocks)
    assert logit_bias is None
    assert_matches_dense(
        rng, q, k, v, allowed, None, backend=backend,
        block_size=block_size, num_random_blocks=n_random, random_blocks=random_blocks,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_equality_count_duplicates(rng, backend):
    n, block_size, n_random, n_heads = 26, 2, 2, 2
    n_blocks = bigbird.n_blocks_for(n, block_size)
    random_blocks = np.zeros((n_heads, n_blocks, n_random), dtype=np.int64)  # every row draws block 0 twice
    random_blocks[1] = bigbird.random_block_adjacency(n_blocks, n_random, 1, rng)[0]
    random_blocks[1, 5] = [4, 5]  # head 1, block 5: two of its own window blocks
    q, k, v = random_qkv(rng, (1, n_heads, n, 4))
    allowed, logit_bias = bigbird.bigbird_mask(n, block_size, random_blocks, duplicates="count")
    assert logit_bias.max() == pytest.approx(np.log(3))  # block 0: global once, drawn twice
    counted, _ = assert_matches_dense(
        rng, q, k, v, allowed, logit_bias, backend=backend, block_size=block_size,
        num_random_blocks=n_random, random_blocks=random_blocks, duplicates="count",
    )

    merged, _ = bigbird.attention_forward(
        q, k, v, block_size=block_size, num_random_blocks=n_random, random_blocks=random_blocks,
        duplicates="merge", backend=backend,
    )
    allowed_merged, _ = bigbird.bigbird_mask(n, block_size, random_blocks, duplicates="merge")
    np.testing.assert_array_equal(allowed_merged, allowed)
    expected_merged, _ = attention_forward(q, k, v, mask=allowed)
    np.testing.assert_allclose(merged, expected_merged, rtol=0, atol=EXACT)
    assert np.max(np.abs(counted - merged)) > 1e-3  # the two rules really differ here


def test_value_width_differs(rng):
    n, block_size, n_random = 20, 2, 1
    random_blocks = bigbird.random_block_adjacency(10, n_random, 2, rng)
    q, k = random_qkv(rng, (2, 2, n, 3))[:2]
    v = rng.standard_normal((2, 2, n, 5))  # Dv = 5 != D = 3
    allowed, _ = bigbird.bigbird_mask(n, block_size, random_blocks)
    out, grads = assert_matches_dense(
        rng, q, k, v, allowed, None, block_size=block_size, num_random_blocks=n_random, random_blocks=random_blocks
    )
    assert out.shape == (2, 2, n, 5)
    assert grads[2].shape == v.shape


def test_rules_agree_without_duplicates(rng):
    n, block_size, n_random = 30, 2, 2
    random_blocks = bigbird.random_block_adjacency(15, n_random, 2, rng)
    q, k, v = random_qkv(rng, (1, 2, n, 3))
    options = dict(block_size=block_size, num_random_blocks=n_random, random_blocks=random_blocks)
    merged, _ = bigbird.attention_forward(q, k, v, duplicates="merge", **options)
    counted, _ = bigbird.attention_forward(q, k, v, duplicates="count", **options)
    np.testing.assert_allclose(counted, merged, rtol=0, atol=EXACT)


@pytest.mark.parametrize("duplicates", ["merge", "count"])
def test_dense_equality_etc_global_tokens(rng, duplicates):
    n, block_size, n_random = 27, 3, 1
    global_tokens = (0, 7, 8, 20)  # 7 and 8 fall inside window blocks of their neighbours
    n_blocks = bigbird.n_blocks_for(n, block_size)
    random_blocks = bigbird.random_block_adjacency(n_blocks, n_random, 2, rng, global_blocks=())
    q, k, v = random_qkv(rng, (2, 2, n, 3))
    allowed, logit_bias = bigbird.bigbird_mask(
        n, block_size, random_blocks, global_blocks=(), global_tokens=global_tokens, duplicates=duplicates
    )
    assert np.all(allowed[:, list(global_tokens), :])
    assert np.all(allowed[:, :, list(global_tokens)])
    assert not np.all(allowed[:, 1, :])  # token 1 is not global
    assert_matches_dense(
        rng, q, k, v, allowed, logit_bias, block_size=block_size, num_random_blocks=n_random,
        random_blocks=random_blocks, global_blocks=(), global_tokens=global_tokens, duplicates=duplicates,
    )
    if duplicates == "count":
        assert logit_bias.max() == pytest.approx(np.log(2))  # token 8 in its own window and a global column


def test_padding_equals_masked_padded_run(rng):
    n, block_size, n_random = 21, 4, 1  # nb = 6, the last block holds one token
    padded = 24
    random_blocks = bigbird.random_block_adjacency(6, n_random, 2, rng)
    q, k, v = random_qkv(rng, (2, 2, padded, 3))  # the last 3 positions are padding with garbage
    options = dict(block_size=block_size, num_random_blocks=n_random, random_blocks=random_blocks)
    key_is_real = np.arange(padded) < n  # (N_padded,)

    out, cache = bigbird.attention_forward(q[..., :n, :], k[..., :n, :], v[..., :n, :], **options)
    out_padded, cache_padded = bigbird.attention_forward(q, k, v, mask=key_is_real, **options)
    np.testing.assert_allclose(out, out_padded[..., :n, :], rtol=0, atol=EXACT)

    dout = rng.standard_normal(out.shape)
    dout_padded = np.zeros_like(out_padded)
    dout_padded[..., :n, :] = dout
    grads = bigbird.attention_backward(dout, cache)
    grads_padded = bigbird.attention_backward(dout_padded, cache_padded)
    for name, grad, grad_padded in zip("qkv", grads, grads_padded):
        np.testing.assert_allclose(grad, grad_padded[..., :n, :], rtol=0, atol=EXACT, err_msg=f"d{name}")
    for name, grad_padded in zip("kv", grads_padded[1:]):
        assert np.all(grad_padded[..., n:, :] == 0), f"padding keys got a gradient in d{name}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_zero(rng, backend):
    n, block_size, n_random = 20, 2, 1
    random_blocks = bigbird.random_block_adjacency(10, n_random, 2, rng)
    q, k, v = random_qkv(rng, (2, 2, n, 3))
    mask = np.ones((2, 2, n, n), dtype=bool)
    mask[0, :, :, :] = False  # batch 0: every key is padding
    mask[1, 1, [2, 9, 19], :] = False  # single rows with no key, in edge, middle and global blocks
    allowed, _ = bigbird.bigbird_mask(n, block_size, random_blocks)
    out, grads = assert_matches_dense(
        rng, q, k, v, allowed, None, mask=mask, backend=backend,
        block_size=block_size, num_random_blocks=n_random, random_blocks=random_blocks,
    )
    empty = ~mask.any(axis=-1)  # (B, H, N)
    assert np.all(out[empty] == 0)
    assert np.all(grads[0][empty] == 0)
    assert np.all(grads[1][0] == 0)  # batch 0 attends no key, so its keys and values get no gradient
    assert np.all(grads[2][0] == 0)
    assert np.all(np.isfinite(out))


def test_key_padding_mask_broadcast(rng):
    n, block_size, n_random = 25, 3, 1
    random_blocks = bigbird.random_block_adjacency(9, n_random, 2, rng)
    q, k, v = random_qkv(rng, (3, 2, n, 3))
    mask = miniattn.core.masks.padding_mask(np.array([25, 17, 4]), n)  # (B, 1, 1, N)
    allowed, _ = bigbird.bigbird_mask(n, block_size, random_blocks)
    assert_matches_dense(
        rng, q, k, v, allowed, None, mask=mask,
        block_size=block_size, num_random_blocks=n_random, random_blocks=random_blocks,
    )


# --- short sequences and all-global patterns ----------------------------------------


@pytest.mark.parametrize("n", [5, 13, 14])
def test_fallback_equals_dense(rng, n):
    block_size, n_random = 2, 1  # fallback for N <= (5 + 2) * 2 = 14
    q, k, v = random_qkv(rng, (2, 2, n, 3))
    out, cache = bigbird.attention_forward(q, k, v, block_size=block_size, num_random_blocks=n_random)
    expected, dense_cache = attention_forward(q, k, v)
    assert cache["path"] == "full"
    assert cache["random_blocks"] is None
    np.testing.assert_array_equal(out, expected)
    dout = rng.standard_normal(out.shape)
    for grad, expected_grad in zip(bigbird.attention_backward(dout, cache), attention_backward(dout, dense_cache)):
        np.testing.assert_array_equal(grad, expected_grad)


def test_fallback_with_mask(rng):
    q, k, v = random_qkv(rng, (2, 2, 12, 3))
    mask = rng.random((2, 1, 12, 12)) < 0.5
    out, cache = bigbird.attention_forward(q, k, v, block_size=2, num_random_blocks=1, mask=mask)
    expected, _ = attention_forward(q, k, v, mask=mask)
    assert cache["path"] == "full"
    np.testing.assert_array_equal(out, expected)


def test_fallback_threshold_and_block_size_above_n(rng):
    q, k, v = random_qkv(rng, (1, 1, 15, 2))
    _, cache = bigbird.attention_forward(q, k, v, block_size=2, num_random_blocks=1, rng=rng)
    assert cache["path"] == "block_sparse"  # 15 > 14
    _, cache = bigbird.attention_forward(q, k, v, block_size=64, num_random_blocks=3)
    assert cache["path"] == "full"  # block_size > N falls back instead of raising


def test_fallback_is_per_call(rng):
    method = make_method("bigbird", rng=rng, block_size=2, num_random_blocks=1)
    short = random_qkv(rng, (1, 2, 10, 3))
    long = random_qkv(rng, (1, 2, 22, 3))
    _, cache = method.forward(*short)
    assert cache["path"] == "full"
    assert method.keys_seen(cache) is None
    _, cache = method.forward(*long)
    assert cache["path"] == "block_sparse"
    _, cache = method.forward(*short)
    assert cache["path"] == "full"


@pytest.mark.parametrize("kind", ["global_blocks", "global_tokens"])
def test_all_global_equals_dense(rng, kind):
    n, block_size = 22, 2
    n_blocks = bigbird.n_blocks_for(n, block_size)
    options = {"global_blocks": tuple(range(n_blocks))} if kind == "global_blocks" else {
        "global_blocks": (), "global_tokens": np.arange(n)
    }
    random_blocks = np.zeros((2, n_blocks, 1), dtype=np.int64)  # not read: every row is global
    q, k, v = random_qkv(rng, (2, 2, n, 3))
    out, cache = bigbird.attention_forward(
        q, k, v, block_size=block_size, num_random_blocks=1, random_blocks=random_blocks, duplicates="count",
        **options,
    )
    expected, dense_cache = attention_forward(q, k, v)
    np.testing.assert_allclose(out, expected, rtol=0, atol=EXACT)
    dout = rng.standard_normal(out.shape)
    for grad, expected_grad in zip(bigbird.attention_backward(dout, cache), attention_backward(dout, dense_cache)):
        np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=EXACT)


# --- the random adjacency generator -----------------------------------------------------


def test_adjacency_avoids_window_and_global(rng):
    n_blocks, n_random, n_heads = 20, 3, 4
    random_blocks = bigbird.random_block_adjacency(n_blocks, n_random, n_heads, rng)
    assert random_blocks.shape == (n_heads, n_blocks, n_random)
    assert random_blocks.dtype == np.int64
    assert np.all(random_blocks[:, [0, -1]] == -1)
    for head in range(n_heads):
        for i in range(1, n_blocks - 1):
            drawn = random_blocks[head, i]
            assert len(set(drawn)) == n_random, f"head {head} block {i} repeats a block: {drawn}"
            assert not set(drawn) & {0, n_blocks - 1, i - 1, i, i + 1}, f"head {head} block {i}: {drawn}"


def test_adjacency_custom_global_blocks(rng):
    random_blocks = bigbird.random_block_adjacency(12, 4, 2, rng, global_blocks=(2, -3))
    assert np.all(random_blocks[:, [2, 9]] == -1)
    used = random_blocks[:, [0, 1, 3, 4, 5, 6, 7, 8, 10, 11]]
    assert not np.isin(used, [2, 9]).any()


def test_adjacency_heads_independent(rng):
    random_blocks = bigbird.random_block_adjacency(32, 3, 4, rng)
    for head in range(1, 4):
        assert not np.array_equal(random_blocks[0], random_blocks[head])


def test_adjacency_reproducible():
    first = bigbird.random_block_adjacency(16, 2, 3, np.random.default_rng(7))
    again = bigbird.random_block_adjacency(16, 2, 3, np.random.default_rng(7))
    other = bigbird.random_block_adjacency(16, 2, 3, np.random.default_rng(8))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_adjacency_too_few_candidates(rng):
    with pytest.raises(ValueError, match="num_random_blocks=3"):
        bigbird.random_block_adjacency(7, 3, 1, rng)  # block 3 has only blocks 1 and 5 left


def test_adjacency_zero_random_blocks(rng):
    random_blocks = bigbird.random_block_adjacency(10, 0, 2, rng)
    assert random_blocks.shape == (2, 10, 0)
    q, k, v = random_qkv(rng, (1, 2, 30, 3))
    allowed, _ = bigbird.bigbird_mask(30, 3, random_blocks)
    assert_matches_dense(rng, q, k, v, allowed, None, block_size=3, num_random_blocks=0, random_blocks=random_blocks)


# --- the method object ----------------------------------------------------------------


def test_method_keeps_adjacency(rng):
    method = make_method("bigbird", rng=rng, block_size=2, num_random_blocks=2)
    q, k, v = random_qkv(rng, (2, 3, 26, 3))
    out, cache = method.forward(q, k, v)
    again, cache_again = method.forward(q, k, v)
    assert cache_again["random_blocks"] is cache["random_blocks"]
    assert cache_again["patterns"] is cache["patterns"]
    np.testing.assert_array_equal(out, again)
    seen = method.keys_seen(cache)
    allowed, _ = bigbird.bigbird_mask(26, 2, cache["random_blocks"])
    np.testing.assert_array_equal(seen, np.broadcast_to(allowed, seen.shape))

    expected, dense_cache = attention_forward(q, k, v, mask=seen)
    np.testing.assert_allclose(out, expected, rtol=0, atol=EXACT)
    dout = rng.standard_normal(out.shape)
    for grad, expected_grad in zip(method.backward(dout, cache), attention_backward(dout, dense_cache)):
        np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=EXACT)


def test_method_keys_seen_with_mask(rng):
    method = make_method("bigbird", rng=rng, block_size=2, num_random_blocks=1)
    q, k, v = random_qkv(rng, (2, 2, 20, 3))
    mask = rng.random((2, 1, 20, 20)) < 0.6
    out, cache = method.forward(q, k, v, mask=mask)
    seen = method.keys_seen(cache)
    allowed, _ = bigbird.bigbird_mask(20, 2, cache["random_blocks"])
    np.testing.assert_array_equal(seen, allowed & mask)
    expected, _ = attention_forward(q, k, v, mask=seen)
    np.testing.assert_allclose(out, expected, rtol=0, atol=EXACT)


def test_patterns_argument_checked(rng):
    q, k, v = random_qkv(rng, (1, 2, 20, 2))
    random_blocks = bigbird.random_block_adjacency(10, 1, 2, rng)
    patterns = [bigbird.bigbird_pattern(20, 2, random_blocks[0])]
    with pytest.raises(ValueError, match="patterns has 1 entries"):
        bigbird.attention_forward(
            q, k, v, block_size=2, num_random_blocks=1, random_blocks=random_blocks, patterns=patterns
        )


def test_backends_agree(rng):
    if len(BACKENDS) < 2:
        pytest.skip("the compiled extension is not built")
    n, block_size = 40, 4
    random_blocks = np.zeros((2, 10, 2), dtype=np.int64)
    random_blocks[1] = bigbird.random_block_adjacency(10, 2, 1, rng)[0]
    q, k, v = random_qkv(rng, (2, 2, n, 5))
    results = {}
    for backend in BACKENDS:
        out, cache = bigbird.attention_forward(
            q, k, v, block_size=block_size, num_random_blocks=2, random_blocks=random_blocks,
            global_tokens=(5, 17), duplicates="count", backend=backend,
        )
        dout = np.ones_like(out)
        results[backend] = (out,) + tuple(bigbird.attention_backward(dout, cache))
    for numpy_array, cython_array in zip(results["numpy"], results["cython"]):
        np.testing.assert_allclose(cython_array, numpy_array, rtol=0, atol=EXACT)


def test_float32_matches_float64(rng):
    q, k, v = random_qkv(rng, (1, 2, 30, 4))
    random_blocks = bigbird.random_block_adjacency(15, 2, 2, rng)
    options = dict(block_size=2, num_random_blocks=2, random_blocks=random_blocks)
    out64, _ = bigbird.attention_forward(q, k, v, **options)
    out32, _ = bigbird.attention_forward(*(x.astype(np.float32) for x in (q, k, v)), **options)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out64, rtol=0, atol=1e-5)


def test_multihead_attention_layer(rng):
    from miniattn.transformer import init_mha_params, mha_backward, mha_forward

    x = rng.standard_normal((2, 24, 8))  # (B, N, C)
    params = init_mha_params(8, 2, rng)
    method = make_method("bigbird", rng=rng, block_size=2, num_random_blocks=1)
    mask = miniattn.core.masks.padding_mask(np.array([24, 19]), 24)  # (B, 1, 1, N)
    y, cache = mha_forward(x, x, params, n_heads=2, mask=mask, attention=method)
    seen = method.keys_seen(cache[5])  # (B, H, N, N): the pattern and the padding mask
    y_dense, cache_dense = mha_forward(x, x, params, n_heads=2, mask=seen)
    np.testing.assert_allclose(y, y_dense, rtol=0, atol=EXACT)

    dy = rng.standard_normal(y.shape)
    dx_q, dx_kv, dparams = mha_backward(dy, cache)
    dx_q_dense, dx_kv_dense, dparams_dense = mha_backward(dy, cache_dense)
    np.testing.assert_allclose(dx_q, dx_q_dense, rtol=0, atol=EXACT)
    np.testing.assert_allclose(dx_kv, dx_kv_dense, rtol=0, atol=EXACT)
    for name in dparams:
        np.testing.assert_allclose(dparams[name], dparams_dense[name], rtol=0, atol=1e-11, err_msg=name)


# --- causal attention -----------------------------------------------------------------


def causal_mask_by_definition(n, block_size, random_blocks, global_blocks, global_tokens):
    """The causal BigBird mask of one head, written out query by query (independent of bigbird_mask)."""
    n_blocks = bigbird.n_blocks_for(n, block_size)
    global_blocks = {block % n_blocks for block in global_blocks}
    global_tokens = set(global_tokens or ())
    allowed = np.zeros((n, n), dtype=bool)
    for i in range(n):
        query_block = i // block_size
        if query_block in global_blocks or i in global_tokens:
            allowed[i, : i + 1] = True  # a global row attends all of its past
            continue
        key_blocks = {query_block - 1, query_block} | global_blocks | {j for j in random_blocks[query_block] if j >= 0}
        for j in range(i + 1):
            allowed[i, j] = j // block_size in key_blocks or j in global_tokens
    return allowed


GLOBAL_SETTINGS = {
    "itc": dict(global_blocks=(0, -1), global_tokens=None),
    "etc": dict(global_blocks=(), global_tokens=(0, 7, 8, 20)),
    "both": dict(global_blocks=(0, -1), global_tokens=(10, 14)),
}


@pytest.mark.parametrize("setting", sorted(GLOBAL_SETTINGS))
def test_causal_mask_matches_definition(rng, setting):
    n, block_size, n_random, n_heads = 27, 3, 2, 3
    options = GLOBAL_SETTINGS[setting]
    n_blocks = bigbird.n_blocks_for(n, block_size)
    random_blocks = bigbird.random_block_adjacency(
        n_blocks, n_random, n_heads, rng, global_blocks=options["global_blocks"], causal=True
    )
    allowed, _ = bigbird.bigbird_mask(n, block_size, random_blocks, causal=True, **options)
    assert allowed.shape == (n_heads, n, n)
    assert not np.any(np.triu(allowed, k=1))  # nothing in the future
    assert np.all(np.diagonal(allowed, axis1=-2, axis2=-1))  # every query attends itself
    for head in range(n_heads):
        expected = causal_mask_by_definition(n, block_size, random_blocks[head], **options)
        np.testing.assert_array_equal(allowed[head], expected)


@pytest.mark.parametrize("duplicates", ["merge", "count"])
def test_causal_mask_is_bidirectional_past(rng, duplicates):
    n, block_size = 23, 2
    random_blocks = bigbird.random_block_adjacency(12, 2, 2, rng)  # bidirectional draw: no -1 entries
    options = dict(global_tokens=(5, 16), duplicates=duplicates)
    causal, causal_bias = bigbird.bigbird_mask(n, block_size, random_blocks, causal=True, **options)
    full, full_bias = bigbird.bigbird_mask(n, block_size, random_blocks, **options)
    past = miniattn.core.masks.causal_mask(n, n)
    np.testing.assert_array_equal(causal, full & past)
    if duplicates == "count":
        np.testing.assert_array_equal(causal_bias, np.where(past, full_bias, 0.0))


@pytest.mark.parametrize("duplicates", ["merge", "count"])
@pytest.mark.parametrize("global_tokens", [None, (3, 10, 21)])
def test_causal_pattern_matches_mask(rng, duplicates, global_tokens):
    n, block_size = 23, 2
    n_blocks = bigbird.n_blocks_for(n, block_size)
    random_blocks = bigbird.random_block_adjacency(n_blocks, 2, 3, rng, causal=True)
    random_blocks[1, 4] = [0, 3]  # the global block and the previous window block drawn again
    allowed, logit_bias = bigbird.bigbird_mask(
        n, block_size, random_blocks, global_tokens=global_tokens, duplicates=duplicates, causal=True
    )
    for head in range(3):
        indptr, indices = bigbird.bigbird_pattern(
            n, block_size, random_blocks[head], global_tokens=global_tokens, duplicates=duplicates, causal=True
        )
        counts = pattern_counts(indptr, indices, n)
        np.testing.assert_array_equal(counts > 0, allowed[head])
        if duplicates == "count":
            np.testing.assert_allclose(logit_bias[head], np.log(np.maximum(counts, 1)), rtol=0, atol=0)
    if duplicates == "count":
        assert logit_bias[1, 8, 6] == pytest.approx(np.log(2))  # query 8 (block 4), key 6 (block 3) twice


@pytest.mark.parametrize("duplicates", ["merge", "count"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [24, 23, 21])
def test_causal_dense_equality(rng, backend, n, duplicates):
    block_size, n_random, n_heads = 2, 2, 2
    n_blocks = bigbird.n_blocks_for(n, block_size)
    random_blocks = bigbird.random_block_adjacency(n_blocks, n_random, n_heads, rng, causal=True)
    if duplicates == "count":
        random_blocks[0, 1:-1] = 0  # head 0: every middle row draws the global block 0 twice
    q, k, v = random_qkv(rng, (2, n_heads, n, 3))
    allowed, logit_bias = bigbird.bigbird_mask(n, block_size, random_blocks, duplicates=duplicates, causal=True)
    assert_matches_dense(
        rng, q, k, v, allowed, logit_bias, backend=backend, block_size=block_size, num_random_blocks=n_random,
        random_blocks=random_blocks, duplicates=duplicates, causal=True,
    )


@pytest.mark.parametrize("duplicates", ["merge", "count"])
def test_causal_dense_equality_etc_global_tokens(rng, duplicates):
    n, block_size, n_random = 27, 3, 1
    global_tokens = (0, 7, 8, 20)
    n_blocks = bigbird.n_blocks_for(n, block_size)
    random_blocks = bigbird.random_block_adjacency(n_blocks, n_random, 2, rng, global_blocks=(), causal=True)
    q, k, v = random_qkv(rng, (2, 2, n, 3))
    allowed, logit_bias = bigbird.bigbird_mask(
        n, block_size, random_blocks, global_blocks=(), global_tokens=global_tokens, duplicates=duplicates,
        causal=True,
    )
    np.testing.assert_array_equal(allowed[:, 20, :21], True)  # a global token attends all of its past
    np.testing.assert_array_equal(allowed[:, 20:, 20], True)  # and every later query attends it
    assert not np.any(allowed[:, :20, 20])
    assert_matches_dense(
        rng, q, k, v, allowed, logit_bias, block_size=block_size, num_random_blocks=n_random,
        random_blocks=random_blocks, global_blocks=(), global_tokens=global_tokens, duplicates=duplicates,
        causal=True,
    )


@pytest.mark.parametrize("n", [5, 14])
def test_causal_fallback_equals_dense_causal(rng, n):
    method = make_method("bigbird", rng=rng, block_size=2, num_random_blocks=1)  # fallback for N <= 14
    q, k, v = random_qkv(rng, (2, 2, n, 3))
    out, cache = method.forward(q, k, v, causal=True)
    expected, dense_cache = attention_forward(q, k, v, causal=True)
    assert cache["path"] == "full"
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(method.keys_seen(cache), miniattn.core.masks.causal_mask(n, n))
    dout = rng.standard_normal(out.shape)
    for grad, expected_grad in zip(method.backward(dout, cache), attention_backward(dout, dense_cache)):
        np.testing.assert_array_equal(grad, expected_grad)


@pytest.mark.parametrize("global_tokens", [None, (4, 15)])
def test_causal_later_tokens_change_nothing_earlier(rng, global_tokens):
    n, n_heads = 30, 2
    method = make_method("bigbird", rng=rng, block_size=2, num_random_blocks=2, global_tokens=global_tokens)
    q, k, v = random_qkv(rng, (1, n_heads, n, 3))
    out, cache = method.forward(q, k, v, causal=True)
    assert cache["path"] == "block_sparse"
    for t in (3, 16, 29):
        changed = [x.copy() for x in (q, k, v)]
        for x in changed:
            x[..., t, :] += rng.standard_normal(3)
        out_changed, _ = method.forward(*changed, causal=True)
        np.testing.assert_array_equal(out_changed[..., :t, :], out[..., :t, :])
        assert np.max(np.abs(out_changed[..., t, :] - out[..., t, :])) > 1e-6

        dout = np.zeros_like(out)
        dout[..., :t, :] = rng.standard_normal((1, n_heads, t, 3))  # a loss on the outputs before t
        _, dk, dv = method.backward(dout, cache)
        assert np.all(dk[..., t:, :] == 0)
        assert np.all(dv[..., t:, :] == 0)


def test_causal_adjacency_legal_past_blocks(rng):
    n_blocks, n_random, n_heads = 20, 3, 4
    global_blocks = (0, 6, -1)
    random_blocks = bigbird.random_block_adjacency(
        n_blocks, n_random, n_heads, rng, global_blocks=global_blocks, causal=True
    )
    assert random_blocks.shape == (n_heads, n_blocks, n_random)
    assert np.all(random_blocks[:, [0, 6, n_blocks - 1]] == -1)
    for head in range(n_heads):
        for i in set(range(n_blocks)) - {0, 6, n_blocks - 1}:
            row = random_blocks[head, i]
            drawn = row[row >= 0]
            legal = [j for j in range(1, i - 1) if j != 6]  # strictly past, outside the window, not global
            assert drawn.size == min(n_random, len(legal)), f"head {head} block {i}: {row}"
            assert np.all(row[drawn.size :] == -1)  # unused slots come last
            assert set(drawn) <= set(legal)
            assert np.all(np.diff(drawn) > 0)  # distinct and sorted
    again = bigbird.random_block_adjacency(
        n_blocks, n_random, n_heads, np.random.default_rng(7), global_blocks=global_blocks, causal=True
    )
    same = bigbird.random_block_adjacency(
        n_blocks, n_random, n_heads, np.random.default_rng(7), global_blocks=global_blocks, causal=True
    )
    np.testing.assert_array_equal(again, same)
    other = bigbird.random_block_adjacency(
        n_blocks, n_random, n_heads, np.random.default_rng(8), global_blocks=global_blocks, causal=True
    )
    assert not np.array_equal(again, other)


def test_causal_fewer_past_blocks_than_r(rng):
    n, block_size, n_random = 24, 3, 3  # nb = 8; block i has i - 2 legal past blocks
    random_blocks = bigbird.random_block_adjacency(8, n_random, 1, rng, causal=True)[0]  # (nb, R)
    np.testing.assert_array_equal(random_blocks[1], [-1, -1, -1])
    np.testing.assert_array_equal(random_blocks[2], [-1, -1, -1])
    np.testing.assert_array_equal(random_blocks[3], [1, -1, -1])
    np.testing.assert_array_equal(random_blocks[4], [1, 2, -1])
    assert np.all(random_blocks[5:7] >= 0)  # three or more legal blocks: all R slots used
    allowed, _ = bigbird.bigbird_mask(n, block_size, random_blocks, causal=True)
    last_of_block_3 = 3 * block_size + 2
    np.testing.assert_array_equal(allowed[last_of_block_3], np.arange(n) <= last_of_block_3)  # blocks 0..3
    assert allowed[2 * block_size].sum() == 2 * block_size + 1  # block 2: blocks 0, 1 and itself, no random block
    first_of_block_6 = 6 * block_size  # block 6 draws 3 of its 4 legal blocks 1..4
    assert allowed[first_of_block_6].sum() == (2 + n_random) * block_size + 1  # blocks 0, 5, 3 random, itself


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_rows_never_empty_unless_padded(rng, backend):
    n, block_size, n_random = 20, 2, 1
    random_blocks = bigbird.random_block_adjacency(10, n_random, 2, rng, causal=True)
    q, k, v = random_qkv(rng, (2, 2, n, 3))
    options = dict(block_size=block_size, num_random_blocks=n_random, random_blocks=random_blocks, causal=True)
    allowed, _ = bigbird.bigbird_mask(n, block_size, random_blocks, causal=True)
    assert np.all(allowed.any(axis=-1))
    mask = np.ones((2, 1, 1, n), dtype=bool)
    mask[1, ..., :3] = False  # batch 1: the first three keys are left padding
    out, grads = assert_matches_dense(rng, q, k, v, allowed, None, mask=mask, backend=backend, **options)
    assert np.all(out[1, :, :3] == 0)  # queries 0..2 of batch 1 see only padding keys
    assert np.all(grads[0][1, :, :3] == 0)
    assert np.all(grads[1][1, :, :3] == 0)
    assert np.all(grads[2][1, :, :3] == 0)
    assert np.all(np.abs(out[0]).sum(axis=-1) > 0)
    assert np.all(np.isfinite(out))


def test_causal_method_keeps_its_own_adjacency(rng):
    method = make_method("bigbird", rng=rng, block_size=2, num_random_blocks=2)
    q, k, v = random_qkv(rng, (2, 3, 26, 3))
    out, cache = method.forward(q, k, v, causal=True)
    _, cache_bidirectional = method.forward(q, k, v)
    again, cache_again = method.forward(q, k, v, causal=True)
    assert cache_again["random_blocks"] is cache["random_blocks"]
    assert cache_bidirectional["random_blocks"] is not cache["random_blocks"]
    assert np.any(cache["random_blocks"] == -1)
    np.testing.assert_array_equal(out, again)
    seen = method.keys_seen(cache)
    allowed, _ = bigbird.bigbird_mask(26, 2, cache["random_blocks"], causal=True)
    np.testing.assert_array_equal(seen, np.broadcast_to(allowed, seen.shape))
    expected, dense_cache = attention_forward(q, k, v, mask=seen)
    np.testing.assert_allclose(out, expected, rtol=0, atol=EXACT)
    dout = rng.standard_normal(out.shape)
    for grad, expected_grad in zip(method.backward(dout, cache), attention_backward(dout, dense_cache)):
        np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=EXACT)


# --- gradient checks ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck_cases(seed):
    cases = bigbird.gradcheck_cases(np.random.default_rng(seed))
    assert len(cases) == 6
    assert sum("causal" in case[0] for case in cases) == 3
    for label, forward, backward, inputs, names in cases:
        _, cache = forward(*inputs)
        assert cache["path"] == "block_sparse", label
        result = miniattn.gradcheck(forward, backward, inputs, names=names, rng=np.random.default_rng(seed))
        assert result.max_rel_error <= GRAD_TOL, f"{label}\n{result}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_with_mask(rng, backend, causal):
    n = 18
    random_blocks = bigbird.random_block_adjacency(9, 1, 2, rng, causal=causal)
    mask = rng.random((1, 2, n, n)) < 0.7
    mask[0, 0, 4] = False  # one empty row

    def forward(q, k, v):
        return bigbird.attention_forward(
            q, k, v, block_size=2, num_random_blocks=1, random_blocks=random_blocks, mask=mask, backend=backend,
            causal=causal,
        )

    inputs = random_qkv(rng, (1, 2, n, 3))
    result = miniattn.gradcheck(forward, bigbird.attention_backward, inputs, names=("q", "k", "v"), rng=rng)
    result.assert_ok(GRAD_TOL)


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [0, -2])
def test_block_size_not_positive(rng, block_size):
    q, k, v = random_qkv(rng, (1, 1, 20, 2))
    with pytest.raises(ValueError, match="block_size"):
        bigbird.attention_forward(q, k, v, block_size=block_size, num_random_blocks=1, rng=rng)
    with pytest.raises(ValueError, match="block_size"):
        bigbird.bigbird_mask(20, block_size)
    with pytest.raises(ValueError, match="block_size"):
        make_method("bigbird", rng=rng, block_size=block_size)


def test_block_size_too_large():
    with pytest.raises(ValueError, match="block_size=21 is invalid for N=20"):
        bigbird.bigbird_mask(20, 21)
    with pytest.raises(ValueError, match="block_size=21 is invalid for N=20"):
        bigbird.bigbird_pattern(20, 21)


def test_block_size_not_integer(rng):
    with pytest.raises(TypeError, match="block_size"):
        bigbird.bigbird_mask(20, 2.0)


def test_num_random_blocks_negative(rng):
    q, k, v = random_qkv(rng, (1, 1, 20, 2))
    with pytest.raises(ValueError, match="num_random_blocks=-1"):
        bigbird.attention_forward(q, k, v, block_size=2, num_random_blocks=-1, rng=rng)
    with pytest.raises(ValueError, match="num_random_blocks=-1"):
        bigbird.random_block_adjacency(10, -1, 1, rng)
    with pytest.raises(ValueError, match="num_random_blocks=-1"):
        make_method("bigbird", rng=rng, num_random_blocks=-1)


@pytest.mark.parametrize("global_blocks, message", [
    ((0, 10), "out of range"),
    ((-11,), "out of range"),
    ((0, 0), "names a block twice"),
    ((0, -10), "names a block twice"),
])
def test_global_blocks_invalid(global_blocks, message):
    with pytest.raises(ValueError, match=message):
        bigbird.bigbird_mask(20, 2, global_blocks=global_blocks)
    with pytest.raises(ValueError, match=message):
        bigbird.bigbird_pattern(20, 2, global_blocks=global_blocks)


def test_global_blocks_not_a_sequence():
    with pytest.raises(TypeError, match="global_blocks"):
        bigbird.bigbird_mask(20, 2, global_blocks=3)


@pytest.mark.parametrize("global_tokens, message", [
    ((3, 20), "out of range"),
    ((-1,), "out of range"),
    ((4, 9, 4), "repeats positions \\[4\\]"),
])
def test_global_tokens_invalid(rng, global_tokens, message):
    with pytest.raises(ValueError, match=message):
        bigbird.bigbird_mask(20, 2, global_tokens=global_tokens)
    q, k, v = random_qkv(rng, (1, 1, 20, 2))
    with pytest.raises(ValueError, match=message):
        bigbird.attention_forward(q, k, v, block_size=2, num_random_blocks=1, rng=rng, global_tokens=global_tokens)


def test_global_tokens_not_integers():
    with pytest.raises(TypeError, match="global_tokens"):
        bigbird.bigbird_mask(20, 2, global_tokens=[1.5])


def test_random_blocks_invalid(rng):
    q, k, v = random_qkv(rng, (1, 2, 20, 2))
    options = dict(block_size=2, num_random_blocks=1)
    with pytest.raises(ValueError, match="shape"):
        bigbird.attention_forward(q, k, v, random_blocks=np.zeros((2, 9, 1), dtype=np.int64), **options)
    with pytest.raises(ValueError, match="shape"):
        bigbird.attention_forward(q, k, v, random_blocks=np.zeros((3, 10, 1), dtype=np.int64), **options)
    with pytest.raises(ValueError, match="num_random_blocks=1"):
        bigbird.attention_forward(q, k, v, random_blocks=np.zeros((2, 10, 2), dtype=np.int64), **options)
    bad = np.zeros((2, 10, 1), dtype=np.int64)
    bad[0, 4, 0] = 10
    with pytest.raises(ValueError, match="expected indices in \\[0, 10\\)"):
        bigbird.attention_forward(q, k, v, random_blocks=bad, **options)
    with pytest.raises(TypeError, match="random_blocks"):
        bigbird.attention_forward(q, k, v, random_blocks=np.zeros((2, 10, 1)), **options)
    with pytest.raises(ValueError, match="rng"):
        bigbird.attention_forward(q, k, v, **options)
    with pytest.raises(TypeError, match="random_blocks"):
        bigbird.bigbird_mask(20, 2, [[0]] * 10)


def test_minus_one_needs_causal(rng):
    q, k, v = random_qkv(rng, (1, 2, 20, 2))
    random_blocks = bigbird.random_block_adjacency(10, 1, 2, rng, causal=True)
    assert np.all(random_blocks[:, 1:3] == -1)  # blocks 1 and 2 have no legal past block
    options = dict(block_size=2, num_random_blocks=1, random_blocks=random_blocks)
    with pytest.raises(ValueError, match="-1 is allowed only with causal=True"):
        bigbird.attention_forward(q, k, v, **options)
    bigbird.attention_forward(q, k, v, causal=True, **options)
    bad = random_blocks.copy()
    bad[0, 5, 0] = -2
    with pytest.raises(ValueError, match="or -1 \\(no block, causal only\\)"):
        bigbird.attention_forward(q, k, v, causal=True, **dict(options, random_blocks=bad))


def test_causal_key_length_mismatch(rng):
    q = rng.standard_normal((1, 1, 20, 2))
    k = v = rng.standard_normal((1, 1, 24, 2))
    with pytest.raises(ValueError, match="N=20 queries and M=24 keys"):
        bigbird.attention_forward(q, k, v, block_size=2, num_random_blocks=1, rng=rng, causal=True)


def test_key_length_mismatch(rng):
    q = rng.standard_normal((1, 1, 20, 2))
    k = v = rng.standard_normal((1, 1, 24, 2))
    with pytest.raises(ValueError, match="N=20 queries and M=24 keys"):
        bigbird.attention_forward(q, k, v, block_size=2, num_random_blocks=1, rng=rng)


def test_missing_head_axis(rng):
    q, k, v = random_qkv(rng, (20, 2))
    with pytest.raises(ValueError, match="head axis"):
        bigbird.attention_forward(q, k, v, block_size=2, num_random_blocks=1, rng=rng)


def test_duplicates_rule_invalid(rng):
    with pytest.raises(ValueError, match="duplicates='twice'"):
        bigbird.bigbird_mask(20, 2, duplicates="twice")
    with pytest.raises(ValueError, match="duplicates='twice'"):
        make_method("bigbird", rng=rng, duplicates="twice")


def test_rng_not_generator():
    with pytest.raises(TypeError, match="rng"):
        make_method("bigbird", rng=np.random.RandomState(0))
