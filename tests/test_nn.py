"""Layer classes and encoder/decoder layers: gradient checks of inputs and every parameter.

Every check runs in float64 with a random upstream gradient and a maximum
relative error tolerance of 1e-6 (TOL). Sequence lengths are >= 3 and
cross-attention uses N != M.
"""

import numpy as np
import pytest

from miniattn.core import kernels
from miniattn.core.masks import padding_mask
from miniattn.methods import make_method, method_names, is_implemented
from miniattn.nn import (
    CrossEntropyLoss,
    DecoderLayer,
    Dropout,
    Embedding,
    EncoderLayer,
    FeedForward,
    LayerNorm,
    Linear,
    MultiHeadAttention,
    gradcheck_module,
)
from miniattn.transformer import DenseAttention, attention_forward, attention_probabilities

TOL = 1e-6


def check(module, forward, backward, inputs, input_names, rng, **options):
    result = gradcheck_module(module, forward, backward, inputs, input_names=input_names, rng=rng, **options)
    result.assert_ok(TOL)
    return result


def parameter_rows(result, module):
    return [row.name for row in result.inputs if row.name in module.parameters()]


# --- Linear, LayerNorm, FeedForward --------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradcheck(seed, bias):
    rng = np.random.default_rng(seed)
    layer = Linear(4, 5, bias=bias, rng=rng)
    x = rng.standard_normal((2, 3, 4))
    result = check(layer, layer.forward, layer.backward, [x], ["x"], rng)
    assert parameter_rows(result, layer) == (["weight", "bias"] if bias else ["weight"])


@pytest.mark.parametrize("seed", [0, 1])
def test_layer_norm_gradcheck(seed):
    rng = np.random.default_rng(seed)
    layer = LayerNorm(5)
    layer.params["gamma"][:] = rng.uniform(0.5, 1.5, 5)
    layer.params["beta"][:] = rng.standard_normal(5)
    x = rng.standard_normal((2, 3, 5))
    result = check(layer, layer.forward, layer.backward, [x], ["x"], rng)
    assert parameter_rows(result, layer) == ["gamma", "beta"]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_feed_forward_gradcheck(seed, activation):
    rng = np.random.default_rng(seed)
    layer = FeedForward(4, 6, activation=activation, rng=rng)
    layer.params["b1"][:] = 0.1 * rng.standard_normal(6)
    x = rng.standard_normal((2, 3, 4))
    result = check(layer, layer.forward, layer.backward, [x], ["x"], rng)
    assert parameter_rows(result, layer) == ["W1", "b1", "W2", "b2"]


def test_feed_forward_relu_zeroes_negative_hidden(rng):
    layer = FeedForward(3, 4, activation="relu", rng=rng)
    x = rng.standard_normal((5, 3))
    y, _ = layer.forward(x)
    hidden = np.maximum(x @ layer.params["W1"] + layer.params["b1"], 0)
    np.testing.assert_allclose(y, hidden @ layer.params["W2"] + layer.params["b2"], rtol=1e-12)


# --- Embedding ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_embedding_gradcheck_with_duplicate_ids(seed):
    rng = np.random.default_rng(seed)
    layer = Embedding(6, 4, rng=rng)
    ids = np.array([[0, 3, 3, 5], [3, 1, 0, 0]])

    def forward():
        return layer.forward(ids)

    def backward(dy, cache):
        layer.backward(dy, cache)
        return ()

    result = check(layer, forward, backward, [], [], rng)
    assert parameter_rows(result, layer) == ["weight"]


@pytest.mark.parametrize("backend", kernels.available_backends())
def test_embedding_backward_accumulates_duplicates(rng, backend, monkeypatch):
    monkeypatch.setattr(kernels, "DEFAULT_BACKEND", backend)
    layer = Embedding(5, 3, rng=rng)
    ids = np.array([[2, 2, 4], [2, 0, 4]])
    dy = rng.standard_normal((2, 3, 3))
    _, cache = layer.forward(ids)
    layer.backward(dy, cache)
    expected = np.zeros((5, 3))
    np.add.at(expected, ids.reshape(-1), dy.reshape(-1, 3))
    np.testing.assert_allclose(layer.grads["weight"], expected, rtol=0, atol=1e-14)
    assert layer.grads["weight"][2] == pytest.approx(dy[0, 0] + dy[0, 1] + dy[1, 0])


def test_embedding_gathers_rows(rng):
    layer = Embedding(5, 3, rng=rng)
    ids = np.array([[4, 0], [1, 1]])
    y, _ = layer.forward(ids)
    np.testing.assert_array_equal(y, layer.params["weight"][ids])


# --- Dropout -----------------------------------------------------------------------------------


def test_dropout_gradcheck_with_replayed_masks(rng):
    generator = np.random.default_rng(3)
    layer = Dropout(0.4, rng=generator)
    state = generator.bit_generator.state
    x = rng.standard_normal((3, 4, 5))

    def forward(x):
        generator.bit_generator.state = state  # the same mask at every finite-difference step
        return layer.forward(x)

    check(layer, forward, layer.backward, [x], ["x"], rng)


def test_dropout_scales_kept_entries(rng):
    layer = Dropout(0.25, rng=np.random.default_rng(1))
    x = rng.standard_normal((200, 50))
    y, _ = layer.forward(x)
    kept = y != 0  # entries the mask kept
    np.testing.assert_allclose(y[kept], x[kept] / 0.75, rtol=1e-12)
    assert 0.2 < 1.0 - kept.mean() < 0.3


def test_dropout_eval_mode_and_zero_p_pass_through(rng):
    x = rng.standard_normal((4, 5))
    layer = Dropout(0.5, rng=np.random.default_rng(0))
    layer.eval()
    y, cache = layer.forward(x)
    assert y is x
    assert layer.backward(x, cache) is x
    assert Dropout(0.0).forward(x)[0] is x


# --- CrossEntropyLoss -------------------------------------------------------------------------


def test_cross_entropy_loss_gradcheck(rng):
    loss_layer = CrossEntropyLoss(ignore_index=-1)
    logits = rng.standard_normal((2, 4, 5))
    targets = rng.integers(0, 5, (2, 4))
    targets[1, 3] = -1
    check(loss_layer, lambda z: loss_layer.forward(z, targets), loss_layer.backward, [logits], ["logits"], rng)


def test_cross_entropy_loss_value(rng):
    logits = rng.standard_normal((3, 4))
    targets = np.array([0, 3, 1])
    loss, _ = CrossEntropyLoss().forward(logits, targets)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert loss == pytest.approx(-log_probs[np.arange(3), targets].mean(), rel=1e-12)


# --- MultiHeadAttention -------------------------------------------------------------------------


def mha_check(layer, x_q, x_kv, rng, **call):
    def forward(x_q, x_kv):
        return layer.forward(x_q, x_kv, **call)

    return check(layer, forward, layer.backward, [x_q, x_kv], ["x_q", "x_kv"], rng)


@pytest.mark.parametrize("seed", [0, 1])
def test_mha_cross_attention_gradcheck(seed):
    rng = np.random.default_rng(seed)
    layer = MultiHeadAttention(6, 2, kv_width=4, rng=rng)
    x_q = rng.standard_normal((2, 3, 6))  # N = 3
    x_kv = rng.standard_normal((2, 5, 4))  # M = 5
    mask = padding_mask(np.array([5, 2]), 5)
    result = mha_check(layer, x_q, x_kv, rng, mask=mask)
    assert len(parameter_rows(result, layer)) == 8


@pytest.mark.parametrize("n_queries, n_keys", [(3, 5), (5, 3), (4, 4)])
def test_mha_causal_gradcheck(n_queries, n_keys, rng):
    layer = MultiHeadAttention(4, 2, rng=rng)
    x_q = rng.standard_normal((2, n_queries, 4))
    x_kv = rng.standard_normal((2, n_keys, 4))
    mha_check(layer, x_q, x_kv, rng, causal=True)


def test_mha_self_attention_gradcheck_adds_the_fork(rng):
    layer = MultiHeadAttention(4, 2, rng=rng)
    x = rng.standard_normal((2, 4, 4))

    def forward(x):
        return layer.forward(x, x, causal=True)

    def backward(dy, cache):
        dx_q, dx_kv = layer.backward(dy, cache)
        return dx_q + dx_kv

    check(layer, forward, backward, [x], ["x"], rng)


def test_mha_causal_is_bottom_right_aligned(rng):
    layer = MultiHeadAttention(4, 2, rng=rng)
    x_q = rng.standard_normal((1, 2, 4))  # N = 2
    x_kv = rng.standard_normal((1, 5, 4))  # M = 5
    y, cache = layer.forward(x_q, x_kv, causal=True)
    probs = layer.attention_probabilities(cache)  # (1, 2, 2, 5)
    allowed = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=bool)  # j <= i + (M - N)
    assert np.all(probs[..., ~allowed] == 0)
    assert np.all(probs[..., allowed] > 0)

    # The output of query 0 does not depend on key 4, which is in its future.
    changed = x_kv.copy()
    changed[0, 4] += 10.0
    y_changed, _ = layer.forward(x_q, changed, causal=True)
    np.testing.assert_allclose(y_changed[0, 0], y[0, 0], rtol=0, atol=1e-12)
    assert not np.allclose(y_changed[0, 1], y[0, 1])


def test_mha_fully_masked_rows(rng):
    layer = MultiHeadAttention(4, 2, rng=rng)
    layer.params["b_o"][:] = rng.standard_normal(4)
    x_q = rng.standard_normal((1, 5, 4))  # N = 5 > M = 3: queries 0 and 1 precede every key
    x_kv = rng.standard_normal((1, 3, 4))
    y, cache = layer.forward(x_q, x_kv, causal=True)
    # A zero attention row leaves only the output bias.
    np.testing.assert_allclose(y[0, :2], np.broadcast_to(layer.params["b_o"], (2, 4)), rtol=0, atol=1e-15)
    dx_q, dx_kv = layer.backward(rng.standard_normal(y.shape), cache)
    assert np.all(dx_q[0, :2] == 0)
    assert np.all(np.isfinite(dx_kv))


def test_mha_matches_per_head_dense_attention(rng):
    layer = MultiHeadAttention(6, 3, rng=rng)
    x_q = rng.standard_normal((2, 3, 6))
    x_kv = rng.standard_normal((2, 4, 6))
    y, _ = layer.forward(x_q, x_kv)
    p = layer.params
    heads = []
    for h in range(3):
        columns = slice(2 * h, 2 * h + 2)
        q = x_q @ p["W_q"][:, columns] + p["b_q"][columns]
        k = x_kv @ p["W_k"][:, columns] + p["b_k"][columns]
        v = x_kv @ p["W_v"][:, columns] + p["b_v"][columns]
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(2)
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        heads.append(weights @ v)
    expected = np.concatenate(heads, axis=-1) @ p["W_o"] + p["b_o"]
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


class CountingAttention:
    """A user-written attention object: dense attention that counts its calls."""

    name = "counting"

    def __init__(self):
        self.calls = 0

    def forward(self, q, k, v, *, mask=None, causal=False):
        self.calls += 1
        return DenseAttention().forward(q, k, v, mask=mask, causal=causal)

    def backward(self, dout, cache):
        return DenseAttention().backward(dout, cache)


def test_mha_accepts_a_user_attention_object(rng):
    attention = CountingAttention()
    layer = MultiHeadAttention(4, 2, attention=attention, rng=rng)
    x = rng.standard_normal((1, 3, 4))
    mha_check(layer, x, rng.standard_normal((1, 4, 4)), rng)
    assert attention.calls > 1


@pytest.mark.parametrize("name", method_names())
def test_mha_runs_every_implemented_method(name):
    if not is_implemented(name):
        pytest.skip(f"{name} is not implemented yet")
    rng = np.random.default_rng(0)
    method = make_method(name, rng=np.random.default_rng(1))
    layer = MultiHeadAttention(8, 2, attention=method, rng=rng)
    x = rng.standard_normal((1, 16, 8))
    y, cache = layer.forward(x, x, causal=True)  # every method supports causal self-attention
    dx_q, dx_kv = layer.backward(rng.standard_normal(y.shape), cache)
    assert y.shape == dx_q.shape == dx_kv.shape == x.shape
    assert np.all(np.isfinite(dx_q + dx_kv))
    assert all(np.any(grad != 0) for grad in (layer.grads["W_q"], layer.grads["W_o"]))


def test_mha_attention_by_name_matches_default(rng):
    x = rng.standard_normal((1, 3, 4))
    by_name = MultiHeadAttention(4, 2, attention="transformer", rng=np.random.default_rng(5))
    default = MultiHeadAttention(4, 2, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(by_name.forward(x, x)[0], default.forward(x, x)[0])


# --- EncoderLayer and DecoderLayer ---------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("pre_ln", [False, True])
def test_encoder_layer_gradcheck(seed, pre_ln):
    rng = np.random.default_rng(seed)
    layer = EncoderLayer(4, 2, 6, pre_ln=pre_ln, rng=rng)
    x = rng.standard_normal((2, 4, 4))
    mask = padding_mask(np.array([4, 3]), 4)

    def forward(x):
        return layer.forward(x, mask=mask)

    result = check(layer, forward, layer.backward, [x], ["x"], rng)
    assert len(parameter_rows(result, layer)) == len(layer.parameters()) == 16


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("pre_ln", [False, True])
def test_decoder_layer_gradcheck(seed, pre_ln):
    rng = np.random.default_rng(seed)
    layer = DecoderLayer(4, 2, 6, activation="gelu", pre_ln=pre_ln, rng=rng)
    x = rng.standard_normal((2, 3, 4))  # N = 3 target positions
    memory = rng.standard_normal((2, 5, 4))  # M = 5 source positions
    self_mask = padding_mask(np.array([3, 2]), 3)
    memory_mask = padding_mask(np.array([5, 4]), 5)

    def forward(x, memory):
        return layer.forward(x, memory, self_mask=self_mask, memory_mask=memory_mask)

    result = check(layer, forward, layer.backward, [x, memory], ["x", "memory"], rng)
    assert len(parameter_rows(result, layer)) == len(layer.parameters()) == 26


@pytest.mark.parametrize("pre_ln", [False, True])
def test_decoder_only_block_gradcheck(pre_ln, rng):
    layer = DecoderLayer(4, 2, 6, cross_attention=False, pre_ln=pre_ln, rng=rng)
    x = rng.standard_normal((2, 5, 4))

    def backward(dy, cache):
        dx, dmemory = layer.backward(dy, cache)
        assert dmemory is None
        return dx

    check(layer, layer.forward, backward, [x], ["x"], rng)


def test_encoder_layer_gradcheck_with_dropout(rng):
    generator = np.random.default_rng(9)
    layer = EncoderLayer(4, 2, 6, pre_ln=True, dropout=0.2, rng=generator)
    state = generator.bit_generator.state
    x = rng.standard_normal((2, 3, 4))

    def forward(x):
        generator.bit_generator.state = state  # replay the dropout masks
        return layer.forward(x)

    check(layer, forward, layer.backward, [x], ["x"], rng)


def test_decoder_layer_is_causal(rng):
    layer = DecoderLayer(4, 2, 6, rng=rng)
    x = rng.standard_normal((1, 5, 4))
    memory = rng.standard_normal((1, 3, 4))
    y, _ = layer.forward(x, memory)
    changed = x.copy()
    changed[0, 3] += 5.0
    y_changed, _ = layer.forward(changed, memory)
    np.testing.assert_allclose(y_changed[0, :3], y[0, :3], rtol=0, atol=1e-12)
    assert not np.allclose(y_changed[0, 3:], y[0, 3:])


def test_encoder_layer_ignores_padded_keys(rng):
    layer = EncoderLayer(4, 2, 6, rng=rng)
    x = rng.standard_normal((1, 4, 4))
    mask = padding_mask(np.array([2]), 4)
    y, _ = layer.forward(x, mask=mask)
    changed = x.copy()
    changed[0, 2:] = rng.standard_normal((2, 4))
    y_changed, _ = layer.forward(changed, mask=mask)
    np.testing.assert_allclose(y_changed[0, :2], y[0, :2], rtol=0, atol=1e-12)


def test_layers_keep_float32(rng):
    layer = DecoderLayer(4, 2, 6, activation="gelu", dtype=np.float32, rng=rng)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    memory = rng.standard_normal((2, 5, 4)).astype(np.float32)
    y, cache = layer.forward(x, memory)
    dx, dmemory = layer.backward(np.ones_like(y), cache)
    assert y.dtype == dx.dtype == dmemory.dtype == np.float32
    assert {grad.dtype for grad in layer.gradients().values()} == {np.dtype(np.float32)}


# --- bad input -------------------------------------------------------------------------------------


def test_width_not_divisible_by_heads_raises(rng):
    with pytest.raises(ValueError, match="not divisible by n_heads=4"):
        MultiHeadAttention(6, 4, rng=rng)
    with pytest.raises(ValueError, match="width=6 is not divisible by n_heads=4"):
        EncoderLayer(6, 4, 8, rng=rng)
    with pytest.raises(ValueError, match="width=6 is not divisible by n_heads=4"):
        DecoderLayer(6, 4, 8, rng=rng)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_p_outside_range_raises(p):
    with pytest.raises(ValueError, match="p="):
        Dropout(p, rng=np.random.default_rng(0))


def test_dropout_without_generator_raises():
    with pytest.raises(ValueError, match="needs rng"):
        Dropout(0.1)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        Dropout(0.1, rng=np.random.RandomState(0))


def test_mismatched_shapes_raise(rng):
    with pytest.raises(ValueError, match="expected a last axis of width 4"):
        Linear(4, 2, rng=rng).forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match="expected a last axis of width 5"):
        LayerNorm(5).forward(np.ones((2, 3)))
    layer = MultiHeadAttention(4, 2, rng=rng)
    with pytest.raises(ValueError, match="batch"):
        layer.forward(np.ones((2, 3, 4)), np.ones((1, 3, 4)))
    decoder = DecoderLayer(4, 2, 6, rng=rng)
    with pytest.raises(ValueError, match="memory has batch 1 but x has batch 2"):
        decoder.forward(np.ones((2, 3, 4)), np.ones((1, 5, 4)))
    with pytest.raises(ValueError, match="memory is missing"):
        decoder.forward(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="cross_attention=False"):
        DecoderLayer(4, 2, 6, cross_attention=False, rng=rng).forward(np.ones((2, 3, 4)), np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="does not broadcast"):
        layer.forward(np.ones((2, 3, 4)), np.ones((2, 5, 4)), mask=np.ones((2, 1, 1, 4), dtype=bool))


def test_wrong_dtypes_raise(rng):
    with pytest.raises(TypeError, match="float32 or float64"):
        Linear(4, 2, dtype=np.int64)
    with pytest.raises(TypeError, match="parameters are float64"):
        Linear(4, 2, rng=rng).forward(np.ones((2, 4), dtype=np.float32))
    with pytest.raises(TypeError, match="expected float32 or float64"):
        Linear(4, 2, rng=rng).forward(np.ones((2, 4), dtype=np.int64))


def test_out_of_range_token_ids_raise(rng):
    layer = Embedding(5, 3, rng=rng)
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\).*from 0 to 5"):
        layer.forward(np.array([[0, 5]]))
    with pytest.raises(ValueError, match="from -1"):
        layer.forward(np.array([[-1, 2]]))
    with pytest.raises(TypeError, match="integer token ids"):
        layer.forward(np.array([[0.0, 1.0]]))


def test_bad_attention_object_raises(rng):
    with pytest.raises(TypeError, match=r"has no forward\(\) method"):
        MultiHeadAttention(4, 2, attention=object(), rng=rng)

    class ForwardOnly:
        def forward(self, q, k, v, *, mask=None, causal=False):
            return q, None

    with pytest.raises(TypeError, match=r"has no backward\(\) method"):
        MultiHeadAttention(4, 2, attention=ForwardOnly(), rng=rng)
    with pytest.raises(ValueError, match="unknown attention method 'nope'"):
        MultiHeadAttention(4, 2, attention="nope", rng=rng)


def test_bad_activation_raises(rng):
    with pytest.raises(ValueError, match="activation='tanh' is invalid"):
        FeedForward(4, 6, activation="tanh", rng=rng)


def test_attention_probabilities_need_dense_attention(rng):
    layer = MultiHeadAttention(4, 2, attention=CountingAttention(), rng=rng)
    x = rng.standard_normal((1, 3, 4))
    _, cache = layer.forward(x, x)
    # CountingAttention returns a dense cache but is not DenseAttention itself.
    with pytest.raises(ValueError, match="needs dense attention"):
        layer.attention_probabilities(cache)


def test_dense_attention_reference_agrees_with_layer_probabilities(rng):
    layer = MultiHeadAttention(4, 2, rng=rng)
    x_q = rng.standard_normal((1, 3, 4))
    x_kv = rng.standard_normal((1, 5, 4))
    _, cache = layer.forward(x_q, x_kv)
    q, k, v = layer.project(x_q, x_kv)
    _, dense_cache = attention_forward(q, k, v)
    np.testing.assert_allclose(layer.attention_probabilities(cache), attention_probabilities(dense_cache), rtol=1e-13)


def test_check_all_layers_passes():
    from miniattn.nn.checks import check_all_layers

    results = check_all_layers(np.random.default_rng(4))
    labels = [label for label, _ in results]
    assert "Transformer loss (N=4, M=5, padding)" in labels
    assert "DecoderLM loss" in labels
    for label, result in results:
        assert result.passed(TOL), f"{label}:\n{result}"
