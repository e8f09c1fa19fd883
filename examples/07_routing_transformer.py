"""Routing attention step by step: cluster a short sequence, attend inside a cluster.

Run from the repository root with ``python examples/07_routing_transformer.py``
(with miniattn installed, or with ``PYTHONPATH=.``). Each cell prints what it
shows and ends in a check.
"""

# %% 1. A short sequence with three topics.
# Queries and keys of 12 tokens point near one of three directions ("topics"),
# so a good clustering should put tokens of one topic together.
import numpy as np

from miniattn import gradcheck
from miniattn.routing_transformer import (
    commitment_loss_forward,
    init_centroids,
    nearest_centroids,
    routing_attention_backward,
    routing_attention_forward,
    unit_rows,
    update_centroids,
)
from miniattn.transformer import attention_forward, attention_probabilities

rng = np.random.default_rng(0)
n_tokens, width, n_clusters = 12, 4, 3
topics = rng.integers(0, 3, size=n_tokens)
directions = np.linalg.qr(rng.standard_normal((width, width)))[0][:3]  # 3 orthonormal directions
q = (directions[topics] + 0.2 * rng.standard_normal((n_tokens, width)))[None, None]  # (1, 1, 12, 4)
k = (directions[topics] + 0.2 * rng.standard_normal((n_tokens, width)))[None, None]  # (1, 1, 12, 4)
v = rng.standard_normal((1, 1, n_tokens, width))
print("topic of each token:      ", topics)

# %% 2. Online k-means: centroids on the unit sphere, nearest-centroid assignment.
# Random centroids assign tokens almost arbitrarily, and a centroid that wins no
# token never moves. Starting from spread-out routed vectors (each next one the
# least similar to those already chosen) and taking a few EMA steps on the
# queries and keys gives one centroid per topic.
random_centroids = init_centroids(rng, 1, n_clusters, width)  # (H, Kc, D)
print("assignment, random start: ", nearest_centroids(q, random_centroids)[0, 0])
items = np.concatenate([q, k], axis=2)  # queries and keys are both routed: (1, 1, 24, 4)
unit_items = unit_rows(items[0, 0])[0]  # (24, 4)
chosen = [0]
while len(chosen) < n_clusters:
    similarity = np.max(unit_items @ unit_items[chosen].T, axis=1)  # (24,)
    chosen.append(int(np.argmin(similarity)))
centroids = unit_items[chosen][None]  # (1, Kc, D)
for step in range(5):
    centroids = update_centroids(centroids, items, nearest_centroids(items, centroids), decay=0.5)
assignment = nearest_centroids(q, centroids)[0, 0]
print("assignment after 5 steps: ", assignment)
purity = sum(np.max(np.bincount(topics[assignment == c], minlength=3)) for c in np.unique(assignment)) / n_tokens
print(f"check: cluster purity {purity:.2f} (1.00 = every cluster holds one topic)")

# %% 3. Balanced routing: each cluster takes its Wq = Wk = 12 / 3 = 4 closest queries and keys.
out, cache = routing_attention_forward(q, k, v, centroids, causal=True)
for c in range(n_clusters):
    print(f"cluster {c}: queries {cache['query_index'][0, 0, c]}  keys {cache['key_index'][0, 0, c]}")
counts = cache["counts"][0, 0]
print("clusters per query:", counts, "(0 = routed nowhere, zero output)")
sizes = [len(np.unique(cache["query_index"][0, 0, c])) for c in range(n_clusters)]
assert sizes == [n_tokens // n_clusters] * n_clusters
print(f"check: every cluster holds {sizes[0]} distinct queries")
# Each cluster ranks all queries by closeness to its centroid and keeps its top 4,
# independently of the other clusters: a cluster may take a token of another
# topic, and a token in no cluster's top 4 is routed nowhere.

# %% 4. Attention inside one cluster, causal by original positions.
# Query at position p may attend a selected key at position j only when j <= p,
# whatever their order inside the cluster.
c = 0
rows, columns = cache["query_index"][0, 0, c], cache["key_index"][0, 0, c]
allowed = columns[None, :] <= rows[:, None]
cluster_out, cluster_cache = attention_forward(q[0, 0, rows], k[0, 0, columns], v[0, 0, columns], mask=allowed)
print(f"cluster {c} probabilities (rows: queries {rows}, columns: keys {columns}):")
print(np.round(attention_probabilities(cluster_cache), 3))
alone = counts[rows] == 1
error = np.max(np.abs(out[0, 0, rows[alone]] - cluster_out[alone]), initial=0.0)
print(f"check: routed output of the queries only in cluster {c} equals dense attention on the cluster, "
      f"max error {error:.1e}")

# %% 5. Gradients with the routing frozen.
frozen = {"query_index": cache["query_index"], "key_index": cache["key_index"], "causal": True}
result = gradcheck(
    lambda q, k, v: routing_attention_forward(q, k, v, centroids, **frozen),
    routing_attention_backward, [q, k, v], names=["q", "k", "v"], rng=rng,
)
print(result)
print(f"check: gradcheck max relative error {result.max_rel_error:.1e} (tolerance 1e-6)")

# %% 6. One centroid update on a new batch, and the commitment loss.
# The commitment loss beta * mean ||x_hat - mu||^2 measures how far the routed
# vectors are from their centroids. A new batch of the same topics arrives; one
# EMA step (decay 0.5) moves each centroid towards the batch mean of its tokens.
new_items = directions[np.concatenate([topics, topics])] + 0.3 * rng.standard_normal((2 * n_tokens, width))
new_items = new_items[None, None]  # (1, 1, 24, 4)
before, _ = commitment_loss_forward(new_items, centroids, beta=1.0)
moved = update_centroids(centroids, new_items, nearest_centroids(new_items, centroids), decay=0.5)
after, _ = commitment_loss_forward(new_items, moved, beta=1.0)
print("centroid 0 before:", np.round(centroids[0, 0], 3))
print("centroid 0 after: ", np.round(moved[0, 0], 3), f"norm {np.linalg.norm(moved[0, 0]):.6f}")
print(f"check: commitment loss on the new batch {before:.4f} -> {after:.4f} after the update")
