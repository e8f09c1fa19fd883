"""Softmax, log-sum-exp and masks: values, gradients and edge rows."""

import numpy as np
import pytest

from miniattn import gradcheck
from miniattn.core.masks import causal_mask, combine_masks, padding_mask
from miniattn.core.softmax import (
    logsumexp_backward,
    logsumexp_forward,
    softmax_backward,
    softmax_forward,
)


def test_softmax_matches_direct_formula(rng):
    x = rng.standard_normal((3, 5))
    p, _ = softmax_forward(x)
    expected = np.exp(x) / np.exp(x).sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(p, expected, rtol=1e-14)


def test_softmax_masked_entries_are_exact_zeros(rng):
    x = rng.standard_normal((4, 6))
    allowed = rng.random((4, 6)) < 0.5
    allowed[:, 0] = True
    p, _ = softmax_forward(x, allowed)
    assert np.all(p[~allowed] == 0.0)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-14)


def test_softmax_fully_masked_row_is_zero_not_nan(rng):
    x = rng.standard_normal((3, 4))
    allowed = np.ones((3, 4), dtype=bool)
    allowed[1] = False
    p, cache = softmax_forward(x, allowed)
    assert np.all(p[1] == 0.0)
    dx = softmax_backward(rng.standard_normal((3, 4)), cache)
    assert np.all(np.isfinite(dx))
    assert np.all(dx[1] == 0.0)


def test_softmax_float32_large_logits_do_not_overflow():
    x = np.array([[1e4, -1e4, 9999.0], [-1e4, -1e4, -1e4]], dtype=np.float32)
    p, _ = softmax_forward(x)
    assert p.dtype == np.float32
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_softmax_gradcheck(rng, masked):
    x = rng.standard_normal((3, 5))
    allowed = None
    if masked:
        allowed = rng.random((3, 5)) < 0.6
        allowed[2] = False  # one fully masked row
    result = gradcheck(lambda x: softmax_forward(x, allowed), softmax_backward, [x], names=["x"], rng=rng)
    result.assert_ok(1e-6)


def test_logsumexp_values_and_empty_row(rng):
    x = rng.standard_normal((3, 7))
    allowed = np.ones_like(x, dtype=bool)
    allowed[0] = False
    lse, _ = logsumexp_forward(x, allowed)
    assert lse[0] == -np.inf
    np.testing.assert_allclose(lse[1:], np.log(np.exp(x[1:]).sum(axis=-1)), rtol=1e-14)


def test_logsumexp_gradcheck(rng):
    x = rng.standard_normal((4, 6))
    allowed = rng.random((4, 6)) < 0.7
    allowed[:, 0] = True
    result = gradcheck(lambda x: logsumexp_forward(x, allowed), logsumexp_backward, [x], rng=rng)
    result.assert_ok(1e-6)


def test_causal_mask_bottom_right_alignment():
    mask = causal_mask(2, 5)
    expected = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(mask, expected)
    tall = causal_mask(5, 2)
    assert not tall[:3].any()  # the first N - M queries precede every key
    np.testing.assert_array_equal(tall[3:], np.array([[1, 0], [1, 1]], dtype=bool))


def test_causal_mask_matches_rule_brute_force():
    for n, m in [(3, 3), (2, 5), (5, 2), (4, 7)]:
        mask = causal_mask(n, m)
        for i in range(n):
            for j in range(m):
                assert mask[i, j] == (j <= i + (m - n))


def test_causal_mask_top_left_alignment():
    np.testing.assert_array_equal(causal_mask(2, 5, "top_left"), np.tri(2, 5, dtype=bool))


def test_padding_mask_shape_and_values():
    mask = padding_mask(np.array([2, 4]), 4)
    assert mask.shape == (2, 1, 1, 4)
    np.testing.assert_array_equal(mask[:, 0, 0], [[1, 1, 0, 0], [1, 1, 1, 1]])


def test_combine_masks_is_logical_and():
    a = np.array([[True, False], [True, True]])
    b = np.array([[True, True], [False, True]])
    np.testing.assert_array_equal(combine_masks(a, None, b), a & b)
    assert combine_masks(None, None) is None


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: causal_mask(-1, 3), ValueError),
        (lambda: causal_mask(2, 3, "middle"), ValueError),
        (lambda: padding_mask(np.array([5]), 4), ValueError),
        (lambda: padding_mask(np.array([1.5]), 4), TypeError),
    ],
)
def test_masks_reject_bad_input(call, error):
    with pytest.raises(error):
        call()
