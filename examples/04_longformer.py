"""Longformer, step by step: sliding window, dilation and global tokens.

Run with miniattn installed (pip install .), or from the repository root
with PYTHONPATH=. python examples/04_longformer.py. Each cell prints what it
shows and ends with a check.
"""

# %% 1. A sliding window of w = 2 keys on each side (the window width is one-sided).
import numpy as np

import miniattn
from miniattn import longformer as lf
from miniattn.core.masks import padding_mask
from miniattn.transformer import attention_forward

n, window = 14, 2


local, glob, _ = lf.longformer_masks(n, n, window=window)
print(f"step 1: N={n}, one-sided window w={window}: {2 * window + 1} slots per query, clipped at both ends")
print("        key      " + "".join(str(j % 10) for j in range(n)))
for i in range(n):
    print(f"        query {i:>2} " + "".join(np.where(local[i], "w", ".")))
print(f"        keys per query: first {local[0].sum()}, middle {local[7].sum()}, last {local[-1].sum()}")

# %% 2. Dilation spreads the same number of slots over a wider span; causal keeps only t <= 0.
dilated, _, _ = lf.longformer_masks(n, n, window=window, dilation=3)
causal, _, _ = lf.longformer_masks(n, n, window=window, dilation=3, causal=True)
print(f"step 2: query 7 with dilation 3 attends {np.flatnonzero(dilated[7]).tolist()}, "
      f"causal {np.flatnonzero(causal[7]).tolist()}")

# %% 3. Global tokens: they attend every key, and every query attends them.
global_indices = [0, 9]
local, glob, global_rows = lf.longformer_masks(n, n, window=window, global_indices=global_indices)
print(f"step 3: global tokens {global_indices}: a key inside a window is listed once, as a global column")
print("        w window, g global column, G global row, . not attended")
print("        key      " + "".join(str(j % 10) for j in range(n)))
for i in range(n):
    cells = np.where(local[i], "w", ".")
    cells[global_indices] = np.where(local[i, global_indices], "g", ".")
    if global_rows[i]:
        cells = np.where(glob[i], "G", ".")
    print(f"        query {i:>2} " + "".join(cells))
query = 7
keys = np.flatnonzero(local[query]).tolist()
window_keys = [j for j in range(query - window, query + window + 1) if 0 <= j < n]
print(f"        query {query} attends {keys}: its window {window_keys} and the global columns {global_indices}, "
      f"each key once: {keys == sorted(set(window_keys) | set(global_indices))}")

# %% 4. The sparse path equals dense masked attention; global rows use separate projections.
rng = np.random.default_rng(0)
heads = 2
q, k, v, q_global, k_global, v_global = (rng.standard_normal((1, heads, n, 8)) for _ in range(6))
dilation = (1, 2)  # one dilation per head
out, cache = lf.attention_forward(
    q, k, v, window=window, dilation=dilation, global_indices=global_indices,
    q_global=q_global, k_global=k_global, v_global=v_global,
)
masks = [lf.longformer_masks(n, n, window=window, dilation=d, global_indices=global_indices) for d in dilation]
local_mask = np.stack([m[0] for m in masks])[None]  # (1, H, N, N)
global_mask = np.stack([m[1] for m in masks])[None]
expected = attention_forward(q, k, v, mask=local_mask)[0] + attention_forward(
    q_global, k_global, v_global, mask=global_mask
)[0]
print(f"step 4: dilation per head {dilation}, separate global projections: "
      f"max |sparse - dense oracle| = {np.max(np.abs(out - expected)):.1e}")

# %% 5. Padding never leaks: the valid rows of a padded batch equal a run on the valid tokens alone.
lengths = np.array([n, 9])
padding = padding_mask(lengths, n)  # (B, 1, 1, M)
batch = tuple(np.concatenate([x, rng.standard_normal(x.shape)]) for x in (q, k, v))  # (2, H, N, D)
padded_out, _ = lf.attention_forward(*batch, window=window, global_indices=[0], mask=padding)
alone, _ = lf.attention_forward(*(x[1:, :, :9] for x in batch), window=window, global_indices=[0])
print(f"step 5: sequence of 9 padded to {n}: max |padded - unpadded| on valid rows = "
      f"{np.max(np.abs(padded_out[1, :, :9] - alone[0])):.1e}")

# %% 6. Check the gradient against finite differences, with separate global projections.
small = [x[..., :6, :3].copy() for x in (q, k, v, q_global, k_global, v_global)]  # (1, 2, 6, 3) each


def forward(q, k, v, q_global, k_global, v_global):
    return lf.attention_forward(
        q, k, v, window=1, dilation=(1, 2), global_indices=[2], causal=True,
        q_global=q_global, k_global=k_global, v_global=v_global,
    )


names = ["q", "k", "v", "q_global", "k_global", "v_global"]
result = miniattn.gradcheck(forward, lf.attention_backward, small, names=names, rng=rng)
print(f"step 6: gradcheck, causal, N=6, w=1: max relative error {result.max_rel_error:.1e} (tolerance 1e-6)")
result.assert_ok(1e-6)
