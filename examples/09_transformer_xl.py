"""Transformer-XL, two segments: the memory, the four score terms, the shift, the mask.

Run it whole (python examples/09_transformer_xl.py) or cell by cell in an
editor that understands `# %%` cells. Every step prints what it computed and
ends in a check.
"""

# %% 1. A two-layer model and a sequence of two segments.
# The sequence has T = 8 positions of width C = 8, cut into segments of N = 4.
# Each layer keeps a memory of mem_len = 4 positions between segments.
import numpy as np

from miniattn import gradcheck
from miniattn.transformer import split_heads
from miniattn.transformer_xl import (
    XLConfig,
    decoder_forward,
    empty_memory,
    gradcheck_cases,
    init_layer_params,
    recurrence_mask,
    rel_shift,
    rel_shift_gather,
    relative_distances,
    relative_mask,
    relative_positions,
    relative_scores,
    score_terms,
)

np.set_printoptions(precision=3, suppress=True, linewidth=120)
rng = np.random.default_rng(0)
segment_len, width, n_heads = 4, 8, 2
config = XLConfig(n_heads=n_heads, mem_len=4)
params = [init_layer_params(width, n_heads, 16, rng) for _ in range(2)]
x = rng.standard_normal((1, 2 * segment_len, width))  # (B, T, C)
segment1, segment2 = x[:, :segment_len], x[:, segment_len:]
print("sequence", x.shape, "-> segments", segment1.shape, segment2.shape)
assert segment1.shape == segment2.shape == (1, 4, 8)

# %% 2. Segment 1: no memory yet.
# Each layer attends only within the segment. Afterwards each layer's memory
# is its own input on this segment: the embeddings for layer 0, the output of
# layer 0 for layer 1.
mems = empty_memory(2, 1, width)
out1, mems, _ = decoder_forward(segment1, mems, params, config)
print("memory lengths after segment 1:", [mem.shape[1] for mem in mems])
assert np.array_equal(mems[0], segment1)

# %% 3. Segment 2: the memory carried.
# Keys and values now come from [memory ; segment], M = 4 + 4 = 8 keys for
# N = 4 queries. The memory is a constant: no gradient flows back into
# segment 1, but W_k and W_v still get gradients from the memory rows.
out2, next_mems, _ = decoder_forward(segment2, mems, params, config)
print("segment 2 output", out2.shape, "memory lengths after:", [mem.shape[1] for mem in next_mems])
assert all(mem.shape[1] == config.mem_len for mem in next_mems)

# %% 4. The four score terms of layer 0 on segment 2.
# q from the segment, k from [memory ; segment], r = R W_r from the sinusoids of
# the distances 7, 6, ..., 0. The four terms of Dai et al. (2019) are
# (a) content q.k, (b) content-position q.r, (c) global content bias u.k and
# (d) global position bias v.r.
layer = params[0]
joined = np.concatenate([mems[0], segment2], axis=1)  # (1, M, C)
q = split_heads(segment2 @ layer["W_q"], n_heads)  # (1, H, N, D)
k = split_heads(joined @ layer["W_k"], n_heads)  # (1, H, M, D)
positions = relative_positions(segment_len, 2 * segment_len, width)  # (M, C)
r = (positions @ layer["W_r"]).reshape(8, n_heads, -1).transpose(1, 0, 2)  # (H, M, D)
terms = score_terms(q, k, r, layer["u"], layer["v"])
for name, meaning in [("a", "content"), ("b", "content-position"), ("c", "content bias"), ("d", "position bias")]:
    print(f"term ({name}) {meaning:<17} query 0, head 0:", terms[name][0, 0, 0])
content, position, _, _, _ = relative_scores(q, k, r, layer["u"], layer["v"])
total_error = np.abs(terms["a"] + terms["b"] + terms["c"] + terms["d"] - (content + position)).max()
print("max |(a + b + c + d) - (AC + BD)|:", total_error)
assert total_error < 1e-12

# %% 5. The relative shift.
# Column t of BD_raw contains distance d_t = 7 - t for every query. Shifting moves
# it under key j so that entry (i, j) contains the distance of query i (at
# position i + 4) from key j. Feed the distances themselves through the shift
# to see it. On the diagonal j = i + 4 the distance is 0, and the gather form
# also writes 0 to every key after it.
distances = relative_distances(segment_len, 2 * segment_len).astype(float)  # (M,)
raw = np.tile(distances, (segment_len, 1))  # (N, M): row i is 7, 6, ..., 0
print("BD_raw as distances:\n", raw)
print("gather shift (0 beyond the allowed keys):\n", rel_shift_gather(raw, 2 * segment_len))
print("pad/reshape shift (the next row's values beyond them):\n", rel_shift(raw))
expected = np.arange(segment_len)[:, None] + segment_len - np.arange(2 * segment_len)[None, :]
allowed = relative_mask(segment_len, 2 * segment_len)
assert np.array_equal(rel_shift_gather(raw, 8)[allowed], expected[allowed])

# %% 6. The mask.
# Query i may attend key j when j <= i + 4 (the queries are the last N keys).
# With same_length each query also sees at most mem_len keys.
print("causal mask with memory (1 = may attend):\n", allowed.astype(int))
print("same_length mask:\n", relative_mask(segment_len, 8, window=config.mem_len).astype(int))
assert allowed.sum(axis=-1).tolist() == [5, 6, 7, 8]

# %% 7. Checks: recurrence equals one banded pass; the backward is proven.
# With mem_len = N, two segments through the memory equal one pass over the
# whole sequence with a causal mask that reaches back one segment.
one_pass, _, _ = decoder_forward(x, empty_memory(2, 1, width), params, config, mask=recurrence_mask(8, 4, 4))
recurrent = np.concatenate([out1, out2], axis=1)
print("max |recurrent - one pass|:", np.abs(recurrent - one_pass).max())
assert np.abs(recurrent - one_pass).max() < 1e-12
label, forward, backward, inputs, names = gradcheck_cases(np.random.default_rng(0))[4]
result = gradcheck(forward, backward, inputs, names=names, rng=rng)
result.assert_ok(1e-6)
print(f"check: gradcheck, {label}: max rel error {result.max_rel_error:.1e} (tolerance 1e-6)")
