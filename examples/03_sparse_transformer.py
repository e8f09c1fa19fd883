"""Sparse Transformer, step by step: strided and fixed factorised patterns.

Run with miniattn installed (pip install .), or from the repository root
with PYTHONPATH=. python examples/03_sparse_transformer.py. Each cell prints
what it shows and ends with a check.
"""

# %% 1. The two strided index sets of a causal sequence, drawn as a grid.
import numpy as np

import miniattn
from miniattn import sparse_transformer as st
from miniattn.transformer import attention_forward

n, stride = 16, 4  # l = sqrt(N)
local = st.sparse_transformer_mask(n, n, stride=stride, causal=True, combine="alternating", layer=0)  # A1
strided = st.sparse_transformer_mask(n, n, stride=stride, causal=True, combine="alternating", layer=1)  # A2


def draw(first, second, title):
    """Print one row per query: 1 only in A1, 2 only in A2, B in both, . not attended."""
    print(f"        {title}")
    print("        key      " + "".join(str(j % 10) for j in range(first.shape[1])))
    for i in range(first.shape[0]):
        cells = np.where(first[i] & second[i], "B", np.where(first[i], "1", np.where(second[i], "2", ".")))
        print(f"        query {i:>2} " + "".join(cells))


print(f"step 1: strided pattern, N={n}, l={stride}, causal (1 = A1 local, 2 = A2 every l-th, B = both)")
draw(local, strided, "A1(i) = {i-l < j <= i},  A2(i) = {j <= i : (i - j) mod l = 0}")
print(f"        most keys per query: {int((local | strided).sum(axis=1).max())} of {n} (<= 2 l - 1 = {2 * stride - 1})")

# %% 2. Which keys one query sees in each factor.
query = 13
print(f"step 2: query {query} attends A1 = {np.flatnonzero(local[query]).tolist()} "
      f"and A2 = {np.flatnonzero(strided[query]).tolist()}")
print(f"        merged head A1 u A2 = {np.flatnonzero(local[query] | strided[query]).tolist()}")

# %% 3. Two steps reach every earlier position: i attends k in A2(i), k attends j in A1(k).
two_steps = (strided.astype(int) @ local.astype(int)) > 0  # (N, N)
print(f"step 3: A2 then A1 reaches every key j <= i: {np.array_equal(two_steps, np.tril(np.ones((n, n), bool)))}")

# %% 4. The fixed pattern, with a different summary column per head (c = 1, S = 2 summary sets).
options = dict(pattern="fixed", stride=stride, summary_width=1, n_summary_sets=2, causal=True, combine="alternating")
for head in range(2):
    block = st.sparse_transformer_mask(n, n, head, 2, layer=0, **options)
    summary = st.sparse_transformer_mask(n, n, head, 2, layer=1, **options)
    offset = st.summary_offsets(stride, 1, head % 2).tolist()
    print(f"step 4: fixed pattern, head {head}: summary column at position {offset} of every block")
    draw(block, summary, "A1 own block (1), A2 summary columns (2)")
empty_rows = np.flatnonzero(~summary.any(axis=1)).tolist()
print(f"        head 1's A2 is empty for queries {empty_rows}: those rows get zero output (checked in step 5)")

# %% 5. Sparse attention equals dense attention under the same mask, for every combination.
rng = np.random.default_rng(0)
heads = 2
q, k, v = (rng.standard_normal((1, heads, n, 8)) for _ in range(3))  # (B, H, N, D)
for combine in st.COMBINES:
    settings = dict(pattern="fixed", stride=stride, summary_width=1, n_summary_sets=2, combine=combine, layer=1)
    out, cache = st.attention_forward(q, k, v, causal=True, **settings)
    allowed = np.stack([st.sparse_transformer_mask(n, n, h, heads, causal=True, **settings) for h in range(heads)])
    expected, _ = attention_forward(q, k, v, mask=allowed[None])  # (1, H, N, N) mask
    zero_rows = ~allowed.any(axis=-1)  # (H, N)
    print(f"step 5: combine={combine!r:<14} max |sparse - dense masked| = {np.max(np.abs(out - expected)):.1e}, "
          f"empty rows all zero: {bool(np.all(out[0][zero_rows] == 0.0))}")

# %% 6. Check the gradient against finite differences.
small = tuple(x[..., :7, :3].copy() for x in (q, k, v))  # (1, 2, 7, 3)


def forward(q, k, v):
    return st.attention_forward(q, k, v, stride=3, causal=True)


result = miniattn.gradcheck(forward, st.attention_backward, small, names=["q", "k", "v"], rng=rng)
print(f"step 6: gradcheck, strided merged, N=7, l=3: max relative error {result.max_rel_error:.1e} (tolerance 1e-6)")
result.assert_ok(1e-6)
