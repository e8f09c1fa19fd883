"""Performer (FAVOR+), step by step: random features instead of the N x N matrix.

Run with `python examples/08_performer.py` from the repository root, or step
through the `# %%` cells in an editor. Each step prints what it shows and
ends in a check.
"""

# %% Setup: one head of queries, keys and values.
import numpy as np

from miniattn import gradcheck
from miniattn.performer import (
    approximate_attention_matrix,
    draw_features,
    favor_attention_backward,
    favor_attention_forward,
    softmax_kernel_features_forward,
)
from miniattn.transformer import attention_forward

rng = np.random.default_rng(0)
N, M, D = 12, 12, 8  # queries, keys, head width
q = 0.3 * rng.standard_normal((N, D))
k = 0.3 * rng.standard_normal((M, D))
v = rng.standard_normal((M, D))
exact, _ = attention_forward(q, k, v)
print(f"inputs: q {q.shape}, k {k.shape}, v {v.shape}; exact softmax attention out {exact.shape}")

# %% Step 1: draw orthogonal random features.
# Blocks of D orthogonal rows (QR of Gaussian matrices), each row rescaled to
# the norm of a Gaussian vector, so every row is marginally N(0, I_D).
F = 32
W = draw_features(F, D, rng)  # (F, D)
block = W[:D]
gram = block @ block.T
off_diagonal = np.max(np.abs(gram - np.diag(np.diag(gram))))
print(f"step 1: W {W.shape}; rows of one block are orthogonal: max |w_i . w_j| = {off_diagonal:.1e}")
print(f"        squared row norms: mean {np.mean(np.sum(W**2, axis=1)):.2f} (E = D = {D})")

# %% Step 2: the positive feature map and the kernel it estimates.
# phi(x) = F^-1/2 exp(W x~ - |x~|^2 / 2 - c), x~ = x D^-1/4; with c = 0 and
# eps = 0, phi(q).phi(k) estimates exp(q.k / sqrt(D)) without bias.
phi_q, _ = softmax_kernel_features_forward(q[:1], W, eps=0.0, stabiliser=0.0)
phi_k, _ = softmax_kernel_features_forward(k[:1], W, eps=0.0, stabiliser=0.0)
kernel = np.exp(q[0] @ k[0] / np.sqrt(D))
print(f"step 2: phi(q) {phi_q.shape}, all positive: {bool(np.all(phi_q > 0))}")
estimates = []
for _ in range(2000):
    features = draw_features(F, D, rng)
    phi_q, _ = softmax_kernel_features_forward(q[:1], features, eps=0.0, stabiliser=0.0)
    phi_k, _ = softmax_kernel_features_forward(k[:1], features, eps=0.0, stabiliser=0.0)
    estimates.append(float(phi_q[0] @ phi_k[0]))
standard_error = np.std(estimates) / np.sqrt(len(estimates))
print(
    f"        exp(q.k/sqrt(D)) = {kernel:.4f}; mean of 2000 estimates = {np.mean(estimates):.4f} "
    f"+- {standard_error:.4f}"
)

# %% Step 3: the linear-time product, in the order that never forms N x M.
# Stabilisers: one per query row, one shared by all keys; both cancel.
query_features, _ = softmax_kernel_features_forward(q, W, stabiliser="row")  # (N, F)
key_features, _ = softmax_kernel_features_forward(k, W, stabiliser="shared")  # (M, F)
kv = key_features.T @ v  # (F, M) @ (M, D) -> (F, D): keys summarised once
normaliser = query_features @ key_features.sum(axis=0)  # (N,)
linear = (query_features @ kv) / normaliser[:, None]  # (N, F) @ (F, D) -> (N, D)
matrix = approximate_attention_matrix(q, k, W)  # (N, M): only for this check
print(f"step 3: intermediates phi(Q) {query_features.shape}, phi(K)^T V {kv.shape}; no {N} x {M} matrix")
print(f"        max |linear - materialised D^-1 A' V| = {np.max(np.abs(linear - matrix @ v)):.1e}")

# %% Step 4: causal attention through prefix sums.
causal, _ = favor_attention_forward(q, k, v, W, causal=True)
causal_matrix = approximate_attention_matrix(q, k, W, causal=True)
print(f"step 4: the causal matrix is lower-triangular: {bool(np.all(np.triu(causal_matrix, 1) == 0))}")
print(f"        max |prefix-sum output - tril(A') V| = {np.max(np.abs(causal - causal_matrix @ v)):.1e}")

# %% Step 5: the approximation error falls as F^-1/2.
sizes = [16, 64, 256, 1024, 4096]
print("step 5: relative error of FAVOR+ against exact attention (mean over 20 draws)")
print(f"        {'F':>6} {'orthogonal':>11} {'i.i.d.':>9}")
means = {True: [], False: []}
for size in sizes:
    row = []
    for orthogonal in (True, False):
        errors = []
        for _ in range(20):
            out, _ = favor_attention_forward(q, k, v, draw_features(size, D, rng, orthogonal=orthogonal))
            errors.append(np.linalg.norm(out - exact) / np.linalg.norm(exact))
        means[orthogonal].append(np.mean(errors))
        row.append(np.mean(errors))
    print(f"        {size:>6} {row[0]:>11.4f} {row[1]:>9.4f}")
slope = np.polyfit(np.log(sizes), np.log(means[False]), 1)[0]
print(f"        fitted log-log slope (i.i.d.) = {slope:.2f}, expected about -0.5")

# %% Step 6: the hand-written backward against finite differences (features fixed).
# Unit-scale inputs: with the small q and k above, attention is nearly uniform,
# the gradients of q are tiny, and finite-difference round-off dominates them.
qb, kb, vb = (rng.standard_normal((1, 1, 6, D)) for _ in range(3))  # (1, 1, 6, D)
result = gradcheck(
    lambda q, k, v: favor_attention_forward(q, k, v, W, causal=True, eps=0.0),
    favor_attention_backward, [qb, kb, vb], names=["q", "k", "v"], rng=rng,
)
print(f"step 6: causal FAVOR+ gradcheck max relative error {result.max_rel_error:.1e} (tolerance 1e-6)")
result.assert_ok(1e-6)
