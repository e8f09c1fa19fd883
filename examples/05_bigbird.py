"""BigBird, step by step: window, global and random blocks on the sparse-attention core.

Run with miniattn installed (pip install .), or from the repository root
with PYTHONPATH=. python examples/05_bigbird.py. Each cell prints what it
shows and ends with a check.
"""

# %% 1. Cut the sequence into blocks and draw the random blocks of every head.
import numpy as np

import miniattn
from miniattn import bigbird
from miniattn.transformer import attention_forward

rng = np.random.default_rng(0)
n, block_size, n_random, n_heads = 46, 4, 2, 2  # the last of the 12 blocks holds 2 tokens
n_blocks = bigbird.n_blocks_for(n, block_size)
random_blocks = bigbird.random_block_adjacency(n_blocks, n_random, n_heads, rng)  # (H, nb, R)
print(f"step 1: N={n} tokens in nb={n_blocks} blocks of b={block_size}, R={n_random} random blocks per row")
print(f"        head 0 random blocks of query blocks 1..{n_blocks - 2}: {random_blocks[0, 1:-1].tolist()}")
print(f"        full attention is used instead when N <= (5 + 2R) b = {bigbird.fallback_length(block_size, n_random)}")

# %% 2. Draw the block pattern of head 0: which key blocks each query block attends.
block = np.arange(n_blocks)


def draw_blocks(adjacency):
    """Draw one character per (query block, key block): G global, W window, R random, . skipped."""
    grid = np.full((n_blocks, n_blocks), ".")  # (nb, nb)
    for i in range(1, n_blocks - 1):
        grid[i, adjacency[i][adjacency[i] >= 0]] = "R"  # -1 means "no block"
    grid[np.abs(block[:, None] - block[None, :]) <= 1] = "W"
    grid[[0, -1], :] = "G"
    grid[:, [0, -1]] = "G"
    return grid


grid = draw_blocks(random_blocks[0])
print("step 2: block pattern of head 0 (G global, W window, R random, . skipped)")
print("        key block  " + "".join(str(j % 10) for j in range(n_blocks)))
for i in range(n_blocks):
    print(f"        query {i:>2}   " + "".join(grid[i]))
counts = bigbird.block_counts(n_blocks, random_blocks[0])  # (nb, nb)
print(f"        drawing matches block_counts: {np.array_equal(grid != '.', counts > 0)}")

# %% 3. Which keys one query attends.
query = 21  # in block 5, a middle block
indptr, indices = bigbird.bigbird_pattern(n, block_size, random_blocks[0])
keys = indices[indptr[query] : indptr[query + 1]]
row = "".join("#" if j in keys else "." for j in range(n))
print(f"step 3: query {query} (block {query // block_size}) attends {keys.size} of {n} keys:")
print(f"        {row}")
last_block_size = n - (n_blocks - 1) * block_size
expected_keys = (4 + n_random) * block_size + last_block_size  # 4 + R full blocks and the short global last block
print(f"        expected (4 + R) b + {last_block_size} = {expected_keys}: {keys.size == expected_keys}")

# %% 4. The block-sparse path equals dense attention under the BigBird mask.
q, k, v = (rng.standard_normal((1, n_heads, n, 8)) for _ in range(3))  # (B, H, N, D)
out, cache = bigbird.attention_forward(
    q, k, v, block_size=block_size, num_random_blocks=n_random, random_blocks=random_blocks
)
allowed, _ = bigbird.bigbird_mask(n, block_size, random_blocks)  # (H, N, N)
expected, _ = attention_forward(q, k, v, mask=allowed)
print(f"step 4: path={cache['path']}, max |sparse - dense masked| = {np.max(np.abs(out - expected)):.1e}")

# %% 5. Causal BigBird (for decoders): the same pattern restricted to each query's past.
causal_blocks = bigbird.random_block_adjacency(n_blocks, n_random, n_heads, rng, causal=True)  # past blocks only
causal_grid = draw_blocks(causal_blocks[0])
causal_grid[block[:, None] < block[None, :]] = "."  # key blocks after the query block drop out
print("step 5: head 0, bidirectional | causal (own block up to the query; random blocks only from the past)")
for i in range(n_blocks):
    print(f"        query {i:>2}   " + "".join(grid[i]) + " | " + "".join(causal_grid[i]))
allowed_causal, _ = bigbird.bigbird_mask(n, block_size, causal_blocks, causal=True)  # (H, N, N)
starts = block * block_size
block_seen = np.logical_or.reduceat(np.logical_or.reduceat(allowed_causal[0], starts, axis=0), starts, axis=1)
print(f"        drawing matches the causal mask: {np.array_equal(causal_grid != '.', block_seen)}, "
      f"no key after its query: {not np.any(np.triu(allowed_causal, k=1))}")
out_causal, _ = bigbird.attention_forward(
    q, k, v, block_size=block_size, num_random_blocks=n_random, random_blocks=causal_blocks, causal=True
)
expected_causal, _ = attention_forward(q, k, v, mask=allowed_causal)
print(f"        max |causal sparse - dense masked| = {np.max(np.abs(out_causal - expected_causal)):.1e}")

# %% 6. A key block listed several times: "count" weights it by its count, "merge" keeps it once.
zero_adjacency = np.zeros_like(random_blocks)  # every middle row draws block 0 again, R times
zero_adjacency[:, [0, -1]] = -1  # global rows attend everything and read no random blocks
for duplicates in ("merge", "count"):
    out_rule, _ = bigbird.attention_forward(
        q, k, v, block_size=block_size, num_random_blocks=n_random, random_blocks=zero_adjacency,
        duplicates=duplicates,
    )
    allowed, logit_bias = bigbird.bigbird_mask(n, block_size, zero_adjacency, duplicates=duplicates)
    expected, _ = attention_forward(q, k, v, mask=allowed, bias=logit_bias)
    multiplicity = 1 if logit_bias is None else int(round(np.exp(logit_bias.max())))
    print(f"step 6: duplicates={duplicates!r}: block 0 (global, then drawn R={n_random} times) counts {multiplicity}x, "
          f"max |sparse - dense| = {np.max(np.abs(out_rule - expected)):.1e}")

# %% 7. A short sequence falls back to full attention for that call.
short = tuple(x[..., :20, :] for x in (q, k, v))
out_short, cache_short = bigbird.attention_forward(*short, block_size=block_size, num_random_blocks=n_random)
expected_short, _ = attention_forward(*short)
print(f"step 7: N=20 <= {bigbird.fallback_length(block_size, n_random)}: path={cache_short['path']}, "
      f"max |out - dense| = {np.max(np.abs(out_short - expected_short)):.1e}")

# %% 8. Check the gradient against finite differences (random blocks held fixed).
small = tuple(x[..., :19, :3].copy() for x in (q, k, v))  # (1, 2, 19, 3)
small_blocks = bigbird.random_block_adjacency(bigbird.n_blocks_for(19, 2), 1, n_heads, rng)


def forward(q, k, v):
    return bigbird.attention_forward(q, k, v, block_size=2, num_random_blocks=1, random_blocks=small_blocks)


result = miniattn.gradcheck(forward, bigbird.attention_backward, small, names=("q", "k", "v"), rng=rng)
print("step 8: gradient check, N=19, b=2, R=1")
print(result)
result.assert_ok(1e-6)
print("        max relative error <= 1e-6: ok")
