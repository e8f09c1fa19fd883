"""Ring Attention, stepped through by hand: P = 4 workers in one process.

Each worker keeps its block of queries; key/value blocks travel around the
ring 0 -> 1 -> 2 -> 3 -> 0. At step t worker p holds the block of worker
(p - t) mod 4, attends its queries to it and merges the result into its
running output and log-sum-exp (lse). After 4 steps every worker has seen
every block and its rows equal dense attention.

Run: python examples/10_ring_attention.py
"""

# %% 1. Inputs, and which rows each worker holds
import numpy as np

from miniattn import gradcheck
from miniattn.core.softmax import logsumexp
from miniattn.ring_attention import (
    InlineRing,
    RingConfig,
    make_shards,
    ring_attention_backward,
    ring_attention_forward,
    shard_indices,
    worker_forward,
)
from miniattn.transformer import attention_backward, attention_forward

P, N, D = 4, 10, 4
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 1, N, D)) for _ in range(3))  # (B, H, N, D)
rows = shard_indices(N, P, "contiguous")  # (P, c); -1 marks a padding row
print(f"N = {N} positions over P = {P} workers, causal attention; rows held by each worker (-1 = padding):")
print("(a padding row attends nothing, so its lse stays -inf and it is dropped from the output)")
for worker in range(P):
    print(f"  worker {worker}: {rows[worker].tolist()}")

# %% 2. The forward ring, one step of every worker at a time
# Each worker is a generator: next() runs one step and returns a RingStep record.
config = RingConfig(n_workers=P, scale=1 / np.sqrt(D), causal_offset=0, query_block=2, key_block=2)
ring = InlineRing(P)
shards = make_shards(q, k, v, rows, rows)
workers = [worker_forward(shard, config, ring.endpoint(shard.worker)) for shard in shards]
for step in range(P):
    print(f"\nstep {step}:")
    for worker in range(P):
        record = next(workers[worker])
        action = "computed" if record.computed else "skipped (wholly in the future)"
        running_lse = np.array2string(record.lse[0, 0], precision=3, floatmode="fixed")
        print(f"  worker {worker} holds block {record.source} {action:<31} running lse {running_lse}")

# %% 3. The final result equals dense attention
out, cache = ring_attention_forward(q, k, v, n_workers=P, causal=True, block_size=2)
expected, dense_cache = attention_forward(q, k, v, causal=True)
scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(D)  # (1, 1, N, N)
dense_lse = logsumexp(scores, np.broadcast_to(dense_cache["allowed"], scores.shape))
print(f"\nmax |ring - dense| output: {np.max(np.abs(out - expected)):.1e}")
print(f"max |ring - dense| lse:    {np.max(np.abs(cache.lse - dense_lse)):.1e}")
print("blocks computed per worker (contiguous, causal):", [work.blocks for work in cache.work])

# %% 4. The backward ring: dK and dV travel with their block for P hops
dout = rng.standard_normal(out.shape)
for name, got, want in zip("qkv", ring_attention_backward(dout, cache), attention_backward(dout, dense_cache)):
    print(f"max |ring - dense| d{name}:     {np.max(np.abs(got - want)):.1e}")


def forward(q, k, v):
    return ring_attention_forward(q, k, v, n_workers=P, layout="striped", causal=True, block_size=2)


result = gradcheck(forward, ring_attention_backward, [q, k, v], names=["q", "k", "v"], rng=rng)
print(f"gradcheck of the striped ring: max relative error {result.max_rel_error:.1e}")
assert result.max_rel_error < 1e-6

# %% 5. Causal work per worker: contiguous is 1..P blocks, striped is balanced
# On a longer sequence (N = 64, 16 rows per worker) the balance is easier to see.
q64, k64, v64 = (rng.standard_normal((1, 1, 64, D)) for _ in range(3))
for layout in ("contiguous", "striped"):
    _, layout_cache = ring_attention_forward(q64, k64, v64, n_workers=P, layout=layout, causal=True, block_size=8)
    pairs = [work.pairs for work in layout_cache.work]
    print(f"{layout:<10}: blocks {[work.blocks for work in layout_cache.work]}, "
          f"(query, key) pairs {pairs}, max/min {max(pairs) / min(pairs):.2f}")
