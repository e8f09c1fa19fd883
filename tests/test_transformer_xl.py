"""Transformer-XL: relative shift, relative attention, segment recurrence, gradients."""

import numpy as np
import pytest

from miniattn import gradcheck, methods
from miniattn.core import kernels
from miniattn.transformer import attention_backward, attention_forward, merge_heads, split_heads
from miniattn.transformer_xl import (
    LAYER_PARAM_NAMES,
    XLConfig,
    decoder_backward,
    decoder_forward,
    empty_memory,
    gradcheck_cases,
    init_layer_params,
    layer_backward,
    layer_forward,
    make_method,
    process_segments,
    process_segments_backward,
    recurrence_mask,
    rel_shift,
    rel_shift_adjoint,
    rel_shift_gather,
    rel_shift_gather_adjoint,
    relative_attention_backward,
    relative_attention_forward,
    relative_distances,
    relative_mask,
    relative_positions,
    relative_scores,
    score_terms,
    sinusoid_embeddings,
    update_memory,
    xl_attention_backward,
    xl_attention_forward,
)

# (N queries, Mem memory length) pairs; M = Mem + N keys.
SHAPES = [(4, 0), (4, 3), (3, 5), (1, 4), (5, 1)]
# The finite-difference step of the gradient checks. At the default 1e-6 the
# round-off of L(x +- h u) on these losses reaches a few 1e-7 of the largest
# gradient; 1e-5 keeps truncation and round-off near 1e-8.
FD_STEP = 1e-5


def random_heads(rng, n_queries, n_keys, *, batch=2, n_heads=2, width=4):
    q = rng.standard_normal((batch, n_heads, n_queries, width))
    k = rng.standard_normal((batch, n_heads, n_keys, width))
    v = rng.standard_normal((batch, n_heads, n_keys, width))
    return q, k, v


def project_positions(positions, w_r, n_heads):
    """r (H, P, D) = split_heads(R W_r), written out here independently of the module."""
    flat = positions @ w_r  # (P, H D)
    return flat.reshape(flat.shape[0], n_heads, -1).transpose(1, 0, 2)


# --- relative positions and the shift ---------------------------------------------------


def test_distances_descend_and_clamp():
    assert relative_distances(3, 5).tolist() == [4, 3, 2, 1, 0]
    assert relative_distances(3, 5, causal=False).tolist() == [4, 3, 2, 1, 0, -1, -2]
    assert relative_distances(3, 5, causal=False, clamp_len=1).tolist() == [1, 1, 1, 1, 0, -1, -1]


def test_sinusoids_put_sines_then_cosines():
    embedding = sinusoid_embeddings(np.array([2.0]), 4)
    expected = [np.sin(2.0), np.sin(2.0 / 100.0), np.cos(2.0), np.cos(2.0 / 100.0)]
    np.testing.assert_allclose(embedding[0], expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("n_queries, mem_length", SHAPES)
def test_pad_reshape_shift_reads_relative_column(rng, n_queries, mem_length):
    n_keys = n_queries + mem_length
    raw = rng.standard_normal((2, 3, n_queries, n_keys))
    shifted = rel_shift(raw)
    for i in range(n_queries):
        for j in range(n_keys):
            if j <= i + mem_length:
                assert shifted[..., i, j].tolist() == raw[..., i, j + n_queries - 1 - i].tolist()
            elif j == i + mem_length + 1:
                assert np.all(shifted[..., i, j] == 0)


@pytest.mark.parametrize("n_queries, mem_length", SHAPES)
def test_gather_equals_pad_reshape_on_allowed_region(rng, n_queries, mem_length):
    n_keys = n_queries + mem_length
    raw = rng.standard_normal((2, 3, n_queries, n_keys))
    allowed = relative_mask(n_queries, n_keys, causal=True)
    gathered = rel_shift_gather(raw, n_keys)
    padded = rel_shift(raw)
    assert np.array_equal(np.where(allowed, gathered, 0.0), np.where(allowed, padded, 0.0))
    assert np.all(gathered[..., ~allowed] == 0)


@pytest.mark.parametrize("n_queries, mem_length", SHAPES)
def test_shift_adjoint_identity(rng, n_queries, mem_length):
    n_keys = n_queries + mem_length
    x = rng.standard_normal((2, 3, n_queries, n_keys))
    g = rng.standard_normal((2, 3, n_queries, n_keys))
    lhs = np.sum(rel_shift(x) * g)
    rhs = np.sum(x * rel_shift_adjoint(g))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))

    for n_positions in (n_keys, n_keys + n_queries - 1):  # causal and bidirectional
        x = rng.standard_normal((2, 3, n_queries, n_positions))
        lhs = np.sum(rel_shift_gather(x, n_keys) * g)
        rhs = np.sum(x * rel_shift_gather_adjoint(g, n_positions))
        assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))


@pytest.mark.parametrize("backend", kernels.available_backends())
def test_gather_adjoint_backends_agree(rng, backend):
    g = rng.standard_normal((2, 3, 4, 6))
    for n_positions in (6, 9):
        expected = rel_shift_gather_adjoint(g, n_positions, backend="numpy")
        assert np.array_equal(rel_shift_gather_adjoint(g, n_positions, backend=backend), expected)


def test_gather_adjoint_sends_nothing_to_unread_columns(rng):
    n_queries, n_keys = 4, 6
    g = rng.standard_normal((n_queries, n_keys))
    back = rel_shift_gather_adjoint(g, n_keys)
    index = np.arange(n_keys)[None, :] + n_queries - 1 - np.arange(n_queries)[:, None]
    for i in range(n_queries):
        unread = set(range(n_keys)) - set(index[i][index[i] < n_keys].tolist())
        assert all(back[i, t] == 0 for t in unread)


# --- relative attention -----------------------------------------------------------------------


@pytest.mark.parametrize("n_queries, mem_length", SHAPES)
@pytest.mark.parametrize("clamp_len", [None, 2])
@pytest.mark.parametrize("shift", ["gather", "pad_reshape"])
def test_shifted_scores_match_direct_loop(rng, n_queries, mem_length, clamp_len, shift):
    n_keys, n_heads, width, position_width = n_queries + mem_length, 2, 3, 6
    q, k, _ = random_heads(rng, n_queries, n_keys, n_heads=n_heads, width=width)
    u, v_bias = rng.standard_normal((n_heads, width)), rng.standard_normal((n_heads, width))
    w_r = rng.standard_normal((position_width, n_heads * width))
    positions = relative_positions(n_queries, n_keys, position_width, clamp_len=clamp_len)
    r = project_positions(positions, w_r, n_heads)
    content, position, _, _, _ = relative_scores(q, k, r, u, v_bias, shift=shift)
    scores = content + position

    for i in range(n_queries):
        for j in range(i + mem_length + 1):  # the allowed keys of query i
            distance = (i + mem_length) - j
            if clamp_len is not None:
                distance = min(distance, clamp_len)
            r_direct = project_positions(sinusoid_embeddings(np.array([distance]), position_width), w_r, n_heads)
            expected = np.einsum("bhd,bhd->bh", q[:, :, i] + u, k[:, :, j]) + np.einsum(
                "bhd,hd->bh", q[:, :, i] + v_bias, r_direct[:, 0]
            )
            np.testing.assert_allclose(scores[:, :, i, j], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_queries, mem_length", [(3, 2), (4, 0), (2, 5)])
def test_bidirectional_scores_match_direct_loop(rng, n_queries, mem_length):
    n_keys, n_heads, width = n_queries + mem_length, 2, 3
    q, k, _ = random_heads(rng, n_queries, n_keys, n_heads=n_heads, width=width)
    u, v_bias = rng.standard_normal((n_heads, width)), rng.standard_normal((n_heads, width))
    w_r = rng.standard_normal((4, n_heads * width))
    r = project_positions(relative_positions(n_queries, n_keys, 4, causal=False), w_r, n_heads)
    content, position, _, _, _ = relative_scores(q, k, r, u, v_bias)
    scores = content + position
    for i in range(n_queries):
        for j in range(n_keys):  # every key, including those after the query
            r_direct = project_positions(sinusoid_embeddings(np.array([i + mem_length - j]), 4), w_r, n_heads)
            expected = np.einsum("bhd,bhd->bh", q[:, :, i] + u, k[:, :, j]) + np.einsum(
                "bhd,hd->bh", q[:, :, i] + v_bias, r_direct[:, 0]
            )
            np.testing.assert_allclose(scores[:, :, i, j], expected, rtol=0, atol=1e-12)


def test_four_terms_sum_to_scores(rng):
    q, k, _ = random_heads(rng, 3, 7, n_heads=2, width=3)
    u, v_bias, r = rng.standard_normal((2, 3)), rng.standard_normal((2, 3)), rng.standard_normal((2, 7, 3))
    content, position, _, _, _ = relative_scores(q, k, r, u, v_bias)
    terms = score_terms(q, k, r, u, v_bias)
    np.testing.assert_allclose(terms["a"] + terms["c"], content, rtol=0, atol=1e-12)
    np.testing.assert_allclose(terms["b"] + terms["d"], position, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_equals_dense_with_position_bias(rng, causal):
    """Relative attention is dense attention of q + u with the shifted (q + v).r as a logit bias."""
    n_queries, n_keys, width = 3, 7, 4
    q, k, v = random_heads(rng, n_queries, n_keys, width=width)
    u, v_bias = rng.standard_normal((2, width)), rng.standard_normal((2, width))
    n_positions = n_keys if causal else n_keys + n_queries - 1
    r = rng.standard_normal((2, n_positions, width))
    out, cache = relative_attention_forward(q, k, v, r, u, v_bias, causal=causal)
    _, position, _, _, _ = relative_scores(q, k, r, u, v_bias)
    dense_out, dense_cache = attention_forward(
        q + u[:, None, :], k, v, bias=position / np.sqrt(width), causal=causal, bias_grad=True
    )
    np.testing.assert_allclose(out, dense_out, rtol=0, atol=1e-12)

    dout = rng.standard_normal(out.shape)
    dq, dk, dv, _, du, _ = relative_attention_backward(dout, cache)
    dense_dq, dense_dk, dense_dv, _ = attention_backward(dout, dense_cache)
    np.testing.assert_allclose(dk, dense_dk, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dv, dense_dv, rtol=0, atol=1e-12)
    np.testing.assert_allclose(du, dense_dq.sum(axis=(0, 2)), rtol=0, atol=1e-12)


def test_zero_parameters_reduce_to_dense_attention(rng):
    method = make_method(rng, init="zeros")
    q, k, v = random_heads(rng, 3, 6)
    for causal in (True, False):
        out, _ = method.forward(q, k, v, causal=causal)
        dense_out, _ = attention_forward(q, k, v, causal=causal)
        np.testing.assert_allclose(out, dense_out, rtol=0, atol=1e-12)


def test_same_length_rows_see_mem_len_keys():
    allowed = relative_mask(4, 10, causal=True, window=5)
    assert allowed.sum(axis=-1).tolist() == [5, 5, 5, 5]
    assert allowed[0].tolist() == [False, False, True, True, True, True, True, False, False, False]


def test_fully_masked_rows_give_zero_output(rng):
    q, k, v = random_heads(rng, 3, 5)
    r, u, v_bias = rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 4)), rng.standard_normal((2, 4))
    mask = np.ones((3, 5), dtype=bool)
    mask[1] = False
    out, cache = relative_attention_forward(q, k, v, r, u, v_bias, mask=mask)
    grads = relative_attention_backward(rng.standard_normal(out.shape), cache)
    assert np.all(out[..., 1, :] == 0)
    assert np.all(grads[0][..., 1, :] == 0)
    assert all(np.all(np.isfinite(grad)) for grad in grads)


# --- gradient checks ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck_cases_pass(seed):
    rng = np.random.default_rng(seed)
    for label, forward, backward, inputs, names in gradcheck_cases(rng):
        result = gradcheck(forward, backward, inputs, names=names, rng=rng, eps=FD_STEP)
        assert result.max_rel_error <= 1e-6, f"{label}\n{result}"


@pytest.mark.parametrize("causal", [True, False])
def test_method_object_gradcheck(rng, causal):
    method = make_method(rng, clamp_len=3)
    q, k, v = (0.5 * x for x in random_heads(rng, 3, 5, width=3))
    params = method.parameters(2, 3)

    def forward(q, k, v, w_r, u, v_bias):
        return xl_attention_forward(q, k, v, w_r, u, v_bias, causal=causal, clamp_len=3)

    out, cache = method.forward(q, k, v, causal=causal)
    reference, _ = forward(q, k, v, params["W_r"], params["u"], params["v_bias"])
    assert np.array_equal(out, reference)
    dout = rng.standard_normal(out.shape)
    dq, dk, dv = method.backward(dout, cache)
    assert dq.shape == q.shape
    assert dk.shape == k.shape
    assert dv.shape == v.shape
    assert method.grads["W_r"].shape == params["W_r"].shape

    inputs = [q, k, v, params["W_r"], params["u"], params["v_bias"]]
    result = gradcheck(forward, xl_attention_backward, inputs, names=["q", "k", "v", "W_r", "u", "v"],
                       rng=rng, eps=FD_STEP)
    result.assert_ok(1e-6)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_decoder_gradcheck_with_memory(rng, norm):
    """Two layers on one segment (N=3) after a memory of 4: every parameter of both layers."""
    config = XLConfig(n_heads=2, mem_len=4, norm=norm, clamp_len=5)
    params = [init_layer_params(4, 2, 6, rng) for _ in range(2)]
    for layer in params:
        layer["u"] = rng.standard_normal(layer["u"].shape)
        layer["v"] = rng.standard_normal(layer["v"].shape)
    mems = [rng.standard_normal((2, 4, 4)) for _ in range(2)]
    x = rng.standard_normal((2, 3, 4))
    names = [f"{name}[{layer}]" for layer in range(2) for name in LAYER_PARAM_NAMES]

    def forward(x, *values):
        layers = [dict(zip(LAYER_PARAM_NAMES, values[15 * i:15 * (i + 1)])) for i in range(2)]
        out, _, cache = decoder_forward(x, mems, layers, config)
        return out, cache

    def backward(dout, cache):
        dx, dparams = decoder_backward(dout, cache)
        return (dx, *(layer[name] for layer in dparams for name in LAYER_PARAM_NAMES))

    inputs = [x] + [layer[name] for layer in params for name in LAYER_PARAM_NAMES]
    result = gradcheck(forward, backward, inputs, names=["x"] + names, rng=rng, eps=FD_STEP)
    result.assert_ok(1e-6)


def test_layer_gradcheck_with_dropout(rng):
    """Dropout masks are redrawn from the same seed at every call, so they stay fixed."""
    config = XLConfig(n_heads=2, mem_len=3, dropout=0.3)
    params = init_layer_params(4, 2, 6, rng)
    mem = rng.standard_normal((2, 3, 4))
    names = ["W_q", "W_k", "W_v", "W_r", "W_o", "u", "v"]

    def forward(h, *values):
        layer = dict(params, **dict(zip(names, values)))
        return layer_forward(h, mem, layer, config, rng=np.random.default_rng(7))

    def backward(dout, cache):
        dh, dparams = layer_backward(dout, cache)
        return (dh, *(dparams[name] for name in names))

    inputs = [rng.standard_normal((2, 3, 4))] + [params[name] for name in names]
    result = gradcheck(forward, backward, inputs, names=["h"] + names, rng=rng, eps=FD_STEP)
    result.assert_ok(1e-6)


def test_float32_runs_and_stays_float32(rng):
    method = make_method(rng)
    q, k, v = (x.astype(np.float32) for x in random_heads(rng, 3, 5))
    out, cache = method.forward(q, k, v, causal=True)
    dq, dk, dv = method.backward(np.ones_like(out), cache)
    assert out.dtype == np.float32
    assert dq.dtype == np.float32
    assert dk.dtype == np.float32

    config = XLConfig(n_heads=2, mem_len=3)
    layers = [{name: value.astype(np.float32) for name, value in init_layer_params(4, 2, 8, rng).items()}]
    x = rng.standard_normal((1, 7, 4)).astype(np.float32)
    out, mems, caches = process_segments(x, layers, config, 3)
    dx, _ = process_segments_backward(np.ones_like(out), caches)
    assert out.dtype == np.float32
    assert dx.dtype == np.float32
    assert mems[0].shape == (1, 3, 4)


# --- segment recurrence ---------------------------------------------------------------------------


def banded_mask(total_len, segment_len):
    """j <= i and seg(j) >= seg(i) - 1, written from the definition."""
    segment = np.arange(total_len) // segment_len
    rows, cols = np.arange(total_len)[:, None], np.arange(total_len)[None, :]
    return (cols <= rows) & (segment[None, :] >= segment[:, None] - 1)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_recurrence_equals_one_banded_pass(rng, norm):
    segment_len, n_segments, width = 4, 3, 8
    config = XLConfig(n_heads=2, mem_len=segment_len, norm=norm)
    params = [init_layer_params(width, 2, 16, rng) for _ in range(2)]
    x = rng.standard_normal((2, segment_len * n_segments, width))

    recurrent, _, _ = process_segments(x, params, config, segment_len)
    one_pass, _, _ = decoder_forward(
        x, empty_memory(2, 2, width), params, config, mask=banded_mask(x.shape[1], segment_len)
    )
    np.testing.assert_allclose(recurrent, one_pass, rtol=0, atol=1e-12)
    assert np.array_equal(banded_mask(x.shape[1], segment_len), recurrence_mask(x.shape[1], segment_len, segment_len))


@pytest.mark.parametrize("mem_len, same_length", [(6, False), (6, True), (2, False)])
def test_recurrence_equals_one_pass_other_memory_lengths(rng, mem_len, same_length):
    segment_len, width = 3, 4
    config = XLConfig(n_heads=2, mem_len=mem_len, same_length=same_length)
    params = [init_layer_params(width, 2, 8, rng) for _ in range(2)]
    x = rng.standard_normal((1, 10, width))  # the last segment is shorter
    recurrent, _, _ = process_segments(x, params, config, segment_len)
    mask = recurrence_mask(10, segment_len, mem_len, same_length=same_length)
    one_pass, _, _ = decoder_forward(x, empty_memory(2, 1, width), params, XLConfig(n_heads=2, mem_len=0), mask=mask)
    np.testing.assert_allclose(recurrent, one_pass, rtol=0, atol=1e-12)


def test_stop_gradient_blocks_earlier_segments(rng):
    segment_len, width = 3, 4
    config = XLConfig(n_heads=2, mem_len=segment_len)
    params = [init_layer_params(width, 2, 8, rng) for _ in range(2)]
    x = rng.standard_normal((2, 2 * segment_len, width))
    out, _, caches = process_segments(x, params, config, segment_len)

    dout = np.zeros_like(out)
    dout[:, segment_len:] = rng.standard_normal((2, segment_len, width))  # loss on segment 2 only
    dx, dparams = process_segments_backward(dout, caches)
    assert np.all(dx[:, :segment_len] == 0)
    assert np.abs(dx[:, segment_len:]).max() > 0
    assert np.abs(dparams[0]["W_k"]).max() > 0

    # The forward does depend on segment 1 through the memory: the zero is the stop-gradient.
    nudged = x.copy()
    nudged[:, 0] += 1e-3
    nudged_out, _, _ = process_segments(nudged, params, config, segment_len)
    assert np.abs(nudged_out[:, segment_len:] - out[:, segment_len:]).max() > 1e-8


def test_memory_update_keeps_last_positions(rng):
    mem = rng.standard_normal((1, 2, 3))
    hidden = rng.standard_normal((1, 4, 3))
    joined = np.concatenate([mem, hidden], axis=1)
    assert np.array_equal(update_memory(mem, hidden, 3), joined[:, 3:6])
    assert np.array_equal(update_memory(mem, hidden, 3, ext_len=1), joined[:, 2:5])
    assert np.array_equal(update_memory(mem, hidden, 10), joined)
    assert update_memory(mem, hidden, 0).shape == (1, 0, 3)


def test_memory_length_grows_to_mem_len(rng):
    config = XLConfig(n_heads=2, mem_len=5)
    params = [init_layer_params(4, 2, 8, rng) for _ in range(3)]
    mems = empty_memory(3, 1, 4)
    lengths = []
    for _ in range(3):
        _, mems, _ = decoder_forward(rng.standard_normal((1, 2, 4)), mems, params, config)
        lengths.append(mems[0].shape[1])
    assert lengths == [2, 4, 5]


# --- registry and method object -------------------------------------------------------------------


def test_registry_builds_the_method(rng):
    assert methods.is_implemented("transformer_xl")
    method = methods.make_method("transformer_xl", rng=rng)
    q, k, v = random_heads(rng, 3, 5)
    out, cache = method.forward(q, k, v, causal=True)
    assert out.shape == q.shape
    assert method.keys_seen(cache).tolist() == relative_mask(3, 5).tolist()
    _, cache = method.forward(q, k, v)
    assert method.keys_seen(cache) is None


def test_method_draws_parameters_from_rng():
    first = make_method(np.random.default_rng(3)).parameters(2, 4)
    second = make_method(np.random.default_rng(3)).parameters(2, 4)
    assert np.array_equal(first["W_r"], second["W_r"])
    assert first["W_r"].shape == (8, 8)
    assert first["u"].shape == (2, 4)


def test_multi_head_helpers_round_trip(rng):
    x = rng.standard_normal((2, 5, 6))
    assert np.array_equal(merge_heads(split_heads(x, 3)), x)


# --- bad input ------------------------------------------------------------------------------------


def test_negative_memory_length_rejected(rng):
    with pytest.raises(ValueError, match="mem_len=-1"):
        XLConfig(n_heads=2, mem_len=-1)
    with pytest.raises(ValueError, match="mem_len=-2"):
        update_memory(np.zeros((1, 0, 4)), np.zeros((1, 3, 4)), -2)
    q, k, v = random_heads(rng, 5, 3)
    with pytest.raises(ValueError, match="M - N=-2"):
        relative_attention_forward(q, k, v, np.zeros((2, 3, 4)), np.zeros((2, 4)), np.zeros((2, 4)))


def test_memory_of_wrong_width_rejected(rng):
    config = XLConfig(n_heads=2, mem_len=4)
    params = init_layer_params(4, 2, 8, rng)
    with pytest.raises(ValueError, match=r"mem has shape \(2, 4, 6\)"):
        layer_forward(np.zeros((2, 3, 4)), np.zeros((2, 4, 6)), params, config)
    with pytest.raises(ValueError, match=r"mem has shape \(3, 4, 4\)"):
        layer_forward(np.zeros((2, 3, 4)), np.zeros((3, 4, 4)), params, config)


def test_short_position_embeddings_rejected(rng):
    q, k, v = random_heads(rng, 3, 5)
    u = v_bias = np.zeros((2, 4))
    with pytest.raises(ValueError, match="P=4 position rows, which do not cover M=5"):
        relative_attention_forward(q, k, v, np.zeros((2, 4, 4)), u, v_bias)
    with pytest.raises(ValueError, match="P=5 position rows.*M \\+ N - 1 = 7"):
        relative_attention_forward(q, k, v, np.zeros((2, 5, 4)), u, v_bias, causal=False)


def test_invalid_options_rejected(rng):
    q, k, v = random_heads(rng, 3, 5)
    r, u = np.zeros((2, 7, 4)), np.zeros((2, 4))
    with pytest.raises(ValueError, match="pad_reshape"):
        relative_attention_forward(q, k, v, r, u, u, causal=False, shift="pad_reshape")
    with pytest.raises(ValueError, match=r"u has shape \(3, 4\); expected \(H, D\)"):
        relative_attention_forward(q, k, v, r[:, :5], np.zeros((3, 4)), u)
    with pytest.raises(ValueError, match="same_length=True needs mem_len >= 1"):
        XLConfig(n_heads=2, mem_len=0, same_length=True)
    with pytest.raises(ValueError, match="init='ones'"):
        make_method(rng, init="ones")
    with pytest.raises(TypeError, match="float32 or float64"):
        relative_attention_forward(q.astype(np.int64), k, v, r[:, :5], u, u)
