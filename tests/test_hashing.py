"""Angular LSH bucketing and the bucket sort: definition, invariances, and backend agreement."""

import numpy as np
import pytest

from miniattn.core import hashing, kernels

BACKENDS = kernels.available_backends()


def brute_force_buckets(x, rotations):
    """Bucket ids (K, N) from a per-vector loop: first maximum of [xR, -xR] plus r (nb + 1)."""
    n_rounds, _, half = rotations.shape
    ids = np.empty((n_rounds, x.shape[0]), dtype=np.int64)
    for r in range(n_rounds):
        for t in range(x.shape[0]):
            projected = x[t] @ rotations[r]
            candidates = list(projected) + list(-projected)
            best = 0
            for j, value in enumerate(candidates):
                if value > candidates[best]:
                    best = j
            ids[r, t] = r * (2 * half + 1) + best
    return ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_hash_matches_brute_force(rng, backend):
    x = rng.standard_normal((9, 5))
    rotations = hashing.draw_rotations(rng, 3, 5, 6)
    ids = hashing.lsh_hash(x, rotations, backend=backend)
    np.testing.assert_array_equal(ids, brute_force_buckets(x, rotations))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hash_padding_ids_sort_last(rng, backend):
    x = rng.standard_normal((2, 4, 3))
    rotations = hashing.draw_rotations(rng, 2, 3, 4)
    ids = hashing.lsh_hash(x, rotations, length=7, backend=backend)
    assert ids.shape == (2, 2, 7)
    np.testing.assert_array_equal(ids[:, 0, 4:], 4)
    np.testing.assert_array_equal(ids[:, 1, 4:], 9)
    assert ids[:, 0, :4].max() < 4 and ids[:, 1, :4].min() >= 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_hash_scale_invariant(rng, backend):
    x = rng.standard_normal((3, 20, 6))
    rotations = hashing.draw_rotations(rng, 2, 6, 8)
    scale = rng.uniform(0.01, 100.0, size=(3, 20, 1))
    ids = hashing.lsh_hash(x, rotations, backend=backend)
    np.testing.assert_array_equal(hashing.lsh_hash(x * scale, rotations, backend=backend), ids)


def test_hash_is_closest_signed_direction(rng):
    x = rng.standard_normal((30, 4))
    rotations = hashing.draw_rotations(rng, 1, 4, 6)
    ids = hashing.lsh_hash(x, rotations)[0]
    directions = np.concatenate([rotations[0], -rotations[0]], axis=1)  # (D, nb)
    np.testing.assert_array_equal(ids, np.argmax(x @ directions, axis=1))


def test_collisions_fall_with_angle(rng):
    rotations = hashing.draw_rotations(rng, 400, 8, 8)
    base = rng.standard_normal(8)
    base /= np.linalg.norm(base)
    across = rng.standard_normal(8)
    across -= base * (across @ base)
    across /= np.linalg.norm(across)
    rates = []
    for angle in (0.1, 0.6, 1.5):
        pair = np.stack([base, np.cos(angle) * base + np.sin(angle) * across])
        ids = hashing.lsh_hash(pair, rotations)
        rates.append(np.mean(ids[:, 0] == ids[:, 1]))
    assert rates[0] > rates[1] > rates[2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_first_maximum(backend):
    rotations = np.zeros((2, 2, 2))
    rotations[:, 0, 0] = 1.0
    rotations[:, 1, 1] = -1.0
    # p = (x0, -x1): x = 0 ties everywhere; (1, -1) ties +p_0 with +p_1; (-1, 1) ties -p_0 with -p_1;
    # (1, 1) ties +p_0 with -p_1.
    x = np.array([[0.0, 0.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]])
    ids = hashing.lsh_hash(x, rotations, backend=backend)
    np.testing.assert_array_equal(ids[0], [0, 0, 2, 0])
    np.testing.assert_array_equal(ids[1], [5, 5, 7, 5])


def test_sort_orders_by_round_bucket_position(rng):
    ids = rng.integers(0, 3, size=(2, 6)) + 4 * np.arange(2)[:, None]  # (K, L) ids with offsets
    sticker, undo = hashing.lsh_sort(ids, backend="numpy")
    items = [(ids.ravel()[s], s % 6) for s in sticker]
    assert items == sorted(items)
    np.testing.assert_array_equal(sticker[undo], np.arange(12))
    np.testing.assert_array_equal(undo[sticker], np.arange(12))


@pytest.mark.skipif("cython" not in BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize(
    "shape, n_buckets, length_extra",
    [((1, 1), 2, 0), ((1, 1), 2, 3), ((17, 3), 4, 0), ((2, 3, 13, 4), 8, 5), ((50, 2), 16, 0)],
)
@pytest.mark.parametrize("n_rounds", [1, 4])
def test_backends_agree_bit_for_bit(rng, shape, n_buckets, length_extra, n_rounds):
    x = rng.standard_normal(shape)
    rotations = hashing.draw_rotations(rng, n_rounds, shape[-1], n_buckets)
    length = shape[-2] + length_extra
    ids_numpy = hashing.lsh_hash(x, rotations, length=length, backend="numpy")
    ids_cython = hashing.lsh_hash(x, rotations, length=length, backend="cython")
    np.testing.assert_array_equal(ids_numpy, ids_cython)
    for numpy_part, cython_part in zip(
        hashing.lsh_sort(ids_numpy, backend="numpy"), hashing.lsh_sort(ids_numpy, backend="cython")
    ):
        assert numpy_part.dtype == cython_part.dtype == np.int64
        np.testing.assert_array_equal(numpy_part, cython_part)


@pytest.mark.skipif("cython" not in BACKENDS, reason="compiled extension not built")
def test_backends_agree_on_integer_ties(rng):
    # Small integers make exact ties between projections common.
    for _ in range(50):
        x = rng.integers(-2, 3, size=(2, 7, 3)).astype(np.float64)
        rotations = rng.integers(-1, 2, size=(3, 3, 2)).astype(np.float64)
        ids = hashing.lsh_hash(x, rotations, length=9, backend="numpy")
        np.testing.assert_array_equal(ids, hashing.lsh_hash(x, rotations, length=9, backend="cython"))
        for numpy_part, cython_part in zip(hashing.lsh_sort(ids, backend="numpy"), hashing.lsh_sort(ids, backend="cython")):
            np.testing.assert_array_equal(numpy_part, cython_part)


@pytest.mark.skipif("cython" not in BACKENDS, reason="compiled extension not built")
def test_backends_agree_on_float32_and_strided_input(rng):
    x = rng.standard_normal((6, 40)).astype(np.float32)[:, ::4]  # non-contiguous (6, 10)
    rotations = hashing.draw_rotations(rng, 2, 10, 6, dtype=np.float32)
    np.testing.assert_array_equal(
        hashing.lsh_hash(x, rotations, backend="numpy"), hashing.lsh_hash(x, rotations, backend="cython")
    )


def test_rejects_odd_or_non_positive_bucket_count(rng):
    for n_buckets in (3, 0, -2):
        with pytest.raises(ValueError, match=f"n_buckets={n_buckets}"):
            hashing.draw_rotations(rng, 1, 4, n_buckets)
    with pytest.raises(TypeError, match="n_buckets"):
        hashing.draw_rotations(rng, 1, 4, 4.0)


def test_rejects_rotations_of_wrong_shape(rng):
    x = rng.standard_normal((5, 4))
    for rotations in (rng.standard_normal((2, 3, 2)), rng.standard_normal((4, 2)), rng.standard_normal((1, 4, 0))):
        with pytest.raises(ValueError, match=r"rotations has shape"):
            hashing.lsh_hash(x, rotations)
    with pytest.raises(ValueError, match="x has vector width D=3"):
        hashing.lsh_hash(x[:, :3].copy(), rng.standard_normal((2, 4, 2)))


def test_rejects_non_finite_input(rng):
    x = rng.standard_normal((5, 4))
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        hashing.lsh_hash(x, hashing.draw_rotations(rng, 1, 4, 4))


def test_rejects_short_length_and_bad_ids(rng):
    x = rng.standard_normal((5, 4))
    with pytest.raises(ValueError, match="length=3"):
        hashing.lsh_hash(x, hashing.draw_rotations(rng, 1, 4, 4), length=3)
    with pytest.raises(TypeError, match="integer"):
        hashing.lsh_sort(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="non-negative"):
        hashing.lsh_sort(np.array([[0, -1, 2]]))
    with pytest.raises(ValueError, match=r"buckets has shape \(5,\); expected \(\.\.\., K, L\)"):
        hashing.lsh_sort(np.arange(5))
