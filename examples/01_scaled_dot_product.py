"""Scaled dot-product attention, step by step, with its backward proven.

Run it whole (python examples/01_scaled_dot_product.py) or cell by cell in an
editor that understands `# %%` cells. Every step prints what it computed and
ends in a check.
"""

# %% 1. Queries, keys and values.
# Three queries attend five keys: N = 3, M = 5, head width D = 4. The queries
# are the last three positions of the key sequence, as in a decoder with two
# earlier tokens cached.
import numpy as np

from miniattn import gradcheck
from miniattn.core.masks import causal_mask
from miniattn.transformer import attention_backward, attention_forward

np.set_printoptions(precision=3, suppress=True)
rng = np.random.default_rng(0)
q = rng.standard_normal((3, 4))  # (N, D)
k = rng.standard_normal((5, 4))  # (M, D)
v = rng.standard_normal((5, 4))  # (M, D)
print("q", q.shape, "k", k.shape, "v", v.shape)

# %% 2. Scores: every query against every key, scaled by 1/sqrt(D).
# Without the scale, the dot products of D-dimensional vectors grow like
# sqrt(D) and push the softmax into saturation.
scores = q @ k.T / np.sqrt(4)  # (N, D) @ (D, M) -> (N, M)
print("scores (N, M):\n", scores)
assert scores.shape == (3, 5)

# %% 3. The causal mask, aligned bottom-right.
# Query i sits at position i + (M - N) and may attend keys j <= i + (M - N).
allowed = causal_mask(3, 5)
print("allowed (True = may attend):\n", allowed.astype(int))
assert allowed[0].sum() == 3 and allowed[2].sum() == 5

# %% 4. Softmax over the allowed keys.
masked = np.where(allowed, scores, -np.inf)
probs = np.exp(masked - masked.max(axis=-1, keepdims=True))
probs /= probs.sum(axis=-1, keepdims=True)
print("attention probabilities:\n", probs)
print("row sums:", probs.sum(axis=-1))
assert np.allclose(probs.sum(axis=-1), 1.0) and np.all(probs[~allowed] == 0)

# %% 5. Output: each query's probability-weighted average of the values.
out_by_hand = probs @ v  # (N, M) @ (M, D) -> (N, D)
out, cache = attention_forward(q, k, v, causal=True)
print("output (N, D):\n", out)
print("max difference from the library:", np.abs(out - out_by_hand).max())
assert np.allclose(out, out_by_hand, rtol=1e-12)

# %% 6. The backward pass, by hand.
# dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dq = dS k / sqrt(D), dk = dS^T q / sqrt(D).
dout = rng.standard_normal(out.shape)
dv = probs.T @ dout
dprobs = dout @ v.T
dscores = probs * (dprobs - np.sum(dout * out, axis=-1, keepdims=True))
dq = dscores @ k / np.sqrt(4)
dk = dscores.T @ q / np.sqrt(4)
library = attention_backward(dout, cache)
for name, mine, theirs in zip(("dq", "dk", "dv"), (dq, dk, dv), library):
    print(f"{name}: max difference from the library {np.abs(mine - theirs).max():.1e}")
    assert np.allclose(mine, theirs, rtol=1e-12, atol=1e-14)

# %% 7. Prove the backward with finite differences.
# gradcheck draws a random upstream gradient g and compares the backward with
# central differences of sum(g * forward(q, k, v)).
result = gradcheck(
    lambda q, k, v: attention_forward(q, k, v, causal=True),
    attention_backward,
    [q, k, v],
    names=["q", "k", "v"],
    rng=rng,
)
print(result)
result.assert_ok(1e-6)
print("gradient check passed: max rel error", f"{result.max_rel_error:.1e}")
