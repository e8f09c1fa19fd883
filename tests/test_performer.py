"""Performer (FAVOR+): exact algebra, gradients, causality, padding and the random-feature error."""

import numpy as np
import pytest

from miniattn import gradcheck
from miniattn.core.masks import padding_mask
from miniattn.methods import make_method as make_registered_method
from miniattn.performer import (
    PerformerAttention,
    approximate_attention_matrix,
    compute_stabiliser,
    draw_features,
    favor_attention_backward,
    favor_attention_forward,
    gradcheck_cases,
    linear_attention_backward,
    linear_attention_forward,
    relu_kernel_features_backward,
    relu_kernel_features_forward,
    row_blocks,
    shared_key_stabiliser,
    softmax_exponents,
    softmax_kernel_features_backward,
    softmax_kernel_features_forward,
)
from miniattn.transformer import attention_backward, attention_forward

SHAPES = [(5, 7), (7, 5), (6, 6)]  # (N, M): fewer queries, more queries, square


def attention_inputs(rng, n_queries, n_keys, width=4, value_width=3, scale=1.0):
    q = scale * rng.standard_normal((2, 2, n_queries, width))  # (B, H, N, D)
    k = scale * rng.standard_normal((2, 2, n_keys, width))  # (B, H, M, D)
    v = rng.standard_normal((2, 2, n_keys, value_width))  # (B, H, M, Dv)
    return q, k, v


def relative_error(estimate, exact):
    return np.linalg.norm(estimate - exact) / np.linalg.norm(exact)


# --- random features -----------------------------------------------------------------


@pytest.mark.parametrize("num_features, width", [(4, 4), (10, 4), (3, 5)])
def test_orthogonal_features_blocks_are_orthogonal(rng, num_features, width):
    features = draw_features(num_features, width, rng)
    assert features.shape == (num_features, width)
    for start in range(0, num_features, width):
        block = features[start:start + width]
        gram = block @ block.T
        off_diagonal = gram - np.diag(np.diag(gram))
        np.testing.assert_allclose(off_diagonal, 0.0, atol=1e-12)


def test_orthogonal_row_norms_follow_chi_distribution(rng):
    # Rows marginally N(0, I_D) have E|w|^2 = D; fixed norms sqrt(D) would also pass
    # this, so the spread is checked too: Var|w|^2 = 2 D for a chi-squared law.
    width = 6
    squared_norms = np.sum(draw_features(6000, width, rng) ** 2, axis=1)
    standard_error = np.sqrt(2 * width / squared_norms.size)
    assert abs(squared_norms.mean() - width) < 4 * standard_error
    assert abs(squared_norms.var() / (2 * width) - 1.0) < 0.1


def test_features_come_from_the_given_generator():
    first = draw_features(8, 4, np.random.default_rng(3))
    again = draw_features(8, 4, np.random.default_rng(3))
    other = draw_features(8, 4, np.random.default_rng(4))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


@pytest.mark.parametrize("orthogonal", [False, True])
def test_softmax_kernel_estimate_is_unbiased(rng, orthogonal):
    # Monte Carlo over feature draws, stabiliser 0 and eps 0: the mean of
    # phi(q).phi(k) must be exp(q.k / sqrt(D)) within a few standard errors.
    width, num_features, draws = 6, 12, 3000
    q = 0.4 * rng.standard_normal((1, width))
    k = 0.4 * rng.standard_normal((1, width))
    exact = np.exp(float(q[0] @ k[0]) / np.sqrt(width))
    estimates = np.empty(draws)
    for draw in range(draws):
        features = draw_features(num_features, width, rng, orthogonal=orthogonal)
        phi_q, _ = softmax_kernel_features_forward(q, features, eps=0.0, stabiliser=0.0)
        phi_k, _ = softmax_kernel_features_forward(k, features, eps=0.0, stabiliser=0.0)
        estimates[draw] = float(phi_q[0] @ phi_k[0])
    standard_error = estimates.std(ddof=1) / np.sqrt(draws)
    assert abs(estimates.mean() - exact) < 4 * standard_error


def output_errors(num_features_list, seeds, *, orthogonal, width=8, length=16, scale=0.3):
    """Return the relative errors (seeds, len(num_features_list)) of FAVOR+ against exact attention."""
    errors = np.empty((len(seeds), len(num_features_list)))
    for row, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        q = scale * rng.standard_normal((1, 1, length, width))
        k = scale * rng.standard_normal((1, 1, length, width))
        v = rng.standard_normal((1, 1, length, width))
        exact, _ = attention_forward(q, k, v)
        for column, num_features in enumerate(num_features_list):
            features = draw_features(num_features, width, rng, orthogonal=orthogonal)
            out, _ = favor_attention_forward(q, k, v, features, eps=0.0)
            errors[row, column] = relative_error(out, exact)
    return errors


@pytest.mark.parametrize("orthogonal", [False, True])
def test_output_error_falls_as_inverse_sqrt_features(orthogonal):
    # Small norms (|x~| about 0.5) keep the estimator's tails light, so the
    # asymptotic m^-1/2 rate already shows at m = 16.
    num_features_list = [16, 64, 256, 1024, 4096]
    errors = output_errors(num_features_list, range(24), orthogonal=orthogonal)
    slope = np.polyfit(np.log(num_features_list), np.log(errors.mean(axis=0)), 1)[0]
    assert -0.65 <= slope <= -0.35, f"log-log slope {slope:.3f} of the mean error"


@pytest.mark.slow
@pytest.mark.parametrize("orthogonal", [False, True])
def test_output_error_slope_many_seeds(orthogonal):
    num_features_list = [16, 64, 256, 1024, 4096, 16384]
    errors = output_errors(num_features_list, range(200), orthogonal=orthogonal, length=32)
    slope = np.polyfit(np.log(num_features_list), np.log(errors.mean(axis=0)), 1)[0]
    assert -0.6 <= slope <= -0.4, f"log-log slope {slope:.3f} of the mean error"


def test_orthogonal_features_beat_iid_on_average():
    num_features_list = [16, 32, 64]
    seeds = range(40)
    iid = output_errors(num_features_list, seeds, orthogonal=False, width=16).mean()
    orthogonal = output_errors(num_features_list, seeds, orthogonal=True, width=16).mean()
    assert orthogonal <= iid, f"mean error orthogonal {orthogonal:.4f} > i.i.d. {iid:.4f}"


# --- exact algebra against the materialised matrix -----------------------------------


@pytest.mark.parametrize("n_queries, n_keys", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel, eps", [("softmax", 0.0), ("softmax", 1e-3), ("relu", 1e-3)])
def test_forward_equals_materialised_matrix(rng, n_queries, n_keys, causal, kernel, eps):
    q, k, v = attention_inputs(rng, n_queries, n_keys)
    features = draw_features(6, 4, rng)
    matrix = approximate_attention_matrix(q, k, features, causal=causal, kernel=kernel, eps=eps)
    expected = matrix @ v
    for size in (1, 2, 3, None):
        out, _ = favor_attention_forward(
            q, k, v, features, causal=causal, kernel=kernel, eps=eps, chunk_size=size or 64, block_rows=size
        )
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


def test_materialised_causal_matrix_is_lower_triangular(rng):
    q, k, _ = attention_inputs(rng, 4, 6)
    matrix = approximate_attention_matrix(q, k, draw_features(5, 4, rng), causal=True)
    future = np.arange(6)[None, :] > np.arange(4)[:, None] + 2  # j > i + (M - N)
    assert np.all(matrix[..., future] == 0.0)
    assert np.all(matrix[..., ~future] > 0.0)
    np.testing.assert_allclose(matrix.sum(axis=-1), 1.0, rtol=1e-14)


@pytest.mark.parametrize("n_queries, n_keys", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_matches_dense_oracle(rng, n_queries, n_keys, causal):
    # D^-1 A V with A = phi(Q) phi(K)^T is softmax(log A) V: the dense oracle
    # with zero scores and bias log A gives the same output and gradients.
    q, k, v = attention_inputs(rng, n_queries, n_keys)
    features = draw_features(6, 4, rng)
    query_features, _ = softmax_kernel_features_forward(q, features)
    key_features, _ = softmax_kernel_features_forward(k, features, stabiliser="shared")
    weights = query_features @ np.swapaxes(key_features, -1, -2)  # (B, H, N, M)
    zeros_q, zeros_k = np.zeros(q.shape[:-1] + (1,)), np.zeros(k.shape[:-1] + (1,))
    expected, oracle_cache = attention_forward(
        zeros_q, zeros_k, v, causal=causal, scale=0.0, bias=np.log(weights), bias_grad=True
    )
    out, cache = linear_attention_forward(query_features, key_features, v, causal=causal, chunk_size=2)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)

    dout = rng.standard_normal(out.shape)
    _, _, dv_expected, dbias = attention_backward(dout, oracle_cache)
    dweights = dbias / weights  # bias = log(weights)
    dquery_expected = dweights @ key_features
    dkey_expected = np.swapaxes(dweights, -1, -2) @ query_features
    dquery_features, dkey_features, dv = linear_attention_backward(dout, cache)
    np.testing.assert_allclose(dv, dv_expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dquery_features, dquery_expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dkey_features, dkey_expected, rtol=1e-10, atol=1e-12)


# --- gradient checks (features fixed, tolerance 1e-6) ------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_queries, n_keys", [(5, 7), (7, 4)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_favor_attention_gradcheck(seed, n_queries, n_keys, causal, eps):
    rng = np.random.default_rng(seed)
    q, k, v = attention_inputs(rng, n_queries, n_keys)
    features = draw_features(6, 4, rng)

    def forward(q, k, v):
        return favor_attention_forward(q, k, v, features, causal=causal, eps=eps, chunk_size=3)

    result = gradcheck(forward, favor_attention_backward, [q, k, v], names=["q", "k", "v"], rng=rng)
    result.assert_ok(1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("eps", [1e-6, 1e-3])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("block_rows", [3, None])
def test_gradcheck_large_norms_moves_stabilisers(seed, causal, eps, padded, block_rows):
    # |q|, |k| about 12 in width 16: most features fall far below eps, so the
    # output depends on the stabilisers c, and the backward must differentiate them.
    # One head keeps every input under 256 entries, so gradcheck steps each entry
    # on its own. A random direction over all entries at once takes a longer step,
    # and at these norms the curvature of exp then shows in the central difference.
    rng = np.random.default_rng(seed)
    q = 3.0 * rng.standard_normal((2, 1, 6, 16))  # (B, H, N, D)
    k = 3.0 * rng.standard_normal((2, 1, 8, 16))  # (B, H, M, D)
    v = rng.standard_normal((2, 1, 8, 3))  # (B, H, M, Dv)
    features = draw_features(16, 16, rng)
    key_valid = np.array([[True] * 8, [True] * 5 + [False] * 3])[:, None, :] if padded else None  # (B, 1, M)

    def forward(q, k, v):
        return favor_attention_forward(
            q, k, v, features, causal=causal, eps=eps, key_valid=key_valid, chunk_size=3, block_rows=block_rows
        )

    result = gradcheck(forward, favor_attention_backward, [q, k, v], names=["q", "k", "v"], rng=rng)
    result.assert_ok(1e-6)


@pytest.mark.parametrize("kernel, eps, size", [("softmax", 1e-3, 3.0), ("softmax", 0.0, 1.0), ("relu", 1e-3, 1.0)])
@pytest.mark.parametrize("block_rows", [1, 2, 3])
@pytest.mark.parametrize("causal, n_queries, n_keys", [(False, 5, 8), (True, 5, 8), (True, 8, 5)])
def test_row_blocks_give_the_one_block_result(rng, kernel, eps, size, block_rows, causal, n_queries, n_keys):
    # Large norms with eps > 0 make the output depend on the shared key
    # stabiliser, so its gradient, summed over key blocks, must reach the right key.
    # Causal with N > M leaves the first queries without a key, in no block.
    q, k, v = attention_inputs(rng, n_queries, n_keys, scale=size)
    features = draw_features(6, 4, rng)
    key_valid = np.ones((2, 1, n_keys), dtype=bool)
    key_valid[1, :, 3:] = False  # the second sequence's last blocks are all padding
    options = {"kernel": kernel, "eps": eps, "key_valid": key_valid, "causal": causal, "chunk_size": 1}
    expected, expected_cache = favor_attention_forward(q, k, v, features, block_rows=8, **options)
    out, cache = favor_attention_forward(q, k, v, features, block_rows=block_rows, **options)
    key_blocks = cache["blocks"] if causal else cache["blocks"][1]
    assert len(key_blocks) == -(-n_keys // block_rows)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    for used, reference in zip(cache["stabilisers"], expected_cache["stabilisers"]):
        if kernel == "relu":
            assert used is None
            assert reference is None
        else:
            np.testing.assert_allclose(used, reference, rtol=0, atol=1e-12)

    dout = rng.standard_normal(out.shape)
    for grad, reference in zip(favor_attention_backward(dout, cache), favor_attention_backward(dout, expected_cache)):
        np.testing.assert_allclose(grad, reference, rtol=0, atol=1e-12)


def test_blockwise_key_stabiliser_first_maximum(rng):
    k = rng.standard_normal((2, 3, 9, 4))  # (B, H, M, D)
    k[:, :, 7] = k[:, :, 1]  # the same key in the first and the last block: a tie across blocks
    features = draw_features(5, 4, rng)
    key_valid = rng.random((2, 3, 9)) < 0.7
    key_valid[..., 1] = key_valid[..., 7] = True
    key_valid[0, 0] = False  # a slice with no valid key gets c = 0
    _, exponents = softmax_exponents(k, features)
    expected, expected_argmax = compute_stabiliser(exponents, "shared", key_valid)
    for block_rows in (1, 2, 4, 9):
        stabiliser, argmax = shared_key_stabiliser(k, features, key_valid, row_blocks(9, block_rows))
        np.testing.assert_array_equal(stabiliser, expected)
        np.testing.assert_array_equal(argmax[0, 1:], expected_argmax[0, 1:])
        np.testing.assert_array_equal(argmax[1], expected_argmax[1])
        assert stabiliser[0, 0, 0, 0] == 0.0


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_frozen_stabilisers(rng, causal):
    q = 3.0 * rng.standard_normal((2, 1, 6, 16))  # (B, H, N, D)
    k = 3.0 * rng.standard_normal((2, 1, 8, 16))  # (B, H, M, D)
    v = rng.standard_normal((2, 1, 8, 3))  # (B, H, M, Dv)
    features = draw_features(16, 16, rng)
    _, cache = favor_attention_forward(q, k, v, features, causal=causal, eps=1e-3)
    frozen = cache["stabilisers"]

    def forward(q, k, v):
        return favor_attention_forward(q, k, v, features, causal=causal, eps=1e-3, stabilisers=frozen)

    result = gradcheck(forward, favor_attention_backward, [q, k, v], names=["q", "k", "v"], rng=rng)
    result.assert_ok(1e-6)
    _, cache = forward(q, k, v)
    for used, frozen_stabiliser in zip(cache["stabilisers"], frozen):
        np.testing.assert_array_equal(used, frozen_stabiliser)


@pytest.mark.parametrize("causal", [False, True])
def test_relu_kernel_attention_gradcheck(rng, causal):
    q, k, v = attention_inputs(rng, 5, 7)
    features = draw_features(6, 4, rng)

    def forward(q, k, v):
        return favor_attention_forward(q, k, v, features, causal=causal, kernel="relu")

    result = gradcheck(forward, favor_attention_backward, [q, k, v], names=["q", "k", "v"], rng=rng)
    result.assert_ok(1e-6)


@pytest.mark.parametrize("stabiliser", ["row", "shared"])
def test_softmax_features_gradcheck_with_frozen_stabiliser(rng, stabiliser):
    x = rng.standard_normal((2, 6, 4))
    features = draw_features(7, 4, rng)
    valid = np.array([[True] * 6, [True] * 4 + [False] * 2])
    _, cache = softmax_kernel_features_forward(x, features, eps=1e-3, stabiliser=stabiliser, valid=valid)
    frozen = cache["stabiliser"]

    def forward(x):
        return softmax_kernel_features_forward(x, features, eps=1e-3, stabiliser=frozen, valid=valid)

    result = gradcheck(forward, softmax_kernel_features_backward, [x], names=["x"], rng=rng)
    result.assert_ok(1e-6)


@pytest.mark.parametrize("stabiliser", ["row", "shared"])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_features_gradcheck_computed_stabiliser(rng, stabiliser, eps):
    # phi itself depends on c for any eps: c is differentiated as the max it is.
    x = 2.0 * rng.standard_normal((2, 6, 4))
    features = draw_features(7, 4, rng)
    valid = np.array([[True] * 6, [True] * 4 + [False] * 2])

    def forward(x):
        return softmax_kernel_features_forward(x, features, eps=eps, stabiliser=stabiliser, valid=valid)

    result = gradcheck(forward, softmax_kernel_features_backward, [x], names=["x"], rng=rng)
    result.assert_ok(1e-6)


def test_stabiliser_argmax_over_valid_entries(rng):
    x = rng.standard_normal((2, 6, 4))
    features = draw_features(7, 4, rng)
    valid = np.array([[True] * 6, [True] * 4 + [False] * 2])
    x[1, 5] *= 10.0  # a padded key with a large exponent must not set c
    for mode in ("row", "shared"):
        _, cache = softmax_kernel_features_forward(x, features, stabiliser=mode, valid=valid)
        x_scaled = x / 4**0.25
        exponents = x_scaled @ features.T - 0.5 * np.sum(x_scaled**2, axis=-1, keepdims=True)  # (2, 6, 7)
        if mode == "row":
            np.testing.assert_array_equal(cache["argmax"][..., 0], np.argmax(exponents, axis=-1))
        else:
            exponents = np.where(valid[..., None], exponents, -np.inf)  # (2, 6, 7)
            flat = exponents.reshape(2, -1)
            np.testing.assert_array_equal(cache["argmax"][:, 0, 0], np.argmax(flat, axis=-1))
            assert cache["argmax"][1, 0, 0] // 7 < 4, "c is taken over valid keys only"
        np.testing.assert_allclose(
            cache["stabiliser"], np.take_along_axis(
                exponents if mode == "row" else exponents.reshape(2, 1, -1), cache["argmax"], axis=-1
            ), rtol=1e-12,
        )


@pytest.mark.parametrize("stabiliser", ["row", "shared"])
def test_stabiliser_tie_goes_to_first_maximum(rng, stabiliser):
    # Feature rows 0 and 1 are equal (6 d for a unit vector d), so their
    # exponents tie for every input and the tie survives every finite-difference
    # step. Row 0 of each slice is x~ = 3 d, exponent 18 - 4.5 = 13.5, the
    # largest of its row and of its slice. The other rows keep gradients that
    # are not negligible: for "shared" they are x~ = 2 d + 0.2 noise, exponents
    # near 10, below 13.5 but close; for "row" they are random, with their own c.
    direction = rng.standard_normal(4)
    direction /= np.linalg.norm(direction)
    features = draw_features(6, 4, rng)
    features[0] = features[1] = 6.0 * direction
    if stabiliser == "shared":
        x_scaled = 2.0 * direction + 0.2 * rng.standard_normal((2, 5, 4))  # (2, 5, D)
    else:
        x_scaled = rng.standard_normal((2, 5, 4))  # (2, 5, D)
    x_scaled[:, 0] = 3.0 * direction
    x = x_scaled * 4**0.25
    _, cache = softmax_kernel_features_forward(x, features, eps=1e-3, stabiliser=stabiliser)
    np.testing.assert_array_equal(cache["argmax"][:, 0, 0], [0, 0])  # row 0, feature 0
    np.testing.assert_allclose(cache["stabiliser"][:, 0, 0], [13.5, 13.5], rtol=1e-12)

    def forward(x):
        return softmax_kernel_features_forward(x, features, eps=1e-3, stabiliser=stabiliser)

    result = gradcheck(forward, softmax_kernel_features_backward, [x], names=["x"], rng=rng)
    result.assert_ok(1e-6)


def test_relu_features_gradcheck(rng):
    x = rng.standard_normal((2, 6, 4))
    features = draw_features(7, 4, rng)
    valid = np.array([[True] * 6, [True] * 3 + [False] * 3])

    def forward(x):
        return relu_kernel_features_forward(x, features, valid=valid)

    result = gradcheck(forward, relu_kernel_features_backward, [x], names=["x"], rng=rng)
    result.assert_ok(1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_gradcheck(rng, causal):
    query_features = rng.random((2, 6, 5)) + 0.1  # (B, N, F), positive
    key_features = rng.random((2, 4, 5)) + 0.1  # (B, M, F)
    v = rng.standard_normal((2, 4, 3))

    def forward(query_features, key_features, v):
        return linear_attention_forward(query_features, key_features, v, causal=causal, chunk_size=3)

    result = gradcheck(
        forward, linear_attention_backward, [query_features, key_features, v],
        names=["query_features", "key_features", "v"], rng=rng,
    )
    result.assert_ok(1e-6)


def test_gradcheck_cases_pass(rng):
    cases = gradcheck_cases(rng)
    assert len(cases) >= 4
    for label, forward, backward, inputs, names in cases:
        result = gradcheck(forward, backward, inputs, names=names, rng=rng)
        assert result.passed(1e-6), f"{label}:\n{result}"


# --- causality, overflow, padding -------------------------------------------------------


@pytest.mark.parametrize("n_queries, n_keys", [(6, 6), (4, 6)])
def test_causal_later_token_changes_no_earlier_output(rng, n_queries, n_keys):
    q, k, v = attention_inputs(rng, n_queries, n_keys)
    features = draw_features(8, 4, rng)
    changed = n_queries - 2  # query row whose key position is M - 2
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    q2[..., changed:, :] += rng.standard_normal(q2[..., changed:, :].shape)
    k2[..., n_keys - 2:, :] += 3.0 * rng.standard_normal(k2[..., n_keys - 2:, :].shape)
    v2[..., n_keys - 2:, :] += rng.standard_normal(v2[..., n_keys - 2:, :].shape)

    # eps = 0: the shared key stabiliser moves with the new keys but cancels.
    before, _ = favor_attention_forward(q, k, v, features, causal=True, eps=0.0)
    after, _ = favor_attention_forward(q2, k2, v2, features, causal=True, eps=0.0)
    np.testing.assert_allclose(after[..., :changed, :], before[..., :changed, :], rtol=0, atol=1e-13)
    assert not np.allclose(after[..., changed:, :], before[..., changed:, :])

    # eps > 0 with the stabilisers held fixed: exact causality again.
    before, cache = favor_attention_forward(q, k, v, features, causal=True, eps=1e-3)
    after, _ = favor_attention_forward(
        q2, k2, v2, features, causal=True, eps=1e-3, stabilisers=cache["stabilisers"]
    )
    np.testing.assert_allclose(after[..., :changed, :], before[..., :changed, :], rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype, norm", [(np.float64, 60.0), (np.float32, 20.0)])
@pytest.mark.parametrize("causal", [False, True])
def test_large_norms_do_not_overflow(rng, dtype, norm, causal):
    width = 16
    direction = rng.standard_normal(width)
    direction /= np.linalg.norm(direction)
    q = (norm * direction + 0.1 * rng.standard_normal((1, 1, 5, width))).astype(dtype)
    k = (norm * direction + 0.1 * rng.standard_normal((1, 1, 5, width))).astype(dtype)
    v = rng.standard_normal((1, 1, 5, 3)).astype(dtype)
    with np.errstate(over="ignore"):
        plain = np.exp(q[0, 0] @ k[0, 0].T / dtype(np.sqrt(width)))
    assert np.all(np.isinf(plain)), "the inputs must make the plain kernel overflow"

    features = draw_features(32, width, rng, dtype=dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        out, cache = favor_attention_forward(q, k, v, features, causal=causal)
        grads = favor_attention_backward(np.ones_like(out), cache)
    assert out.dtype == dtype
    assert np.all(np.isfinite(out))
    assert all(np.all(np.isfinite(grad)) for grad in grads)
    assert np.all(cache["inverse"] > 0), "every row keeps a normaliser"


@pytest.mark.parametrize("eps", [0.0, 1e-3])
@pytest.mark.parametrize("block_rows", [2, None])
def test_padding_equals_unpadded_sequence(rng, eps, block_rows):
    q, k, v = attention_inputs(rng, 5, 8)
    features = draw_features(6, 4, rng)
    length = 5
    key_valid = np.arange(8) < length  # (M,)
    padded, cache = favor_attention_forward(q, k, v, features, key_valid=key_valid, eps=eps, block_rows=block_rows)
    unpadded, unpadded_cache = favor_attention_forward(
        q, k[..., :length, :], v[..., :length, :], features, eps=eps, block_rows=block_rows
    )
    np.testing.assert_allclose(padded, unpadded, rtol=0, atol=1e-12)

    dout = rng.standard_normal(padded.shape)
    dq, dk, dv = favor_attention_backward(dout, cache)
    dq_ref, dk_ref, dv_ref = favor_attention_backward(dout, unpadded_cache)
    np.testing.assert_allclose(dq, dq_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dk[..., :length, :], dk_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dv[..., :length, :], dv_ref, rtol=0, atol=1e-12)
    assert np.all(dk[..., length:, :] == 0.0)
    assert np.all(dv[..., length:, :] == 0.0)


def test_causal_padding_equals_unpadded_prefix(rng):
    q, k, v = attention_inputs(rng, 7, 7)
    features = draw_features(6, 4, rng)
    length = 4
    padded, _ = favor_attention_forward(q, k, v, features, causal=True, key_valid=np.arange(7) < length, eps=1e-3)
    unpadded, _ = favor_attention_forward(
        q[..., :length, :], k[..., :length, :], v[..., :length, :], features, causal=True, eps=1e-3
    )
    np.testing.assert_allclose(padded[..., :length, :], unpadded, rtol=0, atol=1e-12)


def test_fully_padded_sequence_gives_zero_output_and_gradients(rng):
    q, k, v = attention_inputs(rng, 4, 5)
    features = draw_features(6, 4, rng)
    key_valid = np.ones((2, 1, 5), dtype=bool)
    key_valid[1] = False  # the second sequence has no valid key
    for causal, block_rows in ((False, None), (False, 2), (True, None), (True, 2)):
        out, cache = favor_attention_forward(q, k, v, features, causal=causal, key_valid=key_valid, block_rows=block_rows)
        dq, dk, dv = favor_attention_backward(rng.standard_normal(out.shape), cache)
        assert np.all(out[1] == 0.0)
        assert np.all(dq[1] == 0.0)
        assert np.all(dk[1] == 0.0)
        assert np.all(dv[1] == 0.0)
        assert np.all(np.isfinite(out))
        assert np.all(np.isfinite(dq))


def test_causal_queries_before_every_key_get_zero_rows(rng):
    q, k, v = attention_inputs(rng, 7, 4)  # bottom-right: the first 3 queries see no key
    out, cache = favor_attention_forward(q, k, v, draw_features(6, 4, rng), causal=True)
    dq, _, _ = favor_attention_backward(rng.standard_normal(out.shape), cache)
    assert np.all(out[..., :3, :] == 0.0)
    assert np.all(dq[..., :3, :] == 0.0)
    assert np.all(out[..., 3:, :] != 0.0)


# --- the method object ------------------------------------------------------------------


def test_method_keeps_features_until_redraw(rng):
    method = make_registered_method("performer", rng=np.random.default_rng(5), num_features=8)
    assert method.name == "performer"
    q, k, v = attention_inputs(rng, 5, 6)
    first, cache = method.forward(q, k, v)
    drawn = method.features.copy()
    again, _ = method.forward(q, k, v)
    np.testing.assert_array_equal(first, again)
    assert method.keys_seen(cache) is None

    method.redraw_features()
    assert method.features.shape == drawn.shape
    assert not np.allclose(method.features, drawn)
    np.testing.assert_array_equal(cache["features"], drawn)  # the backward uses the forward's features
    redrawn, _ = method.forward(q, k, v)
    assert not np.allclose(redrawn, first)


def test_method_gradcheck_through_object(rng):
    method = PerformerAttention(rng=np.random.default_rng(1), num_features=6, width=4, eps=0.0)
    q, k, v = attention_inputs(rng, 5, 7)
    mask = padding_mask(np.array([7, 5]), 7)  # (B, 1, 1, M)
    for causal in (False, True):
        result = gradcheck(
            lambda q, k, v: method.forward(q, k, v, mask=mask, causal=causal),
            method.backward, [q, k, v], names=["q", "k", "v"], rng=rng,
        )
        result.assert_ok(1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_method_gradcheck_large_norms(rng, causal):
    # As the tour checks it: the default object, one head, 32 positions,
    # width 16, |q| and |k| about 12, so the stabilisers matter.
    method = make_registered_method("performer", rng=np.random.default_rng(3))
    q = 3.0 * rng.standard_normal((1, 1, 32, 16))  # (B, H, N, D)
    k = 3.0 * rng.standard_normal((1, 1, 32, 16))  # (B, H, M, D)
    v = rng.standard_normal((1, 1, 32, 16))  # (B, H, M, Dv)
    result = gradcheck(
        lambda q, k, v: method.forward(q, k, v, causal=causal),
        method.backward, [q, k, v], names=["q", "k", "v"], rng=rng,
    )
    result.assert_ok(1e-6)


def test_method_padding_mask_matches_key_valid(rng):
    method = PerformerAttention(rng=np.random.default_rng(2), num_features=6, width=4)
    q, k, v = attention_inputs(rng, 5, 7)
    out, _ = method.forward(q, k, v, mask=padding_mask(np.array([7, 3]), 7))
    expected, _ = favor_attention_forward(
        q, k, v, method.features, key_valid=np.array([[True] * 7, [True] * 3 + [False] * 4])[:, None, :]
    )
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-15)


def test_method_rejects_per_query_mask(rng):
    method = PerformerAttention(rng=np.random.default_rng(2), num_features=6, width=4)
    q, k, v = attention_inputs(rng, 5, 7)
    with pytest.raises(ValueError, match="key-padding"):
        method.forward(q, k, v, mask=np.ones((5, 7), dtype=bool))


def test_method_rejects_other_width_after_draw(rng):
    method = PerformerAttention(rng=np.random.default_rng(2), num_features=6, width=4)
    q, k, v = attention_inputs(rng, 5, 7, width=6)
    with pytest.raises(ValueError, match=r"features has shape \(6, 4\)"):
        method.forward(q, k, v)


def test_method_float32_output_dtype(rng):
    method = PerformerAttention(rng=np.random.default_rng(2), num_features=16)
    q, k, v = (x.astype(np.float32) for x in attention_inputs(rng, 5, 7))
    for causal in (False, True):
        out, cache = method.forward(q, k, v, causal=causal)
        grads = method.backward(np.ones_like(out), cache)
        assert out.dtype == np.float32
        assert all(grad.dtype == np.float32 for grad in grads)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, -3])
def test_non_positive_feature_count_rejected(rng, count):
    with pytest.raises(ValueError, match=f"num_features={count}"):
        draw_features(count, 4, rng)
    with pytest.raises(ValueError, match=f"num_features={count}"):
        PerformerAttention(num_features=count)


def test_non_integer_feature_count_rejected(rng):
    with pytest.raises(TypeError, match="num_features must be an integer"):
        draw_features(8.0, 4, rng)


@pytest.mark.parametrize("shape", [(6, 5), (6,), (0, 4), (2, 6, 4)])
def test_feature_matrix_of_wrong_shape_rejected(rng, shape):
    q, k, v = attention_inputs(rng, 5, 7)
    with pytest.raises(ValueError, match="features has shape"):
        favor_attention_forward(q, k, v, np.ones(shape))


def test_non_finite_inputs_rejected(rng):
    q, k, v = attention_inputs(rng, 5, 7)
    features = draw_features(6, 4, rng)
    for name, array in (("q", q), ("k", k), ("v", v), ("features", features)):
        bad = array.copy()
        bad.flat[3] = np.nan if name != "k" else np.inf
        inputs = {"q": q, "k": k, "v": v, "features": features, name: bad}
        with pytest.raises(ValueError, match=f"{name} contains 1 non-finite"):
            favor_attention_forward(inputs["q"], inputs["k"], inputs["v"], inputs["features"])


def test_bad_options_rejected(rng):
    q, k, v = attention_inputs(rng, 5, 7)
    features = draw_features(6, 4, rng)
    with pytest.raises(ValueError, match="eps=-0.1"):
        favor_attention_forward(q, k, v, features, eps=-0.1)
    with pytest.raises(ValueError, match="kernel='cosine'"):
        favor_attention_forward(q, k, v, features, kernel="cosine")
    with pytest.raises(ValueError, match="chunk_size=0"):
        favor_attention_forward(q, k, v, features, causal=True, chunk_size=0)
    with pytest.raises(ValueError, match="block_rows=0"):
        favor_attention_forward(q, k, v, features, block_rows=0)
    with pytest.raises(ValueError, match="query stabiliser has shape"):
        favor_attention_forward(q, k, v, features, stabilisers=(np.zeros((2, 2, 4, 1)), 0.0))
    with pytest.raises(ValueError, match="key stabiliser contains non-finite"):
        favor_attention_forward(q, k, v, features, stabilisers=(0.0, np.inf))
    with pytest.raises(ValueError, match="key_valid has shape"):
        favor_attention_forward(q, k, v, features, key_valid=np.ones(6, dtype=bool))
    with pytest.raises(TypeError, match="key_valid must be a bool"):
        favor_attention_forward(q, k, v, features, key_valid=np.ones(7))
    with pytest.raises(ValueError, match="relu kernel has none"):
        favor_attention_forward(q, k, v, features, kernel="relu", stabilisers=(0.0, 0.0))
    with pytest.raises(ValueError, match="stabiliser='column'"):
        softmax_kernel_features_forward(q, features, stabiliser="column")
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        draw_features(4, 4, 7)


def test_method_uses_given_features(rng):
    features = draw_features(6, 4, rng)
    method = PerformerAttention(features=features)
    q, k, v = attention_inputs(rng, 5, 7)
    out, _ = method.forward(q, k, v, causal=True)
    expected, _ = favor_attention_forward(q, k, v, features, causal=True)
    np.testing.assert_array_equal(out, expected)
    assert method.num_features == 6


def test_method_redraw_needs_width_before_first_forward():
    method = PerformerAttention(num_features=6)
    with pytest.raises(ValueError, match="needs width=D"):
        method.redraw_features()
    assert method.redraw_features(width=4).shape == (6, 4)
