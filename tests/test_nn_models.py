"""Whole models: gradient checks of the loss, masks, state dicts, float32 and bad input.

Gradient checks run in float64 with a tolerance of 1e-6 (TOL) on the maximum
relative error. Weight matrices use random directional derivatives to keep
the run short. Two choices keep finite differences of a whole model's loss
accurate enough for that tolerance:

- The step is eps = 3e-6 instead of 1e-6. The loss (about 2) is large next to
  its smallest gradient entries, and the rounding noise of L(x +- h u), about
  1e-15 / h, would otherwise reach 1e-6 of them.
- The models use GELU. A directional step moves every ReLU input at once and
  sometimes crosses a kink, which finite differences cannot follow; ReLU is
  checked entry by entry in the layer tests instead.
"""

import numpy as np
import pytest

from miniattn.methods import make_method
from miniattn.nn import Adam, DecoderLM, Transformer, gradcheck_module
from miniattn.nn.functional import cross_entropy_backward, cross_entropy_forward

TOL = 1e-6
CHECK_OPTIONS = dict(eps=3e-6, max_elementwise=16, n_directions=4)
PAD = -1  # targets at padded positions, left out of the loss


def tiny_transformer(seed, pre_ln, **options):
    return Transformer(
        7, 9, width=8, n_heads=2, ff_width=12, n_encoder_layers=1, n_decoder_layers=2,
        activation="gelu", pre_ln=pre_ln, rng=np.random.default_rng(seed), **options,
    )


def seq2seq_batch(rng):
    """Source (2, 5) and target (2, 4) ids with padding in both; N != M."""
    src = rng.integers(0, 7, (2, 5))
    tgt = rng.integers(0, 9, (2, 4))
    src_lengths = np.array([5, 3])
    tgt_lengths = np.array([4, 2])
    targets = rng.integers(0, 9, (2, 4))
    targets[1, 2:] = PAD
    return src, tgt, src_lengths, tgt_lengths, targets


# --- encoder-decoder Transformer -------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("pre_ln", [False, True])
def test_transformer_loss_gradcheck(seed, pre_ln):
    rng = np.random.default_rng(seed + 100)
    model = tiny_transformer(seed, pre_ln)
    src, tgt, src_lengths, tgt_lengths, targets = seq2seq_batch(rng)

    def forward():
        logits, cache = model.forward(src, tgt, src_lengths=src_lengths, tgt_lengths=tgt_lengths)
        loss, loss_cache = cross_entropy_forward(logits, targets, ignore_index=PAD)
        return loss, (cache, loss_cache)

    def backward(dloss, caches):
        cache, loss_cache = caches
        model.backward(cross_entropy_backward(dloss, loss_cache), cache)
        return ()

    result = gradcheck_module(model, forward, backward, rng=rng, **CHECK_OPTIONS)
    result.assert_ok(TOL)
    assert [row.name for row in result.inputs] == list(model.parameters())
    # Both decoder layers' cross-attention read the memory, so the encoder gets their sum.
    assert np.any(model.gradients()["src_embedding.weight"] != 0)


def test_transformer_memory_gradient_sums_over_decoder_layers(rng):
    model = tiny_transformer(0, pre_ln=False)
    src, tgt, src_lengths, tgt_lengths, _ = seq2seq_batch(rng)
    memory, _ = model.encode(src, src_lengths=src_lengths)
    logits, cache = model.decode(tgt, memory, src_lengths=src_lengths, tgt_lengths=tgt_lengths)
    dlogits = rng.standard_normal(logits.shape)
    dmemory = model.decode_backward(dlogits, cache)

    per_layer = []
    for layer, layer_cache in zip(model.decoder, cache["layers"]):
        cross_cache = layer_cache["cross_attention"][1]
        per_layer.append(cross_cache[1])  # the memory array each cross-attention read
    assert all(read is memory for read in per_layer)

    def forward(memory):
        return model.decode(tgt, memory, src_lengths=src_lengths, tgt_lengths=tgt_lengths)

    def backward(dy, cache):
        return model.decode_backward(dy, cache)

    result = gradcheck_module(model, forward, backward, [memory], input_names=["memory"], parameter_names=[],
                              rng=rng, max_elementwise=0)
    result.assert_ok(TOL)
    assert dmemory.shape == memory.shape


def test_transformer_ignores_padded_source_tokens(rng):
    model = tiny_transformer(0, pre_ln=True)
    src, tgt, src_lengths, tgt_lengths, _ = seq2seq_batch(rng)
    logits, _ = model.forward(src, tgt, src_lengths=src_lengths, tgt_lengths=tgt_lengths)
    changed = src.copy()
    changed[1, 3:] = (changed[1, 3:] + 1) % 7  # sequence 1 has length 3
    logits_changed, _ = model.forward(changed, tgt, src_lengths=src_lengths, tgt_lengths=tgt_lengths)
    np.testing.assert_allclose(logits_changed, logits, rtol=0, atol=1e-12)
    changed[1, 0] = (changed[1, 0] + 1) % 7
    logits_changed, _ = model.forward(changed, tgt, src_lengths=src_lengths, tgt_lengths=tgt_lengths)
    assert not np.allclose(logits_changed[1], logits[1])


def test_transformer_decoder_is_causal(rng):
    model = tiny_transformer(1, pre_ln=False)
    src = rng.integers(0, 7, (1, 5))
    tgt = rng.integers(0, 9, (1, 4))
    logits, _ = model.forward(src, tgt)
    changed = tgt.copy()
    changed[0, 2] = (changed[0, 2] + 1) % 9
    logits_changed, _ = model.forward(src, changed)
    np.testing.assert_allclose(logits_changed[0, :2], logits[0, :2], rtol=0, atol=1e-12)
    assert not np.allclose(logits_changed[0, 2:], logits[0, 2:])


def test_transformer_attention_maps_have_the_three_shapes(rng):
    model = tiny_transformer(0, pre_ln=False)
    src, tgt, src_lengths, tgt_lengths, _ = seq2seq_batch(rng)
    _, cache = model.forward(src, tgt, src_lengths=src_lengths, tgt_lengths=tgt_lengths)
    maps = model.attention_probabilities(cache)
    encoder_self, decoder_self, cross = maps["encoder_self"][0], maps["decoder_self"][1], maps["cross"][1]
    assert encoder_self.shape == (2, 2, 5, 5)
    assert decoder_self.shape == (2, 2, 4, 4)
    assert cross.shape == (2, 2, 4, 5)
    # Encoder: bidirectional over the valid source keys; padded keys get nothing.
    assert np.all(encoder_self[0] > 0)
    assert np.all(encoder_self[1, :, :, 3:] == 0)
    # Decoder self-attention: lower triangular.
    assert np.all(decoder_self[0][:, np.triu_indices(4, 1)[0], np.triu_indices(4, 1)[1]] == 0)
    assert np.all(decoder_self[0][:, np.tril_indices(4)[0], np.tril_indices(4)[1]] > 0)
    # Cross-attention: rectangular, every target position attends to every valid source key.
    assert np.all(cross[0] > 0)
    assert np.all(cross[1, :, :, 3:] == 0)
    for probabilities in (encoder_self, decoder_self, cross):
        np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-12)


def test_transformer_float32(rng):
    model = tiny_transformer(0, pre_ln=True, dtype=np.float32)
    src, tgt, src_lengths, tgt_lengths, targets = seq2seq_batch(rng)
    logits, cache = model.forward(src, tgt, src_lengths=src_lengths, tgt_lengths=tgt_lengths)
    _, loss_cache = cross_entropy_forward(logits, targets, ignore_index=PAD)
    model.backward(cross_entropy_backward(1.0, loss_cache), cache)
    assert logits.dtype == np.float32
    assert {grad.dtype for grad in model.gradients().values()} == {np.dtype(np.float32)}


# --- decoder-only language model ----------------------------------------------------------------------


def tiny_lm(seed, pre_ln=True, **options):
    return DecoderLM(
        6, 8, width=8, n_heads=2, n_layers=2, ff_width=12, pre_ln=pre_ln,
        rng=np.random.default_rng(seed), **options,
    )


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("pre_ln", [False, True])
def test_decoder_lm_loss_gradcheck(seed, pre_ln):
    rng = np.random.default_rng(seed + 200)
    model = tiny_lm(seed, pre_ln)
    tokens = rng.integers(0, 6, (2, 6))  # N = 5 < max_length = 8
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def forward():
        logits, cache = model.forward(inputs)
        loss, loss_cache = cross_entropy_forward(logits, targets)
        return loss, (cache, loss_cache)

    def backward(dloss, caches):
        cache, loss_cache = caches
        model.backward(cross_entropy_backward(dloss, loss_cache), cache)
        return ()

    result = gradcheck_module(model, forward, backward, rng=rng, **CHECK_OPTIONS)
    result.assert_ok(TOL)
    assert len(result.inputs) == len(model.parameters()) == 2 + 2 * 16 + 2 + 2  # embeddings, blocks, final norm, head
    # Positions 5..7 were never used, so their embedding rows get no gradient.
    assert np.all(model.gradients()["position_embedding.weight"][5:] == 0)


def test_decoder_lm_logits_gradcheck_with_method_object(rng):
    model = tiny_lm(0, attention=make_method("transformer"))
    ids = rng.integers(0, 6, (2, 4))
    result = gradcheck_module(model, lambda: model.forward(ids), lambda d, c: model.backward(d, c) or (),
                              rng=rng, **CHECK_OPTIONS)
    result.assert_ok(TOL)


def test_decoder_lm_is_causal(rng):
    model = tiny_lm(1)
    ids = rng.integers(0, 6, (1, 7))
    logits, _ = model.forward(ids)
    changed = ids.copy()
    changed[0, 4] = (changed[0, 4] + 1) % 6
    logits_changed, _ = model.forward(changed)
    np.testing.assert_allclose(logits_changed[0, :4], logits[0, :4], rtol=0, atol=1e-12)
    assert not np.allclose(logits_changed[0, 4:], logits[0, 4:])


def test_adam_reduces_the_loss_of_a_tiny_lm(rng):
    model = tiny_lm(0, dtype=np.float32)
    tokens = np.tile(np.array([[0, 1, 2, 3, 4, 5, 0, 1, 2]]), (4, 1))  # a repeating pattern
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    optimizer = Adam(1e-2)
    losses = []
    for _ in range(40):
        logits, cache = model.forward(inputs)
        loss, loss_cache = cross_entropy_forward(logits, targets)
        model.zero_grad()
        model.backward(cross_entropy_backward(1.0, loss_cache), cache)
        optimizer.step(model.parameters(), model.gradients())
        losses.append(loss)
    assert losses[-1] < 0.2 * losses[0]
    assert {value.dtype for value in model.parameters().values()} == {np.dtype(np.float32)}


def test_decoder_lm_attention_inputs_and_generate(rng):
    model = tiny_lm(0)
    ids = rng.integers(0, 6, (2, 5))
    q, k, v = model.attention_inputs(ids, 1)
    assert q.shape == k.shape == v.shape == (2, 2, 5, 4)
    # In a pre-LN model, layer 0 attends with LayerNorm(embeddings).
    q0, _, _ = model.attention_inputs(ids, 0)
    h, _ = model.embed(ids)
    z, _ = model.blocks[0].norm1.forward(h)
    np.testing.assert_allclose(q0, model.blocks[0].self_attention.project(z, z)[0], rtol=1e-13)

    out = model.generate(ids[:, :3], 10, rng=np.random.default_rng(0))
    assert out.shape == (2, 13)
    np.testing.assert_array_equal(out[:, :3], ids[:, :3])
    assert out.min() >= 0
    assert out.max() < 6


def test_decoder_lm_passes_attention_options_to_every_block(rng):
    ids = rng.integers(0, 6, (1, 5))
    default = tiny_lm(0)
    scaled = tiny_lm(0, attention_options={"scale": 0.01})
    assert all(block.self_attention.attention.scale == 0.01 for block in scaled.blocks)
    assert not np.allclose(scaled.forward(ids)[0], default.forward(ids)[0])


def test_decoder_lm_method_name_per_block():
    model = tiny_lm(0, attention="transformer")
    first, second = (block.self_attention.attention for block in model.blocks)
    assert first is not second
    assert model.config["attention"] == "transformer"


# --- state dicts -----------------------------------------------------------------------------------


def test_state_dict_round_trip_through_npz(tmp_path, rng):
    model = tiny_transformer(0, pre_ln=True)
    src, tgt, src_lengths, tgt_lengths, _ = seq2seq_batch(rng)
    logits, _ = model.forward(src, tgt, src_lengths=src_lengths, tgt_lengths=tgt_lengths)
    path = tmp_path / "model.npz"
    model.save(path)

    other = tiny_transformer(5, pre_ln=True)
    assert not np.allclose(other.forward(src, tgt)[0], model.forward(src, tgt)[0])
    params_before = other.parameters()
    other.load(path)
    logits_loaded, _ = other.forward(src, tgt, src_lengths=src_lengths, tgt_lengths=tgt_lengths)
    np.testing.assert_array_equal(logits_loaded, logits)
    # Loading writes into the existing arrays, so an optimizer's references stay valid.
    assert all(other.parameters()[name] is value for name, value in params_before.items())
    with np.load(path) as saved:
        assert sorted(saved.files) == sorted(model.parameters())


def test_state_dict_is_a_copy(rng):
    model = tiny_lm(0)
    state = model.state_dict()
    state["head.weight"][:] = 0
    assert np.any(model.parameters()["head.weight"] != 0)


def test_load_state_dict_errors_name_the_keys():
    model = tiny_lm(0)
    state = model.state_dict()
    missing = dict(state)
    del missing["head.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['head.bias'\]"):
        model.load_state_dict(missing)
    extra = dict(state, **{"blocks.2.norm1.gamma": np.ones(8)})
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks.2.norm1.gamma'\]"):
        model.load_state_dict(extra)
    wrong = dict(state, **{"head.weight": np.ones((8, 7))})
    with pytest.raises(ValueError, match=r"head.weight: saved \(8, 7\), model \(8, 6\)"):
        model.load_state_dict(wrong)


def test_zero_grad_clears_in_place(rng):
    model = tiny_lm(0)
    gradients = model.gradients()
    logits, cache = model.forward(rng.integers(0, 6, (1, 4)))
    model.backward(np.ones_like(logits), cache)
    assert np.any(gradients["head.weight"] != 0)
    model.zero_grad()
    assert all(np.all(grad == 0) for grad in gradients.values())


def test_backward_accumulates_until_zero_grad(rng):
    model = tiny_lm(0)
    ids = rng.integers(0, 6, (1, 4))
    logits, cache = model.forward(ids)
    model.backward(np.ones_like(logits), cache)
    once = {name: grad.copy() for name, grad in model.gradients().items()}
    model.backward(np.ones_like(logits), cache)
    for name, grad in model.gradients().items():
        np.testing.assert_allclose(grad, 2 * once[name], rtol=1e-12, atol=1e-15)


# --- bad input -------------------------------------------------------------------------------------


def test_models_reject_width_not_divisible_by_heads():
    with pytest.raises(ValueError, match="width=10 is not divisible by n_heads=4"):
        Transformer(5, 5, width=10, n_heads=4)
    with pytest.raises(ValueError, match="width=10 is not divisible by n_heads=4"):
        DecoderLM(5, 8, width=10, n_heads=4)


def test_models_reject_bad_token_ids(rng):
    model = tiny_transformer(0, pre_ln=False)
    with pytest.raises(ValueError, match=r"src_ids must lie in \[0, 7\)"):
        model.forward(np.array([[0, 7, 1]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match=r"tgt_ids must lie in \[0, 9\)"):
        model.forward(np.array([[0, 1, 1]]), np.array([[0, 9]]))
    with pytest.raises(ValueError, match="expected \\(B, L\\)"):
        model.forward(np.array([0, 1, 1]), np.array([[0, 1]]))
    lm = tiny_lm(0)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 6\)"):
        lm.forward(np.array([[0, -2]]))
    with pytest.raises(ValueError, match="max_length=8"):
        lm.forward(np.zeros((1, 9), dtype=int))


def test_models_reject_bad_lengths(rng):
    model = tiny_transformer(0, pre_ln=False)
    src = rng.integers(0, 7, (2, 5))
    tgt = rng.integers(0, 9, (2, 4))
    with pytest.raises(ValueError, match="expected \\(2,\\)"):
        model.forward(src, tgt, src_lengths=np.array([5]))
    with pytest.raises(ValueError, match="expected values in \\[0, 5\\]"):
        model.forward(src, tgt, src_lengths=np.array([6, 2]))


def test_models_reject_bad_options():
    with pytest.raises(ValueError, match="p=1.0 is invalid"):
        DecoderLM(5, 8, width=8, n_heads=2, dropout=1.0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="even width"):
        Transformer(5, 5, width=9, n_heads=3)
    with pytest.raises(TypeError, match="dtype=int32 is invalid"):
        DecoderLM(5, 8, width=8, n_heads=2, dtype=np.int32)
    with pytest.raises(ValueError, match="n_layers=0 is invalid"):
        DecoderLM(5, 8, width=8, n_heads=2, n_layers=0)


def test_dropout_follows_train_and_eval(rng):
    model = tiny_lm(0, dropout=0.5)
    ids = rng.integers(0, 6, (2, 5))
    first, _ = model.forward(ids)
    second, _ = model.forward(ids)
    assert not np.allclose(first, second)  # fresh masks in training mode
    model.eval()
    assert all(not module.training for _, module in model.named_modules())
    evaluated, _ = model.forward(ids)
    np.testing.assert_array_equal(model.forward(ids)[0], evaluated)
    without_dropout, _ = tiny_lm(0).forward(ids)
    np.testing.assert_allclose(evaluated, without_dropout, rtol=1e-13)
