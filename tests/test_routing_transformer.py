"""Routing attention: dense equality, frozen-routing oracle, gradients, k-means, causality."""

import numpy as np
import pytest

from miniattn import gradcheck, methods
from miniattn.core import kernels
from miniattn.nn.functional import layer_norm_forward
from miniattn.routing_transformer import (
    RoutingAttention,
    commitment_loss_backward,
    commitment_loss_forward,
    gradcheck_cases,
    init_centroids,
    local_attention_backward,
    local_attention_forward,
    local_window_index,
    make_method,
    nearest_centroids,
    routing_attention_backward,
    routing_attention_forward,
    routing_keys_seen,
    select_top_tokens,
    unit_rows,
    update_centroids,
)
from miniattn.transformer import (
    attention_backward,
    attention_forward,
    init_mha_params,
    mha_backward,
    mha_forward,
)

GRAD_TOL = 1e-6  # float64 central differences
EXACT_TOL = 1e-12


def random_qkv(rng, batch, heads, n_queries, n_keys, width):
    q = rng.standard_normal((batch, heads, n_queries, width))
    k = rng.standard_normal((batch, heads, n_keys, width))
    v = rng.standard_normal((batch, heads, n_keys, width))
    return q, k, v


def position_causal(query_index, key_index, n_queries, n_keys):
    """Allowed (Wq, Wk) by original positions, bottom-right aligned."""
    return key_index[None, :] <= query_index[:, None] + (n_keys - n_queries)


# --- one cluster is dense attention ---------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_queries, n_keys", [(6, 6), (5, 8), (8, 5)])
def test_one_cluster_equals_dense(rng, causal, n_queries, n_keys):
    q, k, v = random_qkv(rng, 2, 2, n_queries, n_keys, 4)
    centroids = init_centroids(rng, 2, 1, 4)
    out, cache = routing_attention_forward(q, k, v, centroids, causal=causal)
    dense, dense_cache = attention_forward(q, k, v, causal=causal)
    assert cache["query_index"].shape == (2, 2, 1, n_queries)
    assert cache["key_index"].shape == (2, 2, 1, n_keys)
    np.testing.assert_allclose(out, dense, rtol=0, atol=EXACT_TOL)

    dout = rng.standard_normal(out.shape)
    for grad, dense_grad in zip(routing_attention_backward(dout, cache), attention_backward(dout, dense_cache)):
        np.testing.assert_allclose(grad, dense_grad, rtol=0, atol=EXACT_TOL)


def test_one_cluster_normalized_equals_dense_on_normalized(rng):
    q, k, v = random_qkv(rng, 1, 2, 6, 6, 4)
    centroids = init_centroids(rng, 2, 1, 4)
    out, _ = routing_attention_forward(q, k, v, centroids, causal=True, normalize_qk=True)
    dense, _ = attention_forward(layer_norm_forward(q)[0], layer_norm_forward(k)[0], v, causal=True)
    np.testing.assert_allclose(out, dense, rtol=0, atol=EXACT_TOL)


def test_method_one_cluster_equals_dense(rng):
    q, k, v = random_qkv(rng, 2, 3, 7, 7, 4)
    method = make_method(rng=rng, n_clusters=1)
    out, cache = method.forward(q, k, v, causal=True)
    dense, _ = attention_forward(q, k, v, causal=True)
    np.testing.assert_allclose(out, dense, rtol=0, atol=EXACT_TOL)
    np.testing.assert_array_equal(method.keys_seen(cache), np.broadcast_to(np.tril(np.ones((7, 7), bool)), (2, 3, 7, 7)))


# --- frozen routing oracle -------------------------------------------------------------


def oracle_forward_backward(q, k, v, dout, query_index, key_index, causal, mask=None):
    """Mean over selecting clusters of dense masked attention on the selected rows."""
    batch, heads, n_queries, _ = q.shape
    n_keys = k.shape[2]
    summed = np.zeros((batch, heads, n_queries, v.shape[-1]))
    counts = np.zeros((batch, heads, n_queries))
    for b in range(batch):
        for h in range(heads):
            for cluster in range(query_index.shape[2]):
                counts[b, h, query_index[b, h, cluster]] += 1
    divisor = np.maximum(counts, 1)[..., None]
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for b in range(batch):
        for h in range(heads):
            for cluster in range(query_index.shape[2]):
                rows, columns = query_index[b, h, cluster], key_index[b, h, cluster]
                allowed = np.ones((len(rows), len(columns)), bool)
                if causal:
                    allowed &= position_causal(rows, columns, n_queries, n_keys)
                if mask is not None:
                    allowed &= np.broadcast_to(mask, (batch, heads, n_queries, n_keys))[b, h][np.ix_(rows, columns)]
                out_c, cache_c = attention_forward(q[b, h, rows], k[b, h, columns], v[b, h, columns], mask=allowed)
                np.add.at(summed[b, h], rows, out_c)
                dq_c, dk_c, dv_c = attention_backward(dout[b, h, rows] / divisor[b, h, rows], cache_c)
                np.add.at(dq[b, h], rows, dq_c)
                np.add.at(dk[b, h], columns, dk_c)
                np.add.at(dv[b, h], columns, dv_c)
    return summed / divisor, (dq, dk, dv)


@pytest.mark.parametrize(
    "shape, n_clusters, options",
    [
        ((2, 2, 12, 12), 3, {"causal": True}),
        ((1, 2, 9, 12), 4, {"causal": True}),
        ((1, 2, 12, 7), 3, {"causal": False}),
        ((2, 1, 10, 10), 3, {"causal": True, "routing": "shared"}),
        ((1, 2, 9, 11), 3, {"causal": False, "query_window": 5, "key_window": 2}),
    ],
)
def test_frozen_routing_matches_oracle(rng, shape, n_clusters, options):
    batch, heads, n_queries, n_keys = shape
    q, k, v = random_qkv(rng, batch, heads, n_queries, n_keys, 4)
    centroids = init_centroids(rng, heads, n_clusters, 4)
    out, cache = routing_attention_forward(q, k, v, centroids, **options)
    dout = rng.standard_normal(out.shape)
    grads = routing_attention_backward(dout, cache)
    expected, expected_grads = oracle_forward_backward(
        q, k, v, dout, cache["query_index"], cache["key_index"], options["causal"]
    )
    np.testing.assert_allclose(out, expected, rtol=0, atol=EXACT_TOL)
    for grad, expected_grad in zip(grads, expected_grads):
        np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=EXACT_TOL)


def test_frozen_routing_with_mask_matches_oracle(rng):
    q, k, v = random_qkv(rng, 2, 2, 10, 10, 3)
    mask = rng.random((2, 1, 10, 10)) < 0.7
    centroids = init_centroids(rng, 2, 3, 3)
    out, cache = routing_attention_forward(q, k, v, centroids, causal=True, mask=mask)
    dout = rng.standard_normal(out.shape)
    grads = routing_attention_backward(dout, cache)
    expected, expected_grads = oracle_forward_backward(
        q, k, v, dout, cache["query_index"], cache["key_index"], True, mask
    )
    np.testing.assert_allclose(out, expected, rtol=0, atol=EXACT_TOL)
    for grad, expected_grad in zip(grads, expected_grads):
        np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=EXACT_TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask_matches_oracle(rng, causal):
    q, k, v = random_qkv(rng, 2, 2, 9, 9, 3)
    mask = np.ones((2, 1, 1, 9), bool)
    mask[1, ..., 6:] = False  # the second sequence has 6 valid keys
    centroids = init_centroids(rng, 2, 3, 3)
    out, cache = routing_attention_forward(q, k, v, centroids, causal=causal, mask=mask)
    assert cache["allowed"].shape == ((2, 2, 3, 3, 3) if causal else (2, 2, 3, 1, 3))
    dout = rng.standard_normal(out.shape)
    grads = routing_attention_backward(dout, cache)
    expected, expected_grads = oracle_forward_backward(
        q, k, v, dout, cache["query_index"], cache["key_index"], causal, mask
    )
    np.testing.assert_allclose(out, expected, rtol=0, atol=EXACT_TOL)
    for grad, expected_grad in zip(grads, expected_grads):
        np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=EXACT_TOL)
    seen = routing_keys_seen(cache)
    assert not np.any(seen[1, ..., 6:])


def test_several_clusters_average_exactly(rng):
    # Wq = N: every cluster selects every query, so each query is averaged over Kc clusters.
    q, k, v = random_qkv(rng, 1, 1, 6, 6, 3)
    centroids = init_centroids(rng, 1, 3, 3)
    out, cache = routing_attention_forward(q, k, v, centroids, query_window=6, key_window=2)
    assert np.all(cache["counts"] == 3)
    parts = []
    for cluster in range(3):
        columns = cache["key_index"][0, 0, cluster]
        parts.append(attention_forward(q[0, 0], k[0, 0, columns], v[0, 0, columns])[0])
    np.testing.assert_allclose(out[0, 0], np.mean(parts, axis=0), rtol=0, atol=EXACT_TOL)


def test_unrouted_query_gets_zero_output_and_gradient(rng):
    q, k, v = random_qkv(rng, 1, 1, 8, 8, 3)
    centroids = init_centroids(rng, 1, 2, 3)
    out, cache = routing_attention_forward(q, k, v, centroids, query_window=2, key_window=4)
    unrouted = cache["counts"][0, 0] == 0
    assert unrouted.sum() >= 4  # 2 clusters x 2 queries leave at least 4 of 8 queries out
    assert np.all(out[0, 0, unrouted] == 0)
    dq, _, _ = routing_attention_backward(rng.standard_normal(out.shape), cache)
    assert np.all(dq[0, 0, unrouted] == 0)


# --- gradient checks ---------------------------------------------------------------------


def frozen_gradcheck(rng, shape, n_clusters, options):
    """Gradcheck with the index sets frozen; also record whether any FD step changed the routing."""
    batch, heads, n_queries, n_keys, width = shape
    q, k, v = random_qkv(rng, batch, heads, n_queries, n_keys, width)
    centroids = init_centroids(rng, heads, n_clusters, width)
    _, reference = routing_attention_forward(q, k, v, centroids, **options)
    frozen = dict(options, query_index=reference["query_index"], key_index=reference["key_index"])
    routing_changed = []

    def forward(q, k, v):
        _, free = routing_attention_forward(q, k, v, centroids, **options)
        routing_changed.append(
            not (
                np.array_equal(free["query_index"], reference["query_index"])
                and np.array_equal(free["key_index"], reference["key_index"])
                and np.array_equal(free["query_assignment"], reference["query_assignment"])
                and np.array_equal(free["key_assignment"], reference["key_assignment"])
            )
        )
        return routing_attention_forward(q, k, v, centroids, **frozen)

    result = gradcheck(forward, routing_attention_backward, [q, k, v], names=["q", "k", "v"], rng=rng)
    return result, routing_changed


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "shape, n_clusters, options",
    [
        ((1, 2, 7, 9, 4), 3, {}),
        ((2, 1, 9, 6, 3), 2, {"causal": True}),
        ((1, 2, 8, 8, 4), 2, {"causal": True, "routing": "shared", "normalize_qk": True}),
        ((1, 1, 8, 10, 3), 3, {"causal": False, "normalize_qk": True, "query_window": 4}),
    ],
)
def test_routing_gradcheck_frozen(seed, shape, n_clusters, options):
    rng = np.random.default_rng(seed)
    result, routing_changed = frozen_gradcheck(rng, shape, n_clusters, options)
    result.assert_ok(GRAD_TOL)
    assert len(routing_changed) > 0
    assert not any(routing_changed), "a finite-difference step changed the routing"


def test_routing_gradcheck_with_mask(rng):
    q, k, v = random_qkv(rng, 1, 2, 8, 8, 3)
    mask = rng.random((1, 2, 8, 8)) < 0.6
    centroids = init_centroids(rng, 2, 2, 3)
    _, reference = routing_attention_forward(q, k, v, centroids, causal=True, mask=mask)
    frozen = {"query_index": reference["query_index"], "key_index": reference["key_index"]}

    def forward(q, k, v):
        return routing_attention_forward(q, k, v, centroids, causal=True, mask=mask, **frozen)

    gradcheck(forward, routing_attention_backward, [q, k, v], rng=rng).assert_ok(GRAD_TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_local_attention_gradcheck(rng, causal):
    q, k, v = random_qkv(rng, 1, 2, 6, 9, 3)

    def forward(q, k, v):
        return local_attention_forward(q, k, v, window=4, causal=causal)

    gradcheck(forward, local_attention_backward, [q, k, v], rng=rng).assert_ok(GRAD_TOL)


def test_method_with_local_heads_gradcheck(rng):
    q, k, v = random_qkv(rng, 1, 3, 8, 8, 3)
    method = make_method(rng=rng, n_clusters=2, local_heads=1)
    _, reference = method.forward(q, k, v, causal=True)
    seen = method.keys_seen(reference)
    routing_changed = []

    def forward(q, k, v):
        out, cache = method.forward(q, k, v, causal=True)
        routing_changed.append(not np.array_equal(method.keys_seen(cache), seen))
        return out, cache

    gradcheck(forward, method.backward, [q, k, v], rng=rng).assert_ok(GRAD_TOL)
    assert not any(routing_changed), "a finite-difference step changed the routing"


@pytest.mark.parametrize("seed", [0, 1])
def test_commitment_loss_gradcheck(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 2, 6, 4)) * 3.0
    centroids = init_centroids(rng, 2, 3, 4)
    assignments = nearest_centroids(x, centroids)
    valid = rng.random((2, 1, 6)) < 0.7

    def forward(x):
        return commitment_loss_forward(x, centroids, beta=0.25, assignments=assignments, valid=valid)

    gradcheck(forward, commitment_loss_backward, [x], names=["x"], rng=rng).assert_ok(GRAD_TOL)
    assert np.array_equal(nearest_centroids(x, centroids), assignments)


def test_commitment_loss_value(rng):
    x = rng.standard_normal((1, 2, 5, 3))
    centroids = init_centroids(rng, 2, 2, 3)
    loss, _ = commitment_loss_forward(x, centroids, beta=0.1)
    expected = []
    for h in range(2):
        for i in range(5):
            unit = x[0, h, i] / np.linalg.norm(x[0, h, i])
            distances = [np.sum((unit - centroids[h, c]) ** 2) for c in range(2)]
            expected.append(min(distances))
    assert loss == pytest.approx(0.1 * np.mean(expected), rel=1e-12)


def test_method_commitment_gradcheck(rng):
    q, k, _ = random_qkv(rng, 1, 3, 6, 6, 4)
    method = make_method(rng=rng, n_clusters=2, local_heads=1, beta=0.5, normalize_qk=True)
    method.forward(q, k, k)
    mask = np.ones((1, 1, 6, 6), bool)
    mask[..., 4:] = False  # the last two keys are padding

    def forward(q, k):
        return method.commitment_forward(q, k, mask=mask)

    gradcheck(forward, method.commitment_backward, [q, k], names=["q", "k"], rng=rng).assert_ok(GRAD_TOL)
    _, cache = forward(q, k)
    dq, dk = method.commitment_backward(1.0, cache)
    assert np.all(dq[:, 0] == 0)  # the local head has no centroids
    assert np.all(dk[:, 0] == 0)
    assert np.all(dk[:, 1:, 4:] == 0)  # padded keys are left out of the mean


@pytest.mark.parametrize("index", range(5))
def test_gradcheck_cases_pass(index):
    rng = np.random.default_rng(7)
    cases = gradcheck_cases(rng)
    label, forward, backward, inputs, names = cases[index]
    result = gradcheck(forward, backward, inputs, names=names, rng=rng)
    assert result.max_rel_error <= GRAD_TOL, f"{label}\n{result}"


# --- online k-means -----------------------------------------------------------------------


def direct_update(centroids, vectors, assignments, decay, eps, valid):
    """Loop-by-loop EMA update, for comparison."""
    new = centroids.copy()
    heads, n_clusters, _ = centroids.shape
    for h in range(heads):
        for c in range(n_clusters):
            members = [
                vectors[b, h, i] / np.linalg.norm(vectors[b, h, i])
                for b in range(vectors.shape[0])
                for i in range(vectors.shape[2])
                if assignments[b, h, i] == c and valid[b, h, i]
            ]
            if not members:
                continue
            moved = decay * centroids[h, c] + (1 - decay) * np.mean(members, axis=0)
            if np.linalg.norm(moved) >= eps:
                new[h, c] = moved / np.linalg.norm(moved)
    return new


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999])
def test_update_matches_direct_computation(rng, decay):
    vectors = rng.standard_normal((2, 3, 10, 4))
    centroids = init_centroids(rng, 3, 4, 4)
    assignments = nearest_centroids(vectors, centroids)
    valid = rng.random((2, 3, 10)) < 0.8
    new = update_centroids(centroids, vectors, assignments, decay=decay, eps=1e-6, valid=valid)
    expected = direct_update(centroids, vectors, assignments, decay, 1e-6, valid)
    np.testing.assert_allclose(new, expected, rtol=0, atol=1e-13)
    np.testing.assert_allclose(np.linalg.norm(new, axis=-1), 1.0, rtol=0, atol=1e-13)
    assert not np.array_equal(new, centroids)


def test_update_keeps_empty_cluster(rng):
    vectors = rng.standard_normal((1, 1, 6, 3))
    centroids = init_centroids(rng, 1, 3, 3)
    assignments = np.array([[[0, 0, 1, 1, 0, 1]]])  # cluster 2 gets nothing
    new = update_centroids(centroids, vectors, assignments, decay=0.9)
    assert np.array_equal(new[0, 2], centroids[0, 2])
    assert np.all(np.isfinite(new))


def test_update_keeps_centroid_below_eps(rng):
    # decay 0.5 and a batch mean of exactly -mu: the average 0.5 mu - 0.5 mu is the zero vector.
    centroids = init_centroids(rng, 1, 1, 3)
    vectors = np.broadcast_to(-2.0 * centroids[0, 0], (1, 1, 4, 3)).copy()
    assignments = np.zeros((1, 1, 4), dtype=np.int64)
    new = update_centroids(centroids, vectors, assignments, decay=0.5, eps=1e-6)
    np.testing.assert_array_equal(new, centroids)
    # Slightly off the antipode the norm is above a zero eps but below 1e-3.
    vectors[0, 0, 0] += 1e-5 * rng.standard_normal(3)
    kept = update_centroids(centroids, vectors, assignments, decay=0.5, eps=1e-3)
    moved = update_centroids(centroids, vectors, assignments, decay=0.5, eps=0.0)
    np.testing.assert_array_equal(kept, centroids)
    assert not np.array_equal(moved, centroids)
    assert np.all(np.isfinite(moved))


def test_update_ignores_padded_items(rng):
    vectors = rng.standard_normal((1, 2, 8, 3))
    centroids = init_centroids(rng, 2, 2, 3)
    assignments = nearest_centroids(vectors, centroids)
    valid = np.array([True] * 5 + [False] * 3)
    padded = vectors.copy()
    padded[..., 5:, :] = 1e6 * rng.standard_normal((1, 2, 3, 3))  # garbage in the padding
    new = update_centroids(centroids, padded, assignments, decay=0.9, valid=valid)
    trimmed = update_centroids(centroids, vectors[..., :5, :], assignments[..., :5], decay=0.9)
    np.testing.assert_allclose(new, trimmed, rtol=0, atol=1e-14)


def test_nearest_centroids_brute_force(rng):
    x = rng.standard_normal((2, 2, 9, 4))
    centroids = init_centroids(rng, 2, 3, 4)
    got = nearest_centroids(x, centroids)
    unit, _ = unit_rows(x)
    distances = np.linalg.norm(unit[:, :, :, None, :] - centroids[None, :, None], axis=-1)  # (B, H, L, Kc)
    np.testing.assert_array_equal(got, np.argmin(distances, axis=-1))


def test_method_update_moves_centroids_towards_data(rng):
    method = make_method(rng=rng, n_clusters=2, decay=0.5)
    q, k, v = random_qkv(rng, 2, 1, 8, 8, 3)
    _, cache = method.forward(q, k, v)
    before = method.centroids.copy()
    loss_before, _ = method.commitment_forward(q, k)
    after = method.update_centroids(cache)
    assert after is method.centroids
    assert not np.array_equal(after, before)
    loss_after, _ = method.commitment_forward(q, k)
    assert loss_after < loss_before


def test_method_update_skips_padded_keys(rng):
    q, k, v = random_qkv(rng, 2, 2, 8, 8, 3)
    mask = np.ones((2, 1, 1, 8), bool)
    mask[0, ..., 5:] = False  # keys 5..7 of the first sequence are padding
    method = make_method(rng=rng, n_clusters=2, decay=0.7)
    _, cache = method.forward(q, k, v, mask=mask)
    start = method.centroids.copy()
    new = method.update_centroids(cache)
    routing = cache["routing"]
    valid = np.concatenate([np.ones((2, 2, 8), bool), np.broadcast_to(mask[:, :, 0], (2, 2, 8))], axis=-1)
    expected = update_centroids(
        start,
        np.concatenate([q, k], axis=2),
        np.concatenate([routing["query_assignment"], routing["key_assignment"]], axis=-1),
        decay=0.7,
        valid=valid,
    )
    np.testing.assert_allclose(new, expected, rtol=0, atol=1e-14)


def test_shared_routing_updates_with_queries_only(rng):
    q, k, v = random_qkv(rng, 1, 1, 8, 8, 3)
    method = make_method(rng=rng, n_clusters=2, routing="shared", decay=0.8)
    _, cache = method.forward(q, k, v, causal=True)
    start = method.centroids.copy()
    new = method.update_centroids(cache)
    expected = update_centroids(start, q, cache["routing"]["query_assignment"], decay=0.8)
    np.testing.assert_allclose(new, expected, rtol=0, atol=1e-14)


# --- balanced routing ---------------------------------------------------------------------


def test_balanced_routing_takes_top_scores(rng):
    scores = rng.standard_normal((2, 2, 10, 3))
    index = select_top_tokens(scores, 4)
    assert index.shape == (2, 2, 3, 4)
    assert np.all(np.diff(index, axis=-1) > 0)
    for b in range(2):
        for h in range(2):
            for c in range(3):
                threshold = np.sort(scores[b, h, :, c])[-4]
                expected = np.flatnonzero(scores[b, h, :, c] >= threshold)
                np.testing.assert_array_equal(index[b, h, c], expected)


def test_balanced_routing_breaks_ties_by_position():
    scores = np.zeros((1, 1, 6, 2))
    scores[0, 0, [1, 3, 4], 0] = 1.0  # three tied leaders for a window of two
    index = select_top_tokens(scores, 2)
    np.testing.assert_array_equal(index[0, 0, 0], [1, 3])
    np.testing.assert_array_equal(index[0, 0, 1], [0, 1])  # all tied: the first positions
    many = np.zeros((1, 1, 200, 1))
    many[0, 0, 100:] = 1.0
    np.testing.assert_array_equal(select_top_tokens(many, 50)[0, 0, 0], np.arange(100, 150))


@pytest.mark.parametrize("window", [1, 3, 7, 12])
def test_balanced_routing_matches_stable_sort(rng, window):
    scores = np.round(rng.standard_normal((2, 3, 12, 4)), 1)  # one decimal: many ties
    per_cluster = np.swapaxes(scores, -1, -2)
    expected = np.sort(np.argsort(-per_cluster, axis=-1, kind="stable")[..., :window], axis=-1)
    np.testing.assert_array_equal(select_top_tokens(scores, window), expected)


def test_duplicate_tokens_route_deterministically(rng):
    q, k, v = random_qkv(rng, 1, 1, 8, 8, 3)
    q[..., 4, :] = q[..., 2, :]  # exact ties in every score
    centroids = init_centroids(rng, 1, 2, 3)
    _, first = routing_attention_forward(q, k, v, centroids)
    _, second = routing_attention_forward(q, k, v, centroids)
    np.testing.assert_array_equal(first["query_index"], second["query_index"])


# --- causality, determinism, NaN --------------------------------------------------------


@pytest.mark.parametrize("routing", ["separate", "shared"])
def test_frozen_routing_is_causal(rng, routing):
    q, k, v = random_qkv(rng, 1, 2, 10, 10, 3)
    centroids = init_centroids(rng, 2, 3, 3)
    out, cache = routing_attention_forward(q, k, v, centroids, causal=True, routing=routing)
    frozen = {"query_index": cache["query_index"], "key_index": cache["key_index"], "routing": routing}
    for t in range(1, 10):
        q2, k2, v2 = q.copy(), k.copy(), v.copy()
        q2[..., t, :] += 1.0
        k2[..., t, :] -= 2.0
        v2[..., t, :] += 3.0
        out2, _ = routing_attention_forward(q2, k2, v2, centroids, causal=True, **frozen)
        np.testing.assert_array_equal(out2[..., :t, :], out[..., :t, :])
        assert not np.array_equal(out2[..., t:, :], out[..., t:, :])


def test_method_is_causal_in_values(rng):
    # Values do not take part in routing, so the routing stays the same.
    q, k, v = random_qkv(rng, 1, 3, 9, 9, 3)
    method = make_method(rng=rng, n_clusters=3, local_heads=1)
    out, _ = method.forward(q, k, v, causal=True)
    for t in range(1, 9):
        v2 = v.copy()
        v2[..., t, :] += 5.0
        out2, _ = method.forward(q, k, v2, causal=True)
        np.testing.assert_array_equal(out2[..., :t, :], out[..., :t, :])


def test_keys_seen_is_causal_and_matches_oracle(rng):
    q, k, v = random_qkv(rng, 1, 2, 9, 9, 3)
    method = make_method(rng=rng, n_clusters=3, local_heads=1)
    _, cache = method.forward(q, k, v, causal=True)
    seen = method.keys_seen(cache)
    assert seen.shape == (1, 2, 9, 9)
    assert not np.any(seen & ~np.tril(np.ones((9, 9), bool)))
    routing = cache["routing"]
    expected = np.zeros((9, 9), bool)
    for c in range(3):
        rows, columns = routing["query_index"][0, 0, c], routing["key_index"][0, 0, c]
        expected[np.ix_(rows, columns)] |= position_causal(rows, columns, 9, 9)
    np.testing.assert_array_equal(routing_keys_seen(routing)[0, 0], expected)
    np.testing.assert_array_equal(seen[0, 1], expected)


def test_repeated_calls_are_identical(rng):
    q, k, v = random_qkv(rng, 2, 2, 12, 12, 4)
    method = make_method(rng=rng, n_clusters=3, local_heads=1)
    out1, cache1 = method.forward(q, k, v, causal=True)
    centroids = method.centroids.copy()
    out2, cache2 = method.forward(q, k, v, causal=True)
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_array_equal(method.centroids, centroids)
    dout = rng.standard_normal(out1.shape)
    for first, second in zip(method.backward(dout, cache1), method.backward(dout, cache2)):
        np.testing.assert_array_equal(first, second)


def test_same_rng_seed_gives_same_method():
    q, k, v = random_qkv(np.random.default_rng(3), 1, 2, 9, 9, 4)
    out1, _ = make_method(rng=np.random.default_rng(5)).forward(q, k, v)
    out2, _ = make_method(rng=np.random.default_rng(5)).forward(q, k, v)
    np.testing.assert_array_equal(out1, out2)


@pytest.mark.parametrize("backend", kernels.available_backends())
def test_backends_agree(rng, backend):
    q, k, v = random_qkv(rng, 2, 2, 10, 10, 3)
    centroids = init_centroids(rng, 2, 3, 3)
    out_np, cache_np = routing_attention_forward(q, k, v, centroids, causal=True, backend="numpy")
    out, cache = routing_attention_forward(q, k, v, centroids, causal=True, backend=backend)
    np.testing.assert_allclose(out, out_np, rtol=0, atol=EXACT_TOL)
    dout = rng.standard_normal(out.shape)
    for grad, grad_np in zip(routing_attention_backward(dout, cache), routing_attention_backward(dout, cache_np)):
        np.testing.assert_allclose(grad, grad_np, rtol=0, atol=EXACT_TOL)


def test_no_nan_in_hard_cases(rng):
    # Zero vectors, N > M (early queries precede every key), separate routing with
    # empty rows, a fully masked query and float32.
    for dtype in (np.float64, np.float32):
        q, k, v = (x.astype(dtype) for x in random_qkv(rng, 1, 2, 10, 6, 3))
        q[..., 0, :] = 0
        k[..., 1, :] = 0
        mask = np.ones((1, 2, 10, 6), bool)
        mask[..., 3, :] = False
        method = make_method(rng=rng, n_clusters=2, local_heads=1)
        for normalize in (False, True):
            method.normalize_qk = normalize
            out, cache = method.forward(q, k, v, causal=True, mask=mask)
            grads = method.backward(np.ones_like(out), cache)
            assert all(np.all(np.isfinite(x)) for x in (out,) + grads)
            assert np.all(out[..., 3, :] == 0)
            assert np.all(grads[0][..., 3, :] == 0)
            method.update_centroids(cache)
            assert np.all(np.isfinite(method.centroids))
            loss, loss_cache = method.commitment_forward(q, k, mask=mask)
            assert np.isfinite(loss)
            assert all(np.all(np.isfinite(g)) for g in method.commitment_backward(1.0, loss_cache))


def test_float32_keeps_dtype(rng):
    q, k, v = (x.astype(np.float32) for x in random_qkv(rng, 1, 2, 8, 8, 4))
    method = make_method(rng=rng, n_clusters=2, local_heads=1)
    out, cache = method.forward(q, k, v, causal=True)
    assert out.dtype == np.float32
    assert all(g.dtype == np.float32 for g in method.backward(np.ones_like(out), cache))
    assert method.centroids.dtype == np.float32


# --- local heads --------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_queries, n_keys, window", [(8, 8, 3), (5, 9, 4), (9, 5, 2)])
def test_local_attention_equals_dense_band(rng, causal, n_queries, n_keys, window):
    q, k, v = random_qkv(rng, 1, 2, n_queries, n_keys, 3)
    out, cache = local_attention_forward(q, k, v, window=window, causal=causal)
    positions = np.arange(n_queries)[:, None] + n_keys - n_queries
    keys = np.arange(n_keys)[None, :]
    if causal:
        band = (keys <= positions) & (keys > positions - window)
    else:
        band = (keys >= positions - (window - 1) // 2) & (keys <= positions + window // 2)
    dense, dense_cache = attention_forward(q, k, v, mask=band)
    np.testing.assert_allclose(out, dense, rtol=0, atol=EXACT_TOL)
    dout = rng.standard_normal(out.shape)
    for grad, dense_grad in zip(local_attention_backward(dout, cache), attention_backward(dout, dense_cache)):
        np.testing.assert_allclose(grad, dense_grad, rtol=0, atol=EXACT_TOL)
    index, valid = local_window_index(n_queries, n_keys, window, causal)
    assert np.all(valid.sum(axis=1) == band.sum(axis=1))


def test_method_local_heads_use_the_cluster_window(rng):
    q, k, v = random_qkv(rng, 1, 3, 12, 12, 3)
    method = make_method(rng=rng, n_clusters=3, local_heads=2)
    out, cache = method.forward(q, k, v, causal=True)
    local, _ = local_attention_forward(q[:, :2], k[:, :2], v[:, :2], window=4, causal=True)
    np.testing.assert_array_equal(out[:, :2], local)
    assert method.centroids.shape == (1, 3, 3)


# --- registry and bad input --------------------------------------------------------------


def test_registry_builds_the_method(rng):
    assert methods.is_implemented("routing_transformer")
    method = methods.make_method("routing_transformer", rng=rng, n_clusters=2)
    assert isinstance(method, RoutingAttention)
    assert method.name == "routing_transformer"


def test_multi_head_layer_with_one_cluster_equals_dense(rng):
    x = rng.standard_normal((2, 7, 12))
    params = init_mha_params(12, 3, rng)
    method = make_method(rng=rng, n_clusters=1, local_heads=1, key_window=7)
    y, cache = mha_forward(x, x, params, n_heads=3, causal=True, attention=method)
    y_dense, cache_dense = mha_forward(x, x, params, n_heads=3, causal=True)
    np.testing.assert_allclose(y, y_dense, rtol=0, atol=EXACT_TOL)
    dy = rng.standard_normal(y.shape)
    dx_q, dx_kv, dparams = mha_backward(dy, cache)
    dx_q_dense, dx_kv_dense, dparams_dense = mha_backward(dy, cache_dense)
    np.testing.assert_allclose(dx_q + dx_kv, dx_q_dense + dx_kv_dense, rtol=0, atol=EXACT_TOL)
    for name in dparams:
        np.testing.assert_allclose(dparams[name], dparams_dense[name], rtol=0, atol=EXACT_TOL)


@pytest.mark.parametrize("n_clusters", [0, -1])
def test_rejects_cluster_count_below_one(n_clusters):
    with pytest.raises(ValueError, match=f"n_clusters={n_clusters}"):
        make_method(n_clusters=n_clusters)


def test_rejects_centroids_without_clusters(rng):
    q, k, v = random_qkv(rng, 1, 1, 6, 6, 3)
    with pytest.raises(ValueError, match="0 clusters"):
        routing_attention_forward(q, k, v, np.zeros((1, 0, 3)))


def test_rejects_cluster_count_above_n(rng):
    q, k, v = random_qkv(rng, 1, 1, 4, 6, 3)
    with pytest.raises(ValueError, match="Kc=5"):
        routing_attention_forward(q, k, v, init_centroids(rng, 1, 5, 3))
    with pytest.raises(ValueError, match="Kc=5"):
        make_method(n_clusters=5).forward(q, k, v)


@pytest.mark.parametrize("shape", [(2, 3, 3), (1, 3, 4), (3, 3), (1, 1, 3, 3)])
def test_rejects_centroids_of_wrong_shape(rng, shape):
    q, k, v = random_qkv(rng, 1, 1, 6, 6, 3)
    centroids = unit_rows(rng.standard_normal(shape))[0]
    with pytest.raises(ValueError, match=r"centroids has shape"):
        routing_attention_forward(q, k, v, centroids)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_rejects_non_finite_centroids(rng, bad):
    q, k, v = random_qkv(rng, 1, 1, 6, 6, 3)
    centroids = init_centroids(rng, 1, 2, 3)
    centroids[0, 1, 2] = bad
    with pytest.raises(ValueError, match="centroids contains 1 non-finite"):
        routing_attention_forward(q, k, v, centroids)
    with pytest.raises(ValueError, match="centroids contains 1 non-finite"):
        make_method(centroids=centroids)
    with pytest.raises(ValueError, match="centroids contains 1 non-finite"):
        update_centroids(centroids, q, np.zeros((1, 1, 6), np.int64))


def test_rejects_centroids_off_the_unit_sphere(rng):
    q, k, v = random_qkv(rng, 1, 1, 6, 6, 3)
    with pytest.raises(ValueError, match="unit norm"):
        routing_attention_forward(q, k, v, 2.0 * init_centroids(rng, 1, 2, 3))


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5, -0.1])
def test_rejects_decay_outside_open_unit_interval(rng, decay):
    centroids = init_centroids(rng, 1, 2, 3)
    vectors = rng.standard_normal((1, 1, 4, 3))
    with pytest.raises(ValueError, match=f"decay={decay}"):
        update_centroids(centroids, vectors, np.zeros((1, 1, 4), np.int64), decay=decay)
    with pytest.raises(ValueError, match=f"decay={decay}"):
        make_method(decay=decay)


def test_rejects_bad_options(rng):
    q, k, v = random_qkv(rng, 1, 2, 6, 8, 3)
    centroids = init_centroids(rng, 2, 2, 3)
    with pytest.raises(ValueError, match="routing='shared'"):
        routing_attention_forward(q, k, v, centroids, routing="shared")
    with pytest.raises(ValueError, match="routing='other'"):
        make_method(routing="other")
    with pytest.raises(ValueError, match="query_window=7"):
        routing_attention_forward(q, k, v, centroids, query_window=7)
    with pytest.raises(ValueError, match="key_window=0"):
        routing_attention_forward(q, k, v, centroids, key_window=0)
    with pytest.raises(ValueError, match="local_heads=3"):
        make_method(local_heads=3).forward(q, k, v)
    with pytest.raises(ValueError, match="only one of query_index and key_index"):
        routing_attention_forward(q, k, v, centroids, query_index=np.zeros((1, 2, 2, 3), np.int64))
    with pytest.raises(ValueError, match="strictly increasing"):
        routing_attention_forward(
            q, k, v, centroids,
            query_index=np.zeros((1, 2, 2, 3), np.int64), key_index=np.zeros((1, 2, 2, 4), np.int64),
        )
    with pytest.raises(TypeError, match="dtype int64"):
        routing_attention_forward(q.astype(np.int64), k, v, centroids)
    with pytest.raises(ValueError, match="eps=-1"):
        make_method(eps=-1)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        make_method(rng=42)


def test_method_rejects_a_changed_head_count(rng):
    method = make_method(rng=rng, n_clusters=2)
    method.forward(*random_qkv(rng, 1, 2, 6, 6, 3))
    with pytest.raises(ValueError, match="centroids has shape"):
        method.forward(*random_qkv(rng, 1, 3, 6, 6, 3))
