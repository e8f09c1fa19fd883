"""Reformer: LSH attention against dense oracles, gradient checks, reversible layers, chunked FF.

Every gradient check runs in float64 with tolerance 1e-6 and freezes the
buckets (and dropout masks): they are piecewise constant in the inputs.
"""

import numpy as np
import pytest

from miniattn import gradcheck, methods, reformer
from miniattn.core import kernels
from miniattn.core.hashing import draw_rotations
from miniattn.nn.functional import feed_forward_forward
from miniattn.transformer import attention_backward, attention_forward

BACKENDS = kernels.available_backends()


# --- oracles built independently of the implementation ---------------------------------


def reference_window_counts(buckets, n_buckets, chunk_length):
    """n_ij (N, N) from a plain loop over sorted chunks: own chunk plus the previous one, wrapping."""
    n_rounds, n_positions = buckets.shape
    length = chunk_length * -(-n_positions // chunk_length)
    items = []
    for r in range(n_rounds):
        for t in range(length):
            bucket = buckets[r, t] if t < n_positions else n_buckets  # padding sorts last in its round
            items.append((r, bucket, t))
    items.sort()
    chunks = [items[start:start + chunk_length] for start in range(0, len(items), chunk_length)]
    counts = np.zeros((n_positions, n_positions), dtype=np.int64)
    for index, chunk in enumerate(chunks):
        window = chunks[index - 1] + chunk  # index - 1 = -1 wraps to the last chunk
        for _, _, i in chunk:
            for _, _, j in window:
                if i < n_positions and j < n_positions:
                    counts[i, j] += 1
    return counts


def dense_oracle(qk, v, counts, *, causal=False, dedup=False, key_mask=None):
    """Dense shared-QK attention over the union of windows, with log n_ij bias unless dedup."""
    n_positions = qk.shape[-2]
    allowed = counts > 0
    if key_mask is not None:
        allowed = allowed & key_mask[..., None, :]
    if causal:
        allowed = allowed & np.tri(n_positions, dtype=bool)
    bias = np.zeros(counts.shape) if dedup else np.log(np.maximum(counts, 1))
    bias = bias - reformer.SELF_PENALTY * np.eye(n_positions)
    unit, normalize_cache = reformer.normalize_forward(qk)
    out, cache = attention_forward(qk, unit, v, mask=allowed, scale=1.0, bias=bias)

    def backward(dout):
        dq, dunit, dv = attention_backward(dout, cache)
        return dq + reformer.normalize_backward(dunit, normalize_cache), dv

    return out, backward


def random_inputs(rng, lead, n_positions, width=4, value_width=3):
    return rng.standard_normal(lead + (n_positions, width)), rng.standard_normal(lead + (n_positions, value_width))


# --- LSH attention: exact identities ------------------------------------------------------


@pytest.mark.parametrize("n_rounds", [1, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_one_chunk_equals_dense_shared_qk(rng, n_rounds, causal):
    qk, v = random_inputs(rng, (2, 3), 9)
    rotations = draw_rotations(rng, n_rounds, 4, 6)
    out, cache = reformer.lsh_attention_forward(
        qk, v, n_buckets=6, chunk_length=9, rotations=rotations, causal=causal
    )
    # One chunk per round: every key is seen the same number of times, which cancels.
    expected, oracle_backward = dense_oracle(qk, v, np.ones((9, 9)), causal=causal)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)

    dout = rng.standard_normal(out.shape)
    dqk, dv = reformer.lsh_attention_backward(dout, cache)
    expected_dqk, expected_dv = oracle_backward(dout)
    np.testing.assert_allclose(dqk, expected_dqk, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dv, expected_dv, rtol=0, atol=1e-12)


CASES = [
    # N, c, K, nb, causal, dedup
    (8, 2, 1, 4, False, False),
    (11, 3, 2, 4, False, False),
    (11, 3, 2, 4, False, True),
    (10, 4, 3, 6, True, False),
    (10, 4, 3, 6, True, True),
    (5, 5, 2, 2, True, True),
    (13, 1, 2, 8, False, False),
]


@pytest.mark.parametrize("n_positions, chunk_length, n_rounds, n_buckets, causal, dedup", CASES)
def test_frozen_buckets_match_dense_union_oracle(rng, n_positions, chunk_length, n_rounds, n_buckets, causal, dedup):
    qk, v = random_inputs(rng, (2,), n_positions)
    buckets = rng.integers(0, n_buckets, size=(2, n_rounds, n_positions))
    out, cache = reformer.lsh_attention_forward(
        qk, v, n_buckets=n_buckets, chunk_length=chunk_length, buckets=buckets, causal=causal, dedup=dedup
    )
    dout = rng.standard_normal(out.shape)
    dqk, dv = reformer.lsh_attention_backward(dout, cache)
    counts = reformer.window_counts(cache)

    for group in range(2):
        expected_counts = reference_window_counts(buckets[group], n_buckets, chunk_length)
        np.testing.assert_array_equal(counts[group], expected_counts)
        expected, oracle_backward = dense_oracle(qk[group], v[group], expected_counts, causal=causal, dedup=dedup)
        np.testing.assert_allclose(out[group], expected, rtol=0, atol=1e-12)
        expected_dqk, expected_dv = oracle_backward(dout[group])
        np.testing.assert_allclose(dqk[group], expected_dqk, rtol=0, atol=1e-12)
        np.testing.assert_allclose(dv[group], expected_dv, rtol=0, atol=1e-12)


def test_duplicate_keys_differ_without_dedup(rng):
    # Two rounds with the same buckets double every count; a chunk that is its own
    # predecessor doubles again. Counts cancel only where they are uniform.
    qk, v = random_inputs(rng, (), 12)
    buckets = rng.integers(0, 4, size=(2, 12))
    plain, _ = reformer.lsh_attention_forward(qk, v, n_buckets=4, chunk_length=3, buckets=buckets)
    deduped, _ = reformer.lsh_attention_forward(qk, v, n_buckets=4, chunk_length=3, buckets=buckets, dedup=True)
    assert np.max(np.abs(plain - deduped)) > 1e-6


def test_key_mask_and_fully_masked_rows(rng):
    qk, v = random_inputs(rng, (2,), 7)
    buckets = rng.integers(0, 4, size=(2, 2, 7))
    key_mask = np.ones((2, 7), dtype=bool)
    key_mask[0, 3:] = False
    key_mask[1, :] = False  # nobody may attend anything: zero rows, zero gradients
    out, cache = reformer.lsh_attention_forward(
        qk, v, n_buckets=4, chunk_length=3, buckets=buckets, key_mask=key_mask
    )
    dout = rng.standard_normal(out.shape)
    dqk, dv = reformer.lsh_attention_backward(dout, cache)
    assert np.all(np.isfinite(out))
    assert np.all(np.isfinite(dqk))
    assert np.all(np.isfinite(dv))
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_array_equal(dqk[1], 0.0)
    np.testing.assert_array_equal(dv[1], 0.0)
    np.testing.assert_array_equal(dv[0, 3:], 0.0)  # masked keys get no value gradient

    counts = reference_window_counts(buckets[0], 4, 3)
    expected, oracle_backward = dense_oracle(qk[0], v[0], counts, key_mask=key_mask[0])
    np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-12)
    expected_dqk, expected_dv = oracle_backward(dout[0])
    np.testing.assert_allclose(dqk[0], expected_dqk, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dv[0], expected_dv, rtol=0, atol=1e-12)


def test_lone_token_attends_itself(rng):
    # N = 1: the window holds the token and padding only. Causal position 0 sees only itself.
    qk, v = random_inputs(rng, (3,), 1)
    out, _ = reformer.lsh_attention_forward(qk, v, n_buckets=2, chunk_length=1, rotations=draw_rotations(rng, 2, 4, 2))
    np.testing.assert_allclose(out, v, rtol=0, atol=1e-15)

    qk, v = random_inputs(rng, (), 6)
    out, _ = reformer.lsh_attention_forward(
        qk, v, n_buckets=4, chunk_length=2, rotations=draw_rotations(rng, 1, 4, 4), causal=True
    )
    np.testing.assert_allclose(out[0], v[0], rtol=0, atol=1e-15)


def test_padding_does_not_leak_on_any_backend(rng):
    # N = 7 with c = 3 pads to 9; changing what the padding would hold cannot matter,
    # so compare against the oracle, which never sees padding, on both backends.
    qk, v = random_inputs(rng, (2, 2), 7)
    rotations = draw_rotations(rng, 2, 4, 4)
    dout = rng.standard_normal(v.shape)
    outputs, gradients = [], []
    for backend in BACKENDS:
        out, cache = reformer.lsh_attention_forward(
            qk, v, n_buckets=4, chunk_length=3, rotations=rotations, backend=backend
        )
        outputs.append(out)
        gradients.append(reformer.lsh_attention_backward(dout, cache))
        counts = reformer.window_counts(cache)
        for b in range(2):
            for h in range(2):
                expected, _ = dense_oracle(qk[b, h], v[b, h], counts[b, h])
                np.testing.assert_allclose(out[b, h], expected, rtol=0, atol=1e-12)
    for out in outputs[1:]:
        np.testing.assert_array_equal(out, outputs[0])
    for dqk, dv in gradients[1:]:
        np.testing.assert_array_equal(dqk, gradients[0][0])
        np.testing.assert_array_equal(dv, gradients[0][1])


def test_dedup_counts_match_dense_counts(rng):
    qk, v = random_inputs(rng, (3,), 14)
    _, cache = reformer.lsh_attention_forward(
        qk, v, n_buckets=4, chunk_length=4, rotations=draw_rotations(rng, 3, 4, 4)
    )
    n_rounds, chunk_length = 3, 4
    query_positions = cache["sorted_positions"].reshape(3, -1, chunk_length)
    key_positions = reformer.look_back(query_positions)
    per_slot = reformer.window_counts_per_slot(cache["undo"], query_positions, key_positions, n_rounds, chunk_length)
    length = 16
    dense = np.zeros((3, length, length), dtype=np.int64)
    group = np.arange(3)[:, None, None, None]
    np.add.at(dense, (group, query_positions[..., :, None], key_positions[:, :, None, :]), 1)
    np.testing.assert_array_equal(per_slot, dense[group, query_positions[..., :, None], key_positions[:, :, None, :]])


# --- LSH attention: gradient checks -----------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "n_positions, chunk_length, n_rounds, causal, dedup",
    [(7, 3, 2, False, False), (6, 2, 3, True, True), (5, 5, 1, True, False), (9, 2, 2, False, True)],
)
def test_lsh_attention_gradcheck(seed, n_positions, chunk_length, n_rounds, causal, dedup):
    rng = np.random.default_rng(seed)
    qk, v = random_inputs(rng, (1, 2), n_positions)
    rotations = draw_rotations(rng, n_rounds, 4, 4)
    forward, backward = reformer.frozen_lsh_attention(
        qk, v, rotations, n_buckets=4, chunk_length=chunk_length, causal=causal, dedup=dedup
    )
    result = gradcheck(forward, backward, [qk, v], names=["qk", "v"], rng=rng)
    result.assert_ok(1e-6)
    assert forward.moved_calls == 0, "a finite-difference step moved a token to another bucket"


def test_frozen_forward_detects_moved_buckets(rng):
    qk, v = random_inputs(rng, (), 6)
    rotations = draw_rotations(rng, 2, 4, 4)
    forward, _ = reformer.frozen_lsh_attention(qk, v, rotations, n_buckets=4, chunk_length=2)
    forward(qk, v)
    assert forward.moved_calls == 0
    forward(-qk, v)  # negation sends every vector to the opposite bucket
    assert forward.moved_calls == 1


def test_gradcheck_cases_pass(rng):
    cases = reformer.gradcheck_cases(rng)
    assert len(cases) >= 4
    for label, forward, backward, inputs, names in cases:
        result = gradcheck(forward, backward, inputs, names=names, rng=rng)
        assert result.max_rel_error <= 1e-6, f"{label}\n{result}"
        assert getattr(forward, "moved_calls", 0) == 0, label


# --- reversible layers ---------------------------------------------------------------------


def make_layers(rng, depth, **options):
    settings = {"n_buckets": 4, "chunk_length": 3, "n_rounds": 2, "dropout": 0.1, "ff_chunks": 3}
    settings.update(options)
    return [reformer.init_reformer_layer(8, 2, 12, rng, **settings) for _ in range(depth)]


@pytest.mark.parametrize("causal", [False, True])
def test_reversible_reconstructs_inputs(rng, causal):
    layers = make_layers(rng, 5, causal=causal)
    x = rng.standard_normal((2, 7, 8))
    inputs, records = [], []
    x1, x2 = x, x
    for layer in layers:
        inputs.append((x1, x2))
        x1, x2, record = reformer.reversible_layer_forward(x1, x2, layer, rng=rng)
        records.append(record)
    dy1, dy2 = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
    y1, y2 = x1, x2
    for layer, record, (stored_x1, stored_x2) in zip(layers[::-1], records[::-1], inputs[::-1]):
        y1, y2, dy1, dy2, _ = reformer.reversible_layer_backward(y1, y2, dy1, dy2, layer, record)
        assert np.max(np.abs(y1 - stored_x1)) <= 1e-10
        assert np.max(np.abs(y2 - stored_x2)) <= 1e-10


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_reversible_gradients_equal_ordinary_backprop(rng, dropout):
    layers = make_layers(rng, 4, dropout=dropout, causal=True)
    x = rng.standard_normal((2, 7, 8))
    out, cache = reformer.reversible_stack_forward(x, layers, rng=rng)
    ordinary_out, ordinary_cache = reformer.ordinary_stack_forward(x, layers, records=cache["records"])
    np.testing.assert_array_equal(out, ordinary_out)

    dout = rng.standard_normal(out.shape)
    dx, grads = reformer.reversible_stack_backward(dout, cache)
    ordinary_dx, ordinary_grads = reformer.ordinary_stack_backward(dout, ordinary_cache)
    np.testing.assert_allclose(dx, ordinary_dx, rtol=0, atol=1e-10)
    assert len(grads) == len(ordinary_grads) == 4
    for layer_grads, ordinary_layer_grads in zip(grads, ordinary_grads):
        assert set(layer_grads) == set(reformer.LAYER_PARAM_NAMES)
        for name in reformer.LAYER_PARAM_NAMES:
            np.testing.assert_allclose(layer_grads[name], ordinary_layer_grads[name], rtol=0, atol=1e-10, err_msg=name)


def test_reversible_backward_reuses_recorded_buckets(rng):
    # Rehashing the reconstructed input could pick other buckets; the record must win.
    layer = make_layers(rng, 1, dropout=0.0)[0]
    x1, x2 = rng.standard_normal((1, 6, 8)), rng.standard_normal((1, 6, 8))
    _, _, record = reformer.reversible_layer_forward(x1, x2, layer)
    other = dict(record, buckets=(record["buckets"] + 1) % layer.n_buckets)
    y1, y2, _ = reformer.reversible_layer_forward(x1, x2, layer, record=other)
    recovered_x1, recovered_x2, *_ = reformer.reversible_layer_backward(
        y1, y2, np.zeros_like(y1), np.zeros_like(y2), layer, other
    )
    np.testing.assert_allclose(recovered_x1, x1, rtol=0, atol=1e-12)
    np.testing.assert_allclose(recovered_x2, x2, rtol=0, atol=1e-12)


def test_dropout_needs_rng_or_record(rng):
    layer = make_layers(rng, 1, dropout=0.3)[0]
    x = rng.standard_normal((1, 6, 8))
    with pytest.raises(ValueError, match="dropout=0.3"):
        reformer.reversible_layer_forward(x, x, layer)


@pytest.mark.parametrize("seed", [0, 1])
def test_reversible_layer_gradcheck(seed):
    rng = np.random.default_rng(seed)
    layer = reformer.init_reformer_layer(4, 2, 6, rng, n_buckets=4, chunk_length=2, n_rounds=2, dropout=0.25, ff_chunks=2, causal=True)
    x1, x2 = rng.standard_normal((1, 5, 4)), rng.standard_normal((1, 5, 4))
    names = reformer.LAYER_PARAM_NAMES
    forward, backward = reformer.frozen_reversible_layer(x1, x2, layer, rng, names)
    inputs = [x1, x2, *(layer.params[name] for name in names)]
    result = gradcheck(forward, backward, inputs, names=["x1", "x2", *names], rng=rng)
    result.assert_ok(1e-6)
    assert forward.moved_calls == 0, "a finite-difference step moved a token to another bucket"


# --- chunked feed-forward -----------------------------------------------------------------------


@pytest.mark.parametrize("n_chunks", [1, 2, 3, 7, 10])
def test_chunked_ff_equals_unchunked(rng, n_chunks):
    x = rng.standard_normal((2, 10, 4))
    w1, b1, w2, b2 = rng.standard_normal((4, 6)), rng.standard_normal(6), rng.standard_normal((6, 4)), rng.standard_normal(4)
    chunked, cache = reformer.chunked_feed_forward_forward(x, w1, b1, w2, b2, n_chunks=n_chunks)
    whole, _ = feed_forward_forward(x, w1, b1, w2, b2)
    np.testing.assert_allclose(chunked, whole, rtol=1e-14, atol=1e-14)
    assert len(cache[1]) == n_chunks
    sizes = np.diff(cache[0])
    assert sizes.max() - sizes.min() <= 1


def test_chunked_ff_gradcheck(rng):
    x = rng.standard_normal((2, 7, 3))
    params = [rng.standard_normal((3, 5)), rng.standard_normal(5), rng.standard_normal((5, 3)), rng.standard_normal(3)]

    def forward(x, w1, b1, w2, b2):
        return reformer.chunked_feed_forward_forward(x, w1, b1, w2, b2, n_chunks=3, activation="gelu")

    result = gradcheck(forward, reformer.chunked_feed_forward_backward, [x, *params], names=["x", "W1", "b1", "W2", "b2"], rng=rng)
    result.assert_ok(1e-6)


def test_chunked_ff_rejects_bad_chunk_count(rng):
    x = rng.standard_normal((1, 4, 3))
    params = [rng.standard_normal((3, 5)), np.zeros(5), rng.standard_normal((5, 3)), np.zeros(3)]
    with pytest.raises(ValueError, match="n_chunks=5"):
        reformer.chunked_feed_forward_forward(x, *params, n_chunks=5)
    with pytest.raises(ValueError, match="n_chunks=0"):
        reformer.chunked_feed_forward_forward(x, *params, n_chunks=0)


# --- the method object ------------------------------------------------------------------------


def test_method_registry_and_shared_qk(rng):
    method = methods.make_method("reformer", rng=rng, n_buckets=4, chunk_length=3, n_rounds=2)
    assert method.name == "reformer"
    q, v = random_inputs(rng, (2, 2), 8)
    k_other = rng.standard_normal(q.shape)
    out, cache = method.forward(q, k_other, v)
    out_again, _ = method.forward(q, q, v)
    np.testing.assert_array_equal(out, out_again)  # keys are q / |q|, whatever k holds
    dq, dk, dv = method.backward(rng.standard_normal(out.shape), cache)
    np.testing.assert_array_equal(dk, 0.0)
    seen = method.keys_seen(cache)
    assert seen.shape == (2, 2, 8, 8)
    assert seen.dtype == bool
    assert np.all(np.diagonal(seen, axis1=-2, axis2=-1))


def test_method_honours_key_padding_mask_only(rng):
    method = reformer.make_method(rng, n_buckets=4, chunk_length=2)
    q, v = random_inputs(rng, (2, 1), 6)
    padding = np.ones((2, 1, 1, 6), dtype=bool)
    padding[1, ..., 4:] = False
    out, cache = method.forward(q, q, v, mask=padding, causal=True)
    seen = method.keys_seen(cache)
    assert not seen[1, ..., 4:].any()
    assert not np.triu(seen[0, 0], 1).any()
    with pytest.raises(ValueError, match="key padding masks"):
        method.forward(q, q, v, mask=np.ones((6, 6), dtype=bool))


def test_method_default_chunk_length_is_two_buckets(rng):
    method = reformer.make_method(rng, n_buckets=4)
    assert method.chunk_length_for(16) == 8
    assert method.chunk_length_for(3) == 2
    assert method.chunk_length_for(1) == 1


# --- bad input --------------------------------------------------------------------------------


def test_rejects_bad_bucket_count(rng):
    qk, v = random_inputs(rng, (), 6)
    for n_buckets in (3, 0, -4):
        with pytest.raises(ValueError, match=f"n_buckets={n_buckets}"):
            reformer.lsh_attention_forward(qk, v, n_buckets=n_buckets, chunk_length=2, buckets=np.zeros((1, 6), dtype=int))
        with pytest.raises(ValueError, match=f"n_buckets={n_buckets}"):
            reformer.make_method(rng, n_buckets=n_buckets)


def test_rejects_chunk_length_that_does_not_fit(rng):
    qk, v = random_inputs(rng, (), 6)
    rotations = draw_rotations(rng, 1, 4, 4)
    for chunk_length in (0, 7, -1):
        with pytest.raises(ValueError, match=f"chunk_length={chunk_length}"):
            reformer.lsh_attention_forward(qk, v, n_buckets=4, chunk_length=chunk_length, rotations=rotations)
    with pytest.raises(TypeError, match="chunk_length"):
        reformer.lsh_attention_forward(qk, v, n_buckets=4, chunk_length=2.5, rotations=rotations)


def test_rejects_rotations_of_wrong_shape(rng):
    qk, v = random_inputs(rng, (), 6)
    for shape in ((1, 3, 2), (1, 4, 3), (4, 2), (1, 4, 2, 1)):
        with pytest.raises(ValueError, match="rotations has shape"):
            reformer.lsh_attention_forward(qk, v, n_buckets=4, chunk_length=2, rotations=rng.standard_normal(shape))


def test_rejects_non_finite_inputs(rng):
    qk, v = random_inputs(rng, (), 6)
    rotations = draw_rotations(rng, 1, 4, 4)
    bad_qk, bad_v = qk.copy(), v.copy()
    bad_qk[1, 2] = np.inf
    bad_v[0, 0] = np.nan
    with pytest.raises(ValueError, match="qk contains 1 non-finite"):
        reformer.lsh_attention_forward(bad_qk, v, n_buckets=4, chunk_length=2, rotations=rotations)
    with pytest.raises(ValueError, match="v contains 1 non-finite"):
        reformer.lsh_attention_forward(qk, bad_v, n_buckets=4, chunk_length=2, rotations=rotations)


def test_rejects_bad_buckets_and_hashing_choice(rng):
    qk, v = random_inputs(rng, (), 6)
    rotations = draw_rotations(rng, 1, 4, 4)
    with pytest.raises(ValueError, match="exactly one"):
        reformer.lsh_attention_forward(qk, v, n_buckets=4, chunk_length=2)
    with pytest.raises(ValueError, match="exactly one"):
        reformer.lsh_attention_forward(qk, v, n_buckets=4, chunk_length=2, rotations=rotations, buckets=np.zeros((1, 6), dtype=int))
    with pytest.raises(ValueError, match=r"ids in \[0, 4\)"):
        reformer.lsh_attention_forward(qk, v, n_buckets=4, chunk_length=2, buckets=np.full((1, 6), 4))
    with pytest.raises(ValueError, match="buckets has shape"):
        reformer.lsh_attention_forward(qk, v, n_buckets=4, chunk_length=2, buckets=np.zeros((1, 5), dtype=int))
    with pytest.raises(TypeError, match="buckets has dtype"):
        reformer.lsh_attention_forward(qk, v, n_buckets=4, chunk_length=2, buckets=np.zeros((1, 6)))
    with pytest.raises(ValueError, match="v has shape"):
        reformer.lsh_attention_forward(qk, v[:5], n_buckets=4, chunk_length=2, rotations=rotations)


def test_method_rejects_rotations_of_wrong_shape(rng):
    with pytest.raises(ValueError, match="rotations has shape"):
        reformer.make_method(rng, n_buckets=4, n_rounds=2, rotations=rng.standard_normal((1, 4, 2)))
    method = reformer.make_method(rng, n_buckets=4, chunk_length=2, rotations=rng.standard_normal((1, 3, 2)))
    q, v = random_inputs(rng, (1, 1), 6)
    with pytest.raises(ValueError, match="rotations has shape"):
        method.forward(q, q, v)


def test_float32_runs_and_matches_float64(rng):
    qk, v = random_inputs(rng, (2,), 9)
    buckets = rng.integers(0, 4, size=(2, 2, 9))
    options = {"n_buckets": 4, "chunk_length": 4, "buckets": buckets, "causal": True, "dedup": True}
    out32, cache32 = reformer.lsh_attention_forward(qk.astype(np.float32), v.astype(np.float32), **options)
    out64, _ = reformer.lsh_attention_forward(qk, v, **options)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out64, rtol=0, atol=1e-5)
    dqk, dv = reformer.lsh_attention_backward(np.ones_like(out32), cache32)
    assert dqk.dtype == np.float32
    assert dv.dtype == np.float32
