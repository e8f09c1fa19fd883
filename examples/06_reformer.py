"""Reformer step by step: hash, sort, chunk, attend, unsort, combine rounds, run a layer backwards.

Run with ``python examples/06_reformer.py`` from the repository root. Each
cell prints what it shows and ends in a check.
"""

# %% 1. Hash a short sequence with angular LSH.
# Twelve vectors around three directions; similar directions should share buckets.
import numpy as np

from miniattn import gradcheck, reformer
from miniattn.core.hashing import draw_rotations, lsh_hash, lsh_sort
from miniattn.transformer import attention_forward

rng = np.random.default_rng(6)
n_positions, width, n_buckets, chunk_length = 12, 4, 4, 4
directions = rng.standard_normal((3, width))
labels = rng.integers(0, 3, size=n_positions)
qk = 2.0 * directions[labels] + 0.2 * rng.standard_normal((n_positions, width))  # (N, D)
v = rng.standard_normal((n_positions, 2))  # (N, Dv)

rotations = draw_rotations(rng, 1, width, n_buckets)  # (K=1, D, nb/2)
buckets = lsh_hash(qk, rotations)[0]  # (N,) ids; round 0 has no offset
print("direction of each position:", labels)
print("bucket of each position:    ", buckets)
same_direction = labels[:, None] == labels[None, :]
same_bucket = buckets[:, None] == buckets[None, :]
print(f"check: pairs that share a direction: {np.mean(same_direction[same_bucket]):.2f} of the pairs "
      f"sharing a bucket, {np.mean(same_direction):.2f} of all pairs")

# %% 2. Sort by (bucket, position).
sticker, undo = lsh_sort(buckets[None, :])  # (K N,) each
print("sorted positions:", sticker)
print("their buckets:   ", buckets[sticker])
assert np.all(np.diff(buckets[sticker]) >= 0)
print("check: undo inverts the sort:", np.array_equal(sticker[undo], np.arange(n_positions)))

# %% 3. Chunks: each chunk attends to itself and to the previous chunk (chunk 0 wraps to the last).
chunks = sticker.reshape(-1, chunk_length)
for index, chunk in enumerate(chunks):
    previous = chunks[index - 1]
    print(f"chunk {index}: queries {chunk.tolist()} see keys {previous.tolist() + chunk.tolist()}")
print(f"check: {len(chunks)} chunks of {chunk_length} cover all {n_positions} positions:",
      sorted(chunks.ravel().tolist()) == list(range(n_positions)))

# %% 4. LSH attention, outputs back in the original order, against dense attention on the same keys.
out, cache = reformer.lsh_attention_forward(qk, v, n_buckets=n_buckets, chunk_length=chunk_length, rotations=rotations)
counts = reformer.window_counts(cache)  # (N, N) windows in which query i meets key j
unit_keys, _ = reformer.normalize_forward(qk)
bias = np.log(np.maximum(counts, 1)) - reformer.SELF_PENALTY * np.eye(n_positions)
dense, _ = attention_forward(qk, unit_keys, v, mask=counts > 0, scale=1.0, bias=bias)
print("keys seen by query 0:", np.flatnonzero(counts[0]).tolist())
print(f"check: max |LSH - dense over the same keys| = {np.max(np.abs(out - dense)):.1e}")

# %% 5. Several rounds: softmax weights of each round's log-sum-exp combine the outputs.
rotations4 = draw_rotations(rng, 4, width, n_buckets)
out4, cache4 = reformer.lsh_attention_forward(qk, v, n_buckets=n_buckets, chunk_length=chunk_length, rotations=rotations4)
counts4 = reformer.window_counts(cache4)
bias4 = np.log(np.maximum(counts4, 1)) - reformer.SELF_PENALTY * np.eye(n_positions)
dense4, _ = attention_forward(qk, unit_keys, v, mask=counts4 > 0, scale=1.0, bias=bias4)
print(f"keys seen per query: 1 round {np.mean(counts > 0) * n_positions:.1f}, 4 rounds {np.mean(counts4 > 0) * n_positions:.1f}")
print(f"check: 4 rounds == dense with log-count bias, max error {np.max(np.abs(out4 - dense4)):.1e}")

# %% 6. The hand-written backward, with the buckets frozen for the finite differences.
forward, backward = reformer.frozen_lsh_attention(qk, v, rotations4, n_buckets=n_buckets, chunk_length=chunk_length)
result = gradcheck(forward, backward, [qk, v], names=["qk", "v"], rng=rng)
print(result)
print(f"check: gradcheck max rel error {result.max_rel_error:.1e}, bucket changes during it: {forward.moved_calls}")

# %% 7. A reversible layer run backwards: recover its inputs from its outputs.
layer = reformer.init_reformer_layer(8, 2, 16, rng, n_buckets=4, chunk_length=4, n_rounds=2, dropout=0.1, ff_chunks=3)
x1, x2 = rng.standard_normal((1, n_positions, 8)), rng.standard_normal((1, n_positions, 8))
y1, y2, record = reformer.reversible_layer_forward(x1, x2, layer, rng=rng)
print("stored for the backward:", {"buckets": record["buckets"].shape, "dropout_seeds": len(record["dropout_seeds"])})
dy1, dy2 = rng.standard_normal(y1.shape), rng.standard_normal(y2.shape)
x1_back, x2_back, dx1, dx2, dparams = reformer.reversible_layer_backward(y1, y2, dy1, dy2, layer, record)
error = max(np.max(np.abs(x1_back - x1)), np.max(np.abs(x2_back - x2)))
print(f"check: inputs recovered from outputs, max error {error:.1e}")

# %% 8. A reversible stack and an ordinary stack of the same layers give the same gradients.
layers = [reformer.init_reformer_layer(8, 2, 16, rng, n_buckets=4, chunk_length=4, n_rounds=2) for _ in range(4)]
x = rng.standard_normal((1, n_positions, 8))
out_rev, cache_rev = reformer.reversible_stack_forward(x, layers)
out_ord, cache_ord = reformer.ordinary_stack_forward(x, layers, records=cache_rev["records"])
dout = rng.standard_normal(x.shape)
dx_rev, grads_rev = reformer.reversible_stack_backward(dout, cache_rev)
dx_ord, grads_ord = reformer.ordinary_stack_backward(dout, cache_ord)
worst = max(np.max(np.abs(grads_rev[i][name] - grads_ord[i][name])) for i in range(4) for name in grads_rev[i])
print(f"check: reversible vs ordinary backprop, max difference dx {np.max(np.abs(dx_rev - dx_ord)):.1e}, parameters {worst:.1e}")
