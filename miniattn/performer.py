"""Performer: FAVOR+ attention with positive orthogonal random features (Choromanski et al., 2021).

Letters: B batch, H heads, N queries, M keys, D head width of queries and
keys, Dv value width, F random features (the paper's m), C chunk length of
the causal scan.

Idea. Softmax attention weights are exp(q.k / sqrt(D)), a kernel of q and k.
A random feature map phi with E[phi(q).phi(k)] = exp(q.k / sqrt(D)) turns the
N x M matrix of weights into a product of an N x F and an F x M matrix, and
multiplying in the right order never forms the N x M matrix:

    out = D^-1 (phi(Q) (phi(K)^T V)),    D = diag(phi(Q) (phi(K)^T 1))

(here D^-1 is the row normalisation, not the head width).

Positive random features (the softmax kernel, "SM+"). With x~ = x D^-1/4
(so that q~.k~ = q.k / sqrt(D)) and rows w_1..w_F of the feature matrix W:

    u_j(x)   = w_j . x~ - |x~|^2 / 2
    phi(x)_j = F^-1/2 (exp(u_j(x) - c) + eps)

For w ~ N(0, I_D), c = 0 and eps = 0, E[exp(u(q) + u(k))] = exp(q~.k~), so
phi(q).phi(k) is an unbiased estimate of the softmax kernel, and every
feature is positive, so the row normaliser never comes near zero the way
sin/cos features can. The stabiliser c keeps exp from overflowing: one
constant per query row (it cancels in that row's normalisation) and ONE
constant shared by every key of a (batch, head) slice (it cancels in every
row). A separate constant per key would change the attention weights. With
eps > 0, phi = F^-1/2 exp(-c) (exp(u) + eps exp(c)): the eps term does not
carry the factor exp(-c), so c no longer cancels. Next to exp(u - c) the eps
term is small for features near the maximum and dominant for features far
below it. When the norms of q and k are large, most features fall far below
eps, and the output depends on c noticeably. In causal attention the key c is
taken over every key, so a later key can then change an earlier output
slightly through c, and the gradient includes that path. The backward
therefore differentiates c as the maximum it is,

    c = max_{(l, j) in set} u_j(x_l),   dc = -sum_{(l, j) in set} dphi_lj F^-1/2 exp(u_lj - c)

(the set is one row for queries, every valid entry of the slice for keys),
and adds dc to the gradient of the maximising entry u_lj, from which it flows
into x_l like any other exponent. At a tie the first maximum (in row-major
order) receives dc; the maximum is not differentiable there, and away from
ties finite differences agree. A stabiliser given explicitly is a frozen
constant, with no gradient.

Orthogonal random features (ORF). W is a stack of ceil(F / D) blocks of D
mutually orthogonal rows, each block the Q factor of the QR decomposition of
a D x D Gaussian matrix. Each row is then rescaled to the norm of an
independent Gaussian D-vector (a chi_D draw). Every row is therefore still
marginally N(0, I_D), so the estimate stays unbiased, with lower variance
than i.i.d. rows. The
i.i.d. Gaussian option is kept for comparison. The generalized ReLU kernel
phi(x) = F^-1/2 (ReLU(W x~) + eps) is an alternative kernel, not an
approximation of softmax.

Causal attention. Query i may attend key j when j <= i + (M - N) (queries are
the last N key positions). With k'_s = phi(k_s):

    S_t = sum_{s <= t} k'_s v_s^T  (F, Dv),   z_t = sum_{s <= t} k'_s  (F,)
    out_t = (q'_t^T S_t) / (q'_t . z_t)

computed by a scan over chunks of C positions. The running sums S and z carry
every key before a chunk, and a C x C lower-triangular product covers the
keys inside it. C = 1 is the plain per-token prefix sum. The backward of a
prefix sum is a suffix sum, G_t = sum_{s >= t} q'_s dnum_s^T, carried by a
reverse scan.

Padding. A key-padding mask zeroes the rows of phi(K), which removes those
keys from numerator and denominator. Zeroing the raw key would not: phi(0)
is not 0. The shared key stabiliser is taken over valid keys only, so a
padded sequence gives the same output as the unpadded one.

Redraw policy. Features are random but never redrawn inside forward or
backward: PerformerAttention draws them once (at construction, or at the
first forward when the head width is not known before) from its Generator
and redraws only when redraw_features() is called. The cache keeps the
features used, so a backward always matches its forward and a gradient check
differentiates one fixed function.

Row blocks. phi(Q) and phi(K) are computed a block of rows at a time and
never held whole. A first pass over the key blocks finds the shared key
stabiliser. Bidirectional, a second pass sums kv = phi(K)^T V and
phi(K)^T 1, and each query block then gives its output rows. Causal, each
block of key positions gets its key features and those of the queries that
sit there, and the scan runs over the block, carrying S and z into the next.
The backward recomputes the blocks, unless the whole input fits in one
block, whose features the cache then keeps. A block of features stays in the CPU
cache through its elementwise passes, while whole (N, F) arrays would travel
to memory and back for each pass. So the blocks keep the time linear in N,
and the recomputation costs one or two more feature maps per input.

Complexity per head: O((N + M) F (D + Dv)) time, plus O(M C F) for the
causal chunk blocks. Memory: O((N + M) (D + Dv) + F Dv) plus one block of
features, and O(C^2) for the causal scan. Exact attention costs O(N M D)
time and O(N M) memory.
"""

import numpy as np

from .core.validate import (
    check_attention_inputs,
    check_choice,
    check_float_array,
    check_generator,
    check_int,
    check_mask,
    check_real,
    check_upstream,
)

KERNELS = ("softmax", "relu")
DEFAULT_EPS = {"softmax": 1e-6, "relu": 1e-3}
STABILISER_MODES = ("row", "shared")


# --- random features ----------------------------------------------------------


def draw_features(num_features, width, rng, *, orthogonal=True, dtype=np.float64):
    """Draw a random feature matrix W (F, D) whose rows are marginally N(0, I_D).

    Inputs:
    - num_features: F >= 1
    - width: D >= 1, the head width of queries and keys
    - rng: numpy.random.Generator, the only source of randomness
    - orthogonal: True for orthogonal random features (blocks of D orthogonal
      rows with chi_D row norms), False for i.i.d. Gaussian rows
    - dtype: float64 or float32

    Returns W (F, D).
    """
    check_int("num_features", num_features, minimum=1)
    check_int("width", width, minimum=1)
    check_generator("rng", rng)
    if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype={np.dtype(dtype)} is invalid; expected float32 or float64")
    if not orthogonal:
        return rng.standard_normal((num_features, width)).astype(dtype)  # (F, D)

    # 1. Directions: blocks of D orthonormal rows, from the QR of Gaussian matrices.
    blocks = []
    for _ in range(-(-num_features // width)):
        gaussian = rng.standard_normal((width, width))  # (D, D)
        q_factor, r_factor = np.linalg.qr(gaussian)
        # The signs QR leaves on R's diagonal bias Q. Flipping the columns of Q
        # by those signs makes it uniformly (Haar) distributed.
        q_factor = q_factor * np.sign(np.diag(r_factor))
        blocks.append(q_factor.T)  # rows orthonormal, each uniform on the sphere
    directions = np.concatenate(blocks, axis=0)[:num_features]  # (F, D)

    # 2. Norms: a chi_D draw per row, so each row has the law of a N(0, I_D) vector.
    norms = np.linalg.norm(rng.standard_normal((num_features, width)), axis=1)  # (F,)
    return (directions * norms[:, None]).astype(dtype)  # (F, D)


def check_features(features, width, dtype):
    """Check that features is a finite (F, D) float matrix for head width D; return it as dtype."""
    check_float_array("features", features, min_ndim=2)
    if features.ndim != 2 or features.shape[1] != width or features.shape[0] < 1:
        raise ValueError(
            f"features has shape {features.shape}; expected (F, {width}) with F >= 1 "
            f"random feature rows matching the head width D={width}"
        )
    return features.astype(dtype, copy=False)


# --- feature maps ---------------------------------------------------------------


def softmax_kernel_features_forward(x, features, *, eps=1e-6, stabiliser="row", valid=None):
    """Positive random features phi(x) = F^-1/2 (exp(W x~ - |x~|^2 / 2 - c) + eps).

    Inputs:
    - x: queries or keys (..., L, D)
    - features: W (F, D)
    - eps: eps >= 0 added to every feature
    - stabiliser: "row" (one c per row: queries), "shared" (one c per slice
      over all valid rows and features: keys), or an array broadcastable to
      (..., L, 1) to use as c as given (a frozen stabiliser, no gradient)
    - valid: optional bool (..., L), False on padded rows; their features are 0

    Returns (phi, cache) with phi (..., L, F). cache["stabiliser"] is the c
    used; cache["argmax"] locates the entry c was taken from (None when c was given).
    """
    scale = x.shape[-1] ** -0.25
    norm = features.shape[0] ** -0.5

    # 1. x~ = x D^-1/4, so that q~.k~ = q.k / sqrt(D).
    # 2. Exponents u = W x~ - |x~|^2 / 2.
    x_scaled, exponents = softmax_exponents(x, features)  # (..., L, D), (..., L, F)

    # 3. Stabiliser c: the maximum exponent of each row, or of all valid rows.
    # NOTE: c is the max of the whole exponent u. Google's JAX FAVOR+
    # (google-research performer/fast_attention/jax/fast_attention.py) takes the
    # max of W x~ alone. Both cancel when eps = 0. This one also keeps the
    # largest feature at exactly F^-1/2 (1 + eps), so large norms cannot underflow
    # every feature of a row to zero.
    mode = stabiliser if isinstance(stabiliser, str) else None  # None: c given, frozen
    stabiliser, argmax = compute_stabiliser(exponents, stabiliser, valid)  # (..., L or 1, 1) each

    # 4. phi = F^-1/2 (exp(u - c) + eps), zero on padded rows, computed in the
    # buffer of u, which the backward does not need.
    exponents -= stabiliser
    phi = np.exp(exponents, out=exponents)  # (..., L, F)
    phi += x.dtype.type(eps)
    phi *= x.dtype.type(norm)
    if valid is not None:
        phi *= valid[..., None]

    cache = {
        "x_scaled": x_scaled, "features": features, "phi": phi, "eps": eps,
        "valid": valid, "stabiliser": stabiliser, "argmax": argmax,
        "stabiliser_mode": mode, "scale": scale, "norm": norm,
    }
    return phi, cache


def softmax_exponents(x, features):
    """Return (x~, u) for x (..., L, D): x~ = x D^-1/4 and u = W x~ - |x~|^2 / 2 (..., L, F)."""
    x_scaled = x * x.dtype.type(x.shape[-1] ** -0.25)  # (..., L, D)
    exponents = x_scaled @ features.T  # (..., L, D) @ (D, F) -> (..., L, F)
    exponents -= 0.5 * np.sum(x_scaled * x_scaled, axis=-1, keepdims=True)
    return x_scaled, exponents


def compute_stabiliser(exponents, mode, valid):
    """Return (c, argmax) for exponents (..., L, F): c per row, shared, or given.

    c is the maximum over its set: one row for "row" (c (..., L, 1)), every
    valid entry of the slice for "shared" (c (..., 1, 1)). In "row" mode a
    padded row keeps its own maximum, so exp cannot overflow before the row
    is zeroed.

    argmax has the shape of c and contains the index of the first maximum
    within the set: a feature index for "row", a flat index l * F + j into the
    slice for "shared". A given c is returned as it is, with argmax None.
    """
    if isinstance(mode, str):
        check_choice("stabiliser", mode, STABILISER_MODES)
    else:
        fixed = np.asarray(mode, dtype=exponents.dtype)
        if not np.all(np.isfinite(fixed)):
            raise ValueError("stabiliser contains non-finite values; expected finite constants")
        return fixed, None
    if mode == "shared" and valid is not None:
        exponents = np.where(valid[..., None], exponents, -np.inf)  # (..., L, F)
    groups = stabiliser_groups(exponents, mode)  # (..., L, F) or (..., 1, L F)
    argmax = np.argmax(groups, axis=-1)[..., None]  # (..., L or 1, 1), the first maximum
    stabiliser = np.take_along_axis(groups, argmax, axis=-1)  # (..., L or 1, 1)
    # A slice without valid keys has all features zeroed; any finite c will do.
    stabiliser = np.where(np.isfinite(stabiliser), stabiliser, 0.0).astype(exponents.dtype)
    return stabiliser, argmax


def stabiliser_groups(entries, mode):
    """View entries (..., L, F) as the sets stabilisers are taken over: (..., L, F) or (..., 1, L F)."""
    if mode == "row":
        return entries
    return entries.reshape(entries.shape[:-2] + (1, -1))


def softmax_kernel_features_backward(dphi, cache):
    """Backward of softmax_kernel_features_forward, with c differentiated as a maximum.

    The cache contains x~, W, phi, eps, the valid rows, the stabiliser's argmax
    and the constants. With phi^ = phi - F^-1/2 eps = F^-1/2 exp(u - c) on
    valid rows:
        du = dphi * phi^,   dc = -sum over c's set of dphi * phi^,
        du[argmax] += dc,   dx~ = du W - x~ sum_j du_j,   dx = D^-1/4 dx~
    c = max of its set of exponents, so dc reaches the maximising entry only
    (the first one at a tie). With eps = 0 the attention output does not depend
    on c, so dc, the derivative of the loss by c, is zero up to round-off.
    With eps > 0 the output depends on c, and leaving dc out would give the
    gradient of a different function. A stabiliser passed in explicitly
    (argmax None) is a constant, so no dc is added.
    Returns dx (..., L, D).
    """
    x_scaled, features, phi = cache["x_scaled"], cache["features"], cache["phi"]
    dtype = phi.dtype.type

    # 4. phi = F^-1/2 (exp(u - c) + eps) on valid rows, 0 on padded rows.
    exp_part = phi - dtype(cache["eps"] * cache["norm"])  # (..., L, F)
    if cache["valid"] is not None:
        exp_part *= cache["valid"][..., None]
    dexponents = dphi * exp_part  # (..., L, F)

    # 3. c = max of u over its set (a row, or the slice's valid entries):
    # u - c gives dc = -sum du over the set, added to du at the argmax.
    argmax = cache["argmax"]
    if argmax is not None:
        groups = stabiliser_groups(dexponents, cache["stabiliser_mode"])  # (..., L, F) or (..., 1, L F)
        dstabiliser = -np.sum(groups, axis=-1, keepdims=True)  # (..., L or 1, 1)
        # Scatter-add into the argmax entry: one entry per set, so no index repeats.
        dstabiliser += np.take_along_axis(groups, argmax, axis=-1)
        np.put_along_axis(groups, argmax, dstabiliser, axis=-1)
        dexponents = groups.reshape(dexponents.shape)  # (..., L, F)

    # 2. u = W x~ - |x~|^2 / 2: x~ feeds both terms (a fork, the gradients add).
    dx_scaled = dexponents @ features  # (..., L, F) @ (F, D) -> (..., L, D)
    dx_scaled -= x_scaled * np.sum(dexponents, axis=-1, keepdims=True)

    # 1. x~ = x D^-1/4
    return dx_scaled * dtype(cache["scale"])


def relu_kernel_features_forward(x, features, *, eps=1e-3, valid=None):
    """Generalized ReLU kernel features phi(x) = F^-1/2 (ReLU(W x~) + eps).

    Inputs as for softmax_kernel_features_forward (no stabiliser: ReLU cannot
    overflow). Returns (phi, cache) with phi (..., L, F).
    """
    width = x.shape[-1]
    scale = width**-0.25
    norm = features.shape[0] ** -0.5

    # 1. x~ = x D^-1/4
    x_scaled = x * x.dtype.type(scale)  # (..., L, D)

    # 2. Projections a = W x~.
    projections = x_scaled @ features.T  # (..., L, D) @ (D, F) -> (..., L, F)

    # 3. phi = F^-1/2 (ReLU(a) + eps), zero on padded rows.
    phi = np.maximum(projections, 0.0)  # (..., L, F)
    phi += x.dtype.type(eps)
    phi *= x.dtype.type(norm)
    if valid is not None:
        phi *= valid[..., None]

    cache = {
        "projections": projections, "features": features, "valid": valid,
        "scale": scale, "norm": norm, "phi": phi, "stabiliser": None,
    }
    return phi, cache


def relu_kernel_features_backward(dphi, cache):
    """Backward of relu_kernel_features_forward; returns dx (..., L, D).

    The cache contains the projections a = W x~, W, the valid rows and the
    constants. ReLU's derivative is taken as 0 at a = 0.
    """
    dtype = dphi.dtype.type

    # 3. phi = F^-1/2 (ReLU(a) + eps), zero on padded rows.
    dprojections = dphi * (cache["projections"] > 0) * dtype(cache["norm"])  # (..., L, F)
    if cache["valid"] is not None:
        dprojections *= cache["valid"][..., None]

    # 2. a = W x~
    dx_scaled = dprojections @ cache["features"]  # (..., L, F) @ (F, D) -> (..., L, D)

    # 1. x~ = x D^-1/4
    return dx_scaled * dtype(cache["scale"])


FEATURE_MAPS = {
    "softmax": (softmax_kernel_features_forward, softmax_kernel_features_backward),
    "relu": (relu_kernel_features_forward, relu_kernel_features_backward),
}


# --- linear attention on features -------------------------------------------------


def linear_attention_forward(query_features, key_features, v, *, causal=False, chunk_size=64):
    """Normalised linear attention out = D^-1 (Q' (K'^T V)) on given features.

    Inputs:
    - query_features: Q' = phi(Q) (..., N, F), non-negative
    - key_features: K' = phi(K) (..., M, F), zero rows for padded keys
    - v: values (..., M, Dv)
    - causal: query i attends key j only when j <= i + (M - N), through prefix sums
    - chunk_size: C, positions per chunk of the causal scan

    A query whose normaliser is 0 (no visible key) gets a zero output row and
    zero gradients. Returns (out, cache) with out (..., N, Dv).
    """
    if causal:
        numerator, denominator, sums_cache = causal_sums_forward(
            query_features, key_features, v, chunk_size
        )
    else:
        # 1. Key summaries, linear in M: K'^T V and K'^T 1.
        kv = np.swapaxes(key_features, -1, -2) @ v  # (..., F, M) @ (..., M, Dv) -> (..., F, Dv)
        key_sum = np.sum(key_features, axis=-2)  # (..., F)

        # 2. Numerator Q' (K'^T V) and denominator Q' (K'^T 1) of every query.
        numerator = query_features @ kv  # (..., N, F) @ (..., F, Dv) -> (..., N, Dv)
        denominator = query_features @ key_sum[..., None]  # (..., N, F) @ (..., F, 1) -> (..., N, 1)
        sums_cache = (query_features, key_features, v, kv, key_sum)

    # 3. Row normalisation. An empty row (denominator 0) stays zero.
    out, inverse = row_normalise(numerator, denominator)  # (..., N, Dv), (..., N, 1)

    cache = {"causal": causal, "sums": sums_cache, "inverse": inverse, "out": out}
    return out, cache


def linear_attention_backward(dout, cache):
    """Backward of linear_attention_forward; returns (dquery_features, dkey_features, dv).

    The cache contains 1 / denominator, out, and the inputs and key sums of
    the forward. The causal path keeps only its inputs and recomputes the
    prefix sums in its backward scans.
    """
    inverse, out = cache["inverse"], cache["out"]

    # 3. out = numerator / denominator
    dnumerator = dout * inverse  # (..., N, Dv)
    ddenominator = -np.sum(dout * out, axis=-1, keepdims=True) * inverse  # (..., N, 1)

    if cache["causal"]:
        return causal_sums_backward(dnumerator, ddenominator, cache["sums"])

    query_features, key_features, v, kv, key_sum = cache["sums"]

    # 2. numerator = Q' kv, denominator = Q' key_sum: Q' feeds both (a fork).
    dquery_features = dnumerator @ np.swapaxes(kv, -1, -2)  # (..., N, Dv) @ (..., Dv, F) -> (..., N, F)
    dquery_features += ddenominator * key_sum[..., None, :]
    dkv = np.swapaxes(query_features, -1, -2) @ dnumerator  # (..., F, N) @ (..., N, Dv) -> (..., F, Dv)
    dkey_sum = np.swapaxes(query_features, -1, -2) @ ddenominator  # (..., F, N) @ (..., N, 1) -> (..., F, 1)

    # 1. kv = K'^T V, key_sum = K'^T 1: K' feeds both (a fork).
    dkey_features = v @ np.swapaxes(dkv, -1, -2)  # (..., M, Dv) @ (..., Dv, F) -> (..., M, F)
    dkey_features += np.swapaxes(dkey_sum, -1, -2)
    dv = key_features @ dkv  # (..., M, F) @ (..., F, Dv) -> (..., M, Dv)
    return dquery_features, dkey_features, dv


def causal_sums_forward(query_features, key_features, v, chunk_size):
    """Causal numerator and denominator by a scan over chunks of C key positions.

    Each query i sits at key position i + (M - N). The scan keeps the running
    prefix sums of the keys before the current chunk,

        S = sum_s K'_s^T V_s  (F, Dv),   z = sum_s K'_s  (F,),

    and for the chunk's rows t (queries) and s (keys), with A_c = tril(Q'_c K'_c^T):

        numerator_c = A_c V_c + Q'_c S,   denominator_c = A_c 1 + Q'_c z
        S += K'_c^T V_c,                  z += K'_c^T 1

    C = 1 is the per-token prefix sum. Only S, z and one C x C block are held
    at a time. Returns (numerator (..., N, Dv), denominator (..., N, 1), cache).
    """
    n_queries, n_keys = query_features.shape[-2], key_features.shape[-2]
    shift = n_keys - n_queries
    frame_queries = frame_rows(query_features, n_keys, shift)  # (..., M, F)
    state, key_sum = empty_sums(key_features.shape[-1], v)
    numerator, denominator = scan_forward(frame_queries, key_features, v, state, key_sum, chunk_size)
    numerator = unframe_rows(numerator, n_queries, shift)  # (..., N, Dv)
    denominator = unframe_rows(denominator, n_queries, shift)  # (..., N, 1)
    cache = (frame_queries, key_features, v, chunk_size, shift)
    return numerator, denominator, cache


def causal_sums_backward(dnumerator, ddenominator, cache):
    """Backward of causal_sums_forward. Returns (dquery_features, dkey_features, dv).

    Two scans with the chunk block recomputed: scan_backward_queries rebuilds
    the prefix sums that the queries read, and scan_backward_keys carries the
    suffix sums of what later queries sent back (see both for the equations).
    """
    frame_queries, key_features, v, chunk_size, shift = cache
    n_keys, n_queries = key_features.shape[-2], dnumerator.shape[-2]
    dnumerator = frame_rows(dnumerator, n_keys, shift)  # (..., M, Dv)
    ddenominator = frame_rows(ddenominator, n_keys, shift)  # (..., M, 1)
    state, key_sum = empty_sums(key_features.shape[-1], v)
    dframe_queries = scan_backward_queries(
        frame_queries, key_features, v, dnumerator, ddenominator, state, key_sum, chunk_size
    )  # (..., M, F)
    suffix_state, suffix_sum = empty_sums(key_features.shape[-1], v)
    dkey_features, dv = scan_backward_keys(
        frame_queries, key_features, v, dnumerator, ddenominator, suffix_state, suffix_sum, chunk_size
    )  # (..., M, F), (..., M, Dv)
    return unframe_rows(dframe_queries, n_queries, shift), dkey_features, dv


def empty_sums(num_features, v):
    """Return zero running sums (S (..., F, Dv), z (..., F, 1)) for a scan over F features and values v."""
    batch_shape = v.shape[:-2]
    state = np.zeros(batch_shape + (num_features, v.shape[-1]), dtype=v.dtype)  # S: (..., F, Dv)
    key_sum = np.zeros(batch_shape + (num_features, 1), dtype=v.dtype)  # z: (..., F, 1)
    return state, key_sum


def causal_tril(chunk_size):
    """Return the (C, C) lower-triangular mask of one chunk: key s <= query position t."""
    return np.tril(np.ones((chunk_size, chunk_size), dtype=bool))


def scan_forward(frame_queries, key_features, v, state, key_sum, chunk_size):
    """Run the causal scan over L positions in chunks of C, from the prefix sums S and z.

    frame_queries (..., L, F) has the query features at their key positions
    (zero rows where no query sits). state S (..., F, Dv) and key_sum z (..., F, 1)
    hold the keys before these positions and are advanced in place past them.
    Returns (numerator (..., L, Dv), denominator (..., L, 1)).
    """
    n_positions = key_features.shape[-2]
    tril = causal_tril(chunk_size)
    numerator = np.empty(v.shape[:-2] + (n_positions, v.shape[-1]), dtype=v.dtype)  # (..., L, Dv)
    denominator = np.empty(v.shape[:-2] + (n_positions, 1), dtype=v.dtype)  # (..., L, 1)
    for start in range(0, n_positions, chunk_size):
        rows = slice(start, min(start + chunk_size, n_positions))
        size = rows.stop - rows.start
        chunk_queries = frame_queries[..., rows, :]  # (..., C, F)
        chunk_keys_t = np.swapaxes(key_features[..., rows, :], -1, -2)  # (..., F, C)
        chunk_values = v[..., rows, :]  # (..., C, Dv)

        # 1. Inside the chunk: A_c = tril(Q'_c K'_c^T), key s <= query position t.
        local = chunk_queries @ chunk_keys_t  # (..., C, F) @ (..., F, C) -> (..., C, C)
        local *= tril[:size, :size]

        # 2. numerator = A_c V_c + Q'_c S, denominator = A_c 1 + Q'_c z.
        numerator[..., rows, :] = local @ chunk_values + chunk_queries @ state  # (..., C, Dv)
        denominator[..., rows, :] = np.sum(local, axis=-1, keepdims=True) + chunk_queries @ key_sum  # (..., C, 1)

        # 3. Add the chunk's keys to the prefix sums.
        state += chunk_keys_t @ chunk_values  # (..., F, C) @ (..., C, Dv) -> (..., F, Dv)
        key_sum += np.sum(chunk_keys_t, axis=-1, keepdims=True)
    return numerator, denominator


def chunk_gradients(frame_queries, key_features, v, dnumerator, ddenominator, rows, tril):
    """Return the slices of one chunk and dA_c = tril(dnumerator_c V_c^T + ddenominator_c 1^T)."""
    size = rows.stop - rows.start
    chunk_queries = frame_queries[..., rows, :]  # (..., C, F)
    chunk_keys = key_features[..., rows, :]  # (..., C, F)
    chunk_values = v[..., rows, :]  # (..., C, Dv)
    dchunk_numerator = dnumerator[..., rows, :]  # (..., C, Dv)
    dchunk_denominator = ddenominator[..., rows, :]  # (..., C, 1)
    # 2. numerator = A_c V_c + ..., denominator = A_c 1 + ...: A_c feeds both (a fork).
    dlocal = dchunk_numerator @ np.swapaxes(chunk_values, -1, -2)  # (..., C, Dv) @ (..., Dv, C) -> (..., C, C)
    dlocal += dchunk_denominator  # (..., C, 1) broadcast over the keys of the chunk
    # 1. A_c = tril(Q'_c K'_c^T)
    dlocal *= tril[:size, :size]
    return chunk_queries, chunk_keys, chunk_values, dchunk_numerator, dchunk_denominator, dlocal


def scan_backward_queries(frame_queries, key_features, v, dnumerator, ddenominator, state, key_sum, chunk_size):
    """Compute the framed query features' gradient over L positions: the backward's forward scan.

    The queries' gradients read the prefix sums S and z, which this scan
    rebuilds (advancing state and key_sum in place, as scan_forward does):

        dQ'_c = dA_c K'_c + dnumerator_c S^T + ddenominator_c z^T,
        dA_c  = tril(dnumerator_c V_c^T + ddenominator_c 1^T)

    Returns dframe_queries (..., L, F).
    """
    n_positions = key_features.shape[-2]
    tril = causal_tril(chunk_size)
    dframe_queries = np.empty_like(frame_queries)  # (..., L, F)
    for start in range(0, n_positions, chunk_size):
        rows = slice(start, min(start + chunk_size, n_positions))
        _, chunk_keys, chunk_values, dchunk_numerator, dchunk_denominator, dlocal = chunk_gradients(
            frame_queries, key_features, v, dnumerator, ddenominator, rows, tril
        )
        # 2. numerator = ... + Q'_c S, denominator = ... + Q'_c z
        dchunk_queries = dchunk_numerator @ np.swapaxes(state, -1, -2)  # (..., C, Dv) @ (..., Dv, F) -> (..., C, F)
        dchunk_queries += dchunk_denominator @ np.swapaxes(key_sum, -1, -2)  # (..., C, 1) @ (..., 1, F)
        # 1. A_c = tril(Q'_c K'_c^T)
        dchunk_queries += dlocal @ chunk_keys  # (..., C, C) @ (..., C, F) -> (..., C, F)
        dframe_queries[..., rows, :] = dchunk_queries
        # 3. S += K'_c^T V_c, z += K'_c^T 1 (rebuilt for the next chunk)
        state += np.swapaxes(chunk_keys, -1, -2) @ chunk_values
        key_sum += np.sum(chunk_keys, axis=-2)[..., None]
    return dframe_queries


def scan_backward_keys(
    frame_queries, key_features, v, dnumerator, ddenominator, suffix_state, suffix_sum, chunk_size
):
    """Compute the key features' and values' gradients over L positions: the backward's reverse scan.

    Keys and values receive the suffix sums of what later queries sent back,
    G = sum_{later} Q'^T dnumerator (..., F, Dv) and g = sum_{later} Q'^T ddenominator
    (..., F, 1), which suffix_state and suffix_sum hold for the positions after
    these and which are advanced in place to include them:

        dK'_c = dA_c^T Q'_c + V_c G^T + g^T,   dV_c = A_c^T dnumerator_c + K'_c G

    Returns (dkey_features (..., L, F), dv (..., L, Dv)).
    """
    n_positions = key_features.shape[-2]
    tril = causal_tril(chunk_size)
    dkey_features = np.empty_like(key_features)  # (..., L, F)
    dv = np.empty_like(v)  # (..., L, Dv)
    for start in reversed(range(0, n_positions, chunk_size)):
        rows = slice(start, min(start + chunk_size, n_positions))
        chunk_queries, chunk_keys, chunk_values, dchunk_numerator, dchunk_denominator, dlocal = chunk_gradients(
            frame_queries, key_features, v, dnumerator, ddenominator, rows, tril
        )
        # 3. S += K'_c^T V_c, z += K'_c^T 1: every later chunk read this chunk's keys.
        dchunk_keys = chunk_values @ np.swapaxes(suffix_state, -1, -2)  # (..., C, Dv) @ (..., Dv, F) -> (..., C, F)
        dchunk_keys += np.swapaxes(suffix_sum, -1, -2)
        dchunk_values = chunk_keys @ suffix_state  # (..., C, F) @ (..., F, Dv) -> (..., C, Dv)
        # 1. A_c = tril(Q'_c K'_c^T) and 2. numerator = A_c V_c + ...
        local = chunk_queries @ np.swapaxes(chunk_keys, -1, -2)  # (..., C, F) @ (..., F, C) -> (..., C, C)
        local *= tril[:local.shape[-2], :local.shape[-1]]
        dchunk_keys += np.swapaxes(dlocal, -1, -2) @ chunk_queries  # (..., C, C) @ (..., C, F) -> (..., C, F)
        dchunk_values += np.swapaxes(local, -1, -2) @ dchunk_numerator  # (..., C, C) @ (..., C, Dv)
        dkey_features[..., rows, :] = dchunk_keys
        dv[..., rows, :] = dchunk_values
        # 2. The queries of this chunk read S and z, which held the keys of earlier chunks.
        suffix_state += np.swapaxes(chunk_queries, -1, -2) @ dchunk_numerator  # (..., F, C) @ (..., C, Dv)
        suffix_sum += np.swapaxes(chunk_queries, -1, -2) @ dchunk_denominator  # (..., F, C) @ (..., C, 1)
    return dkey_features, dv


def frame_rows(query_rows, n_keys, shift):
    """Place query rows (..., N, X) at their key positions i + shift in a frame (..., M, X).

    Frame rows without a query are zero, and queries before the first key
    (i + shift < 0) are dropped, because they see no key. With N == M the
    frame is the input itself.
    """
    if shift == 0:
        return query_rows
    n_queries = query_rows.shape[-2]
    out = np.zeros(query_rows.shape[:-2] + (n_keys, query_rows.shape[-1]), dtype=query_rows.dtype)
    first = max(0, -shift)
    out[..., first + shift:n_queries + shift, :] = query_rows[..., first:, :]
    return out


def unframe_rows(frame, n_queries, shift):
    """Return the N query rows of a frame (..., M, X), zeros for queries outside it; frame_rows undone."""
    if shift == 0:
        return frame
    out = np.zeros(frame.shape[:-2] + (n_queries, frame.shape[-1]), dtype=frame.dtype)
    first = max(0, -shift)
    out[..., first:, :] = frame[..., first + shift:n_queries + shift, :]
    return out


# --- FAVOR+ in row blocks: shared pieces and the bidirectional form ---------------

BLOCK_ENTRIES = 2**18  # feature entries per block: 1 MiB in float32, which stays in a 2 MiB L2 cache


def row_blocks(length, block_rows):
    """Split the positions 0..length-1 into consecutive slices of at most block_rows."""
    return [slice(start, min(start + block_rows, length)) for start in range(0, length, block_rows)]


def default_block_rows(batch_shape, num_features):
    """Return the rows per block for which a block of features (..., rows, F) has about BLOCK_ENTRIES entries."""
    return max(1, BLOCK_ENTRIES // (int(np.prod(batch_shape)) * num_features))


def feature_map(kernel, x, features, eps, stabiliser, valid):
    """Return (phi, cache) for the rows x (..., L, D) from the kernel's feature map.

    stabiliser ("row", "shared" or a given c) applies to the softmax kernel;
    the relu kernel has none.
    """
    if kernel == "softmax":
        return softmax_kernel_features_forward(x, features, eps=eps, stabiliser=stabiliser, valid=valid)
    return relu_kernel_features_forward(x, features, eps=eps, valid=valid)


def shared_key_stabiliser(k, features, key_valid, blocks):
    """Compute the shared key stabiliser c, the maximum of u over a slice's valid entries, block by block.

    Returns (c (..., 1, 1), argmax (..., 1, 1)), equal to what
    compute_stabiliser(u, "shared", key_valid) returns for the whole u (..., M, F):
    argmax is the flat index l F + j of the first maximum, and a slice
    without valid keys gets c = 0.
    """
    num_features = features.shape[0]
    best = best_index = None
    for rows in blocks:
        _, exponents = softmax_exponents(k[..., rows, :], features)  # (..., C, F)
        if key_valid is not None:
            exponents = np.where(key_valid[..., rows, None], exponents, -np.inf)
        flat = exponents.reshape(exponents.shape[:-2] + (1, -1))  # (..., 1, C F)
        index = np.argmax(flat, axis=-1)[..., None]  # (..., 1, 1), first maximum in the block
        value = np.take_along_axis(flat, index, axis=-1)  # (..., 1, 1)
        index += rows.start * num_features  # flat index into the slice's (M F) entries
        if best is None:
            best, best_index = value, index
        else:
            # Strictly greater: at a tie the earlier block keeps the maximum, as a
            # row-major argmax over the whole slice would.
            better = value > best
            best = np.where(better, value, best)
            best_index = np.where(better, index, best_index)
    best = np.where(np.isfinite(best), best, 0.0).astype(k.dtype)
    return best, best_index


def resolve_stabilisers(kernel, stabilisers, k, features, key_valid, key_blocks):
    """Return (query c or None, key c or None, key argmax or None) for a blocked FAVOR+ forward.

    Softmax kernel without given stabilisers: the query c is left to each
    block (None, computed per row), and the shared key c comes from a pass
    over the key blocks, with its argmax for the backward. Given stabilisers
    are returned as they are, with no argmax. The relu kernel has none.
    """
    if kernel != "softmax":
        return None, None, None
    if stabilisers is None:
        key_stabiliser, key_argmax = shared_key_stabiliser(k, features, key_valid, key_blocks)
        return None, key_stabiliser, key_argmax
    query_stabiliser, key_stabiliser = stabilisers
    return query_stabiliser, key_stabiliser, None


def row_normalise(numerator, denominator):
    """Return (numerator / denominator, 1 / denominator). A row with denominator 0 stays zero."""
    inverse = np.zeros_like(denominator)  # (..., N, 1)
    np.divide(1.0, denominator, out=inverse, where=denominator > 0)
    return numerator * inverse, inverse


def bidirectional_favor_forward(q, k, v, features, *, key_valid, kernel, eps, stabilisers, block_rows):
    """Compute bidirectional FAVOR+ with phi(Q) and phi(K) taken block_rows rows at a time.

    The inputs are checked by favor_attention_forward. The key blocks are
    summed into kv = phi(K)^T V and key_sum = phi(K)^T 1; then each query
    block gives its output rows. One block of features stays in cache through
    its elementwise passes (exp, eps, scaling), where whole (N, F) arrays
    would go out to memory and back for each pass, so time stays linear in N.
    No (N, F) array is kept: the backward recomputes the feature blocks, except
    that a single query block or key block is small and kept in the cache.
    Returns (out, cache) with out (..., N, Dv).
    """
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    batch_shape = q.shape[:-2]
    num_features, value_width = features.shape[0], v.shape[-1]
    query_blocks, key_blocks = row_blocks(n_queries, block_rows), row_blocks(n_keys, block_rows)

    # 1. Stabilisers (softmax kernel): computed per query row within each query
    # block, and one shared by all valid keys, found by a first pass over the key
    # blocks. Given stabilisers are used as they are.
    query_stabiliser, key_stabiliser, key_argmax = resolve_stabilisers(
        kernel, stabilisers, k, features, key_valid, key_blocks
    )

    # 2. Key summaries kv = phi(K)^T V and key_sum = phi(K)^T 1, linear in M.
    kv = np.zeros(batch_shape + (num_features, value_width), dtype=v.dtype)  # (..., F, Dv)
    key_sum = np.zeros(batch_shape + (num_features,), dtype=v.dtype)  # (..., F)
    for rows in key_blocks:
        valid = None if key_valid is None else key_valid[..., rows]
        key_features, key_cache = feature_map(
            kernel, k[..., rows, :], features, eps, key_stabiliser, valid
        )  # (..., C, F)
        kv += np.swapaxes(key_features, -1, -2) @ v[..., rows, :]  # (..., F, C) @ (..., C, Dv) -> (..., F, Dv)
        key_sum += np.sum(key_features, axis=-2)
    # A single key block (and below, a single query block) is small: the backward reuses it.
    kept_keys = (key_features, key_cache) if len(key_blocks) == 1 else None

    # 3. Each query block: numerator phi(Q) kv, denominator phi(Q) key_sum, row normalisation.
    out = np.empty(batch_shape + (n_queries, value_width), dtype=v.dtype)  # (..., N, Dv)
    inverse = np.empty(batch_shape + (n_queries, 1), dtype=v.dtype)  # (..., N, 1)
    used_query_stabiliser = np.empty_like(inverse) if kernel == "softmax" else None  # (..., N, 1)
    for rows in query_blocks:
        stabiliser = "row" if query_stabiliser is None else query_stabiliser[..., rows, :]
        query_features, query_cache = feature_map(kernel, q[..., rows, :], features, eps, stabiliser, None)
        numerator = query_features @ kv  # (..., C, F) @ (..., F, Dv) -> (..., C, Dv)
        denominator = query_features @ key_sum[..., None]  # (..., C, F) @ (..., F, 1) -> (..., C, 1)
        out[..., rows, :], inverse[..., rows, :] = row_normalise(numerator, denominator)
        if kernel == "softmax":
            used_query_stabiliser[..., rows, :] = query_cache["stabiliser"]
    kept_queries = (query_features, query_cache) if len(query_blocks) == 1 else None

    cache = {
        "causal": False, "kernel": kernel, "q": q, "k": k, "v": v, "features": features, "eps": eps,
        "key_valid": key_valid, "blocks": (query_blocks, key_blocks), "kv": kv, "key_sum": key_sum,
        "inverse": inverse, "out": out, "query_stabiliser": query_stabiliser,
        "key_argmax": key_argmax, "stabilisers": (used_query_stabiliser, key_stabiliser),
        "kept_queries": kept_queries, "kept_keys": kept_keys,
    }
    return out, cache


def bidirectional_favor_backward(dout, cache):
    """Backward of bidirectional_favor_forward, recomputing the feature blocks (or reusing a single one).

    With numerator = phi(Q) kv, denominator = phi(Q) key_sum and
    out = numerator / denominator:

        dphi(Q) = dnumerator kv^T + ddenominator key_sum^T,
        dkv = phi(Q)^T dnumerator,  dkey_sum = phi(Q)^T ddenominator  (summed over query blocks),
        dphi(K) = V dkv^T + 1 dkey_sum^T,  dV = phi(K) dkv              (per key block).

    Each query row has its own stabiliser, so each query block differentiates
    its own (softmax_kernel_features_backward). The shared key stabiliser
    couples all key blocks: its gradient dc = -sum dphi(K) F^-1/2 exp(u - c)
    over valid entries is summed over the blocks, then added to the exponent
    u_lj at its argmax, which passes dc (w_j - k~_l) D^-1/4 to key l.
    A given stabiliser is a constant and gets none. Returns (dq, dk, dv).
    """
    q, k, v, features = cache["q"], cache["k"], cache["v"], cache["features"]
    kernel, eps, key_valid = cache["kernel"], cache["eps"], cache["key_valid"]
    kv, key_sum, inverse, out = cache["kv"], cache["key_sum"], cache["inverse"], cache["out"]
    query_stabiliser, (_, key_stabiliser) = cache["query_stabiliser"], cache["stabilisers"]
    key_argmax = cache["key_argmax"]
    query_blocks, key_blocks = cache["blocks"]
    _, features_backward = FEATURE_MAPS[kernel]
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)

    # 3. Query blocks: out = numerator / denominator, numerator = phi(Q) kv, denominator = phi(Q) key_sum.
    dkv = np.zeros_like(kv)  # (..., F, Dv)
    dkey_sum = np.zeros_like(key_sum)  # (..., F)
    for rows in query_blocks:
        if cache["kept_queries"] is not None:
            query_features, query_cache = cache["kept_queries"]
        else:
            stabiliser = "row" if query_stabiliser is None else query_stabiliser[..., rows, :]
            query_features, query_cache = feature_map(kernel, q[..., rows, :], features, eps, stabiliser, None)
        block_inverse, block_dout = inverse[..., rows, :], dout[..., rows, :]  # (..., C, 1), (..., C, Dv)
        dnumerator = block_dout * block_inverse  # (..., C, Dv)
        ddenominator = -np.sum(block_dout * out[..., rows, :], axis=-1, keepdims=True) * block_inverse  # (..., C, 1)
        dquery_features = dnumerator @ np.swapaxes(kv, -1, -2)  # (..., C, Dv) @ (..., Dv, F) -> (..., C, F)
        dquery_features += ddenominator * key_sum[..., None, :]
        dq[..., rows, :] = features_backward(dquery_features, query_cache)
        query_features_t = np.swapaxes(query_features, -1, -2)  # (..., F, C)
        dkv += query_features_t @ dnumerator  # (..., F, C) @ (..., C, Dv) -> (..., F, Dv)
        dkey_sum += (query_features_t @ ddenominator)[..., 0]  # (..., F, C) @ (..., C, 1) -> (..., F)

    # 2. Key blocks: kv = phi(K)^T V and key_sum = phi(K)^T 1, phi(K) with c held fixed.
    dstabiliser = np.zeros(k.shape[:-2] + (1, 1), dtype=k.dtype)  # dc: (..., 1, 1)
    for rows in key_blocks:
        valid = None if key_valid is None else key_valid[..., rows]
        if cache["kept_keys"] is not None:
            key_features, key_cache = cache["kept_keys"]
        else:
            key_features, key_cache = feature_map(kernel, k[..., rows, :], features, eps, key_stabiliser, valid)
        dkey_features = v[..., rows, :] @ np.swapaxes(dkv, -1, -2)  # (..., C, Dv) @ (..., Dv, F) -> (..., C, F)
        dkey_features += dkey_sum[..., None, :]
        dk[..., rows, :] = features_backward(dkey_features, key_cache)
        dv[..., rows, :] = key_features @ dkv  # (..., C, F) @ (..., F, Dv) -> (..., C, Dv)
        if key_argmax is not None:
            dstabiliser += key_stabiliser_gradient(dkey_features, key_features, key_cache)

    # 1. c = u_lj at the argmax (l, j).
    if key_argmax is not None:
        add_key_stabiliser_gradient(dk, k, features, key_argmax, dstabiliser)
    return dq, dk, dv


def key_stabiliser_gradient(dkey_features, key_features, key_cache):
    """Return one key block's share of dc = -sum dphi(K) F^-1/2 exp(u - c) over valid entries (..., 1, 1)."""
    dtype = key_features.dtype.type
    exp_part = key_features - dtype(key_cache["eps"] * key_cache["norm"])  # F^-1/2 exp(u - c) on valid rows
    if key_cache["valid"] is not None:
        exp_part *= key_cache["valid"][..., None]
    return -np.sum(dkey_features * exp_part, axis=(-2, -1), keepdims=True)


def add_key_stabiliser_gradient(dk, k, features, key_argmax, dstabiliser):
    """Add the shared key stabiliser's gradient dc (..., 1, 1) to dk (..., M, D) in place.

    c = u_lj at its argmax (l, j), so du_lj += dc, and u_lj = w_j . k~_l - |k~_l|^2 / 2
    passes dc (w_j - k~_l) D^-1/4 to key l.
    """
    dtype = k.dtype.type
    num_features = features.shape[0]
    key_row, feature_row = key_argmax // num_features, key_argmax % num_features  # (..., 1, 1) each
    scale = dtype(k.shape[-1] ** -0.25)
    key_scaled = np.take_along_axis(k, key_row, axis=-2) * scale  # (..., 1, D)
    correction = dstabiliser * (features[feature_row[..., 0]] - key_scaled) * scale  # (..., 1, D)
    np.put_along_axis(dk, key_row, np.take_along_axis(dk, key_row, axis=-2) + correction, axis=-2)


# --- causal FAVOR+ in blocks of positions --------------------------------------------


def block_queries(rows, n_queries, shift):
    """Return (query rows, their places in the block) for the queries at key positions `rows`.

    Query i sits at key position i + shift, so the block of positions
    [p0, p1) contains the queries max(0, p0 - shift) .. min(N, p1 - shift) - 1.
    """
    first = min(max(0, rows.start - shift), n_queries)
    last = max(first, min(n_queries, rows.stop - shift))
    return slice(first, last), slice(first + shift - rows.start, last + shift - rows.start)


def framed_query_features(kernel, q, features, eps, query_stabiliser, rows, query_rows, places):
    """Return (frame (..., L, F), cache) of the query features placed at their key positions in a block.

    Positions without a query are zero rows. query_stabiliser is None (one c
    per row, computed) or the given c (..., N, 1). cache is None when the block
    contains no query.
    """
    frame = np.zeros(q.shape[:-2] + (rows.stop - rows.start, features.shape[0]), dtype=q.dtype)  # (..., L, F)
    if query_rows.stop == query_rows.start:
        return frame, None
    stabiliser = "row" if query_stabiliser is None else query_stabiliser[..., query_rows, :]
    query_features, query_cache = feature_map(kernel, q[..., query_rows, :], features, eps, stabiliser, None)
    frame[..., places, :] = query_features
    return frame, query_cache


def framed_rows(values, rows, query_rows, places):
    """Place the query rows of values (..., N, X) at their key positions in a block frame (..., L, X)."""
    frame = np.zeros(values.shape[:-2] + (rows.stop - rows.start, values.shape[-1]), dtype=values.dtype)
    frame[..., places, :] = values[..., query_rows, :]
    return frame


def causal_favor_forward(q, k, v, features, *, key_valid, kernel, eps, stabilisers, chunk_size, block_rows):
    """Compute causal FAVOR+ with the features taken one block of positions at a time.

    The inputs are checked by favor_attention_forward. A first pass over the
    key blocks finds the shared key stabiliser. Then each block of key
    positions gets its key features and the features of the queries that sit
    there, and the causal scan (scan_forward) runs over it, carrying the
    prefix sums S and z into the next block. No (N, F) array is kept: the
    backward recomputes the blocks, except that a single block is small and
    kept in the cache. Returns (out, cache) with out (..., N, Dv).
    """
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    shift = n_keys - n_queries
    # Whole chunks per block, so the blocks split the scan where its chunks end.
    blocks = row_blocks(n_keys, max(chunk_size, block_rows - block_rows % chunk_size))

    # 1. Stabilisers: per query row, computed with each block's queries, and one
    # shared by all valid keys from a first pass. Given stabilisers are used as they are.
    query_stabiliser, key_stabiliser, key_argmax = resolve_stabilisers(
        kernel, stabilisers, k, features, key_valid, blocks
    )

    # 2. The scan, block by block: numerator and denominator of the block's queries.
    state, key_sum = empty_sums(features.shape[0], v)  # S (..., F, Dv), z (..., F, 1)
    out = np.zeros(q.shape[:-1] + (v.shape[-1],), dtype=v.dtype)  # (..., N, Dv); queries before every key stay 0
    inverse = np.zeros(q.shape[:-1] + (1,), dtype=v.dtype)  # (..., N, 1)
    used_query_stabiliser = np.zeros_like(inverse) if kernel == "softmax" else None  # (..., N, 1)
    kept_block = None
    for rows in blocks:
        query_rows, places = block_queries(rows, n_queries, shift)
        frame, query_cache = framed_query_features(
            kernel, q, features, eps, query_stabiliser, rows, query_rows, places
        )  # (..., L, F)
        valid = None if key_valid is None else key_valid[..., rows]
        key_features, key_cache = feature_map(
            kernel, k[..., rows, :], features, eps, key_stabiliser, valid
        )  # (..., L, F)
        if len(blocks) == 1:  # one block is small: the backward reuses it instead of recomputing it
            kept_block = (frame, query_cache, key_features, key_cache)
        numerator, denominator = scan_forward(frame, key_features, v[..., rows, :], state, key_sum, chunk_size)

        # 3. Row normalisation of the block's queries.
        if query_cache is not None:
            out[..., query_rows, :], inverse[..., query_rows, :] = row_normalise(
                numerator[..., places, :], denominator[..., places, :]
            )
            if kernel == "softmax":
                used_query_stabiliser[..., query_rows, :] = query_cache["stabiliser"]

    cache = {
        "causal": True, "kernel": kernel, "q": q, "k": k, "v": v, "features": features, "eps": eps,
        "key_valid": key_valid, "blocks": blocks, "chunk_size": chunk_size, "inverse": inverse, "out": out,
        "query_stabiliser": query_stabiliser, "key_argmax": key_argmax,
        "stabilisers": (used_query_stabiliser, key_stabiliser), "kept_block": kept_block,
    }
    return out, cache


def causal_favor_backward(dout, cache):
    """Backward of causal_favor_forward, recomputing the feature blocks (or reusing a single one).

    With dnumerator = dout / denominator and ddenominator = -rowsum(dout * out) /
    denominator, a forward pass over the blocks rebuilds the prefix sums and
    gives the query features' gradients (scan_backward_queries), and a reverse
    pass carries the suffix sums and gives the key features' and values'
    gradients (scan_backward_keys). The feature maps' backward then gives dq
    and dk, with the shared key stabiliser's gradient summed over the blocks
    and added at its argmax, as in bidirectional_favor_backward.
    Returns (dq, dk, dv).
    """
    q, k, v, features = cache["q"], cache["k"], cache["v"], cache["features"]
    kernel, eps, key_valid, chunk_size = cache["kernel"], cache["eps"], cache["key_valid"], cache["chunk_size"]
    inverse, out, blocks = cache["inverse"], cache["out"], cache["blocks"]
    query_stabiliser, (_, key_stabiliser) = cache["query_stabiliser"], cache["stabilisers"]
    key_argmax = cache["key_argmax"]
    _, features_backward = FEATURE_MAPS[kernel]
    n_queries, shift = q.shape[-2], k.shape[-2] - q.shape[-2]

    # 3. out = numerator / denominator (zero rows, with inverse 0, send nothing back).
    dnumerator = dout * inverse  # (..., N, Dv)
    ddenominator = -np.sum(dout * out, axis=-1, keepdims=True) * inverse  # (..., N, 1)

    def block_inputs(rows):
        query_rows, places = block_queries(rows, n_queries, shift)
        if cache["kept_block"] is not None:
            frame, query_cache, key_features, key_cache = cache["kept_block"]
        else:
            frame, query_cache = framed_query_features(
                kernel, q, features, eps, query_stabiliser, rows, query_rows, places
            )
            valid = None if key_valid is None else key_valid[..., rows]
            key_features, key_cache = feature_map(kernel, k[..., rows, :], features, eps, key_stabiliser, valid)
        dframe_numerator = framed_rows(dnumerator, rows, query_rows, places)  # (..., L, Dv)
        dframe_denominator = framed_rows(ddenominator, rows, query_rows, places)  # (..., L, 1)
        return query_rows, places, frame, query_cache, key_features, key_cache, dframe_numerator, dframe_denominator

    # 2. Forward pass: the queries read the prefix sums S and z.
    dq = np.zeros_like(q)  # queries before every key get no gradient
    state, key_sum = empty_sums(features.shape[0], v)
    for rows in blocks:
        inputs = block_inputs(rows)
        query_rows, places, frame, query_cache, key_features, _, dframe_numerator, dframe_denominator = inputs
        dframe = scan_backward_queries(
            frame, key_features, v[..., rows, :], dframe_numerator, dframe_denominator, state, key_sum, chunk_size
        )  # (..., L, F)
        if query_cache is not None:
            dq[..., query_rows, :] = features_backward(dframe[..., places, :], query_cache)

    # Reverse pass: keys and values receive what later queries sent back.
    dk, dv = np.empty_like(k), np.empty_like(v)
    suffix_state, suffix_sum = empty_sums(features.shape[0], v)
    dstabiliser = np.zeros(k.shape[:-2] + (1, 1), dtype=k.dtype)  # dc: (..., 1, 1)
    for rows in reversed(blocks):
        _, _, frame, _, key_features, key_cache, dframe_numerator, dframe_denominator = block_inputs(rows)
        dkey_features, dv[..., rows, :] = scan_backward_keys(
            frame, key_features, v[..., rows, :], dframe_numerator, dframe_denominator, suffix_state, suffix_sum,
            chunk_size,
        )  # (..., L, F), (..., L, Dv)
        dk[..., rows, :] = features_backward(dkey_features, key_cache)
        if key_argmax is not None:
            dstabiliser += key_stabiliser_gradient(dkey_features, key_features, key_cache)

    # 1. The shared key stabiliser c = u_lj at its argmax (l, j).
    if key_argmax is not None:
        add_key_stabiliser_gradient(dk, k, features, key_argmax, dstabiliser)
    return dq, dk, dv


# --- FAVOR+ attention -------------------------------------------------------------


def favor_attention_forward(
    q,
    k,
    v,
    features,
    *,
    causal=False,
    key_valid=None,
    kernel="softmax",
    eps=None,
    stabilisers=None,
    chunk_size=64,
    block_rows=None,
):
    """FAVOR+ attention D^-1 (phi(Q) (phi(K)^T V)), bidirectional or causal.

    Inputs:
    - q: queries (..., N, D); k: keys (..., M, D); v: values (..., M, Dv)
    - features: the random feature matrix W (F, D), e.g. from draw_features
    - causal: query i attends key j only when j <= i + (M - N)
    - key_valid: optional bool (..., M), False on padded keys
    - kernel: "softmax" (positive random features) or "relu" (generalized kernel)
    - eps: constant added to every feature; 1e-6 for softmax, 1e-3 for relu by default
    - stabilisers: optional (query c (..., N, 1), key c (..., 1, 1)) to use
      instead of computing them, e.g. cache["stabilisers"] of an earlier call.
      Given stabilisers are constants, so no gradient flows through them.
    - chunk_size: C, positions per chunk of the causal scan
    - block_rows: rows of q and of k whose features the bidirectional path
      computes at once; by default a block has about 2^18 feature entries

    Returns (out, cache) with out (..., N, Dv). cache["stabilisers"] contains the
    stabilisers used ((None, None) for the relu kernel).
    """
    features, eps, key_valid = check_favor_inputs(q, k, v, features, kernel, eps, key_valid)
    check_int("chunk_size", chunk_size, minimum=1)
    if block_rows is None:
        block_rows = default_block_rows(q.shape[:-2], features.shape[0])
    check_int("block_rows", block_rows, minimum=1)
    if stabilisers is not None:
        stabilisers = check_given_stabilisers(stabilisers, kernel, q.shape, k.shape, q.dtype)
    if not causal:
        return bidirectional_favor_forward(
            q, k, v, features, key_valid=key_valid, kernel=kernel, eps=eps, stabilisers=stabilisers,
            block_rows=block_rows,
        )

    return causal_favor_forward(
        q, k, v, features, key_valid=key_valid, kernel=kernel, eps=eps, stabilisers=stabilisers,
        chunk_size=chunk_size, block_rows=block_rows,
    )


def favor_attention_backward(dout, cache):
    """Backward of favor_attention_forward with the features held fixed.

    The cache contains the inputs, the stabilisers and the blocks; the
    features are recomputed block by block (see bidirectional_favor_backward
    and causal_favor_backward). Stabilisers the forward computed are
    differentiated as maxima (see softmax_kernel_features_backward);
    stabilisers passed in are constants. Returns (dq, dk, dv).
    """
    check_upstream("dout", dout, cache["out"].shape)
    if cache["causal"]:
        return causal_favor_backward(dout, cache)
    return bidirectional_favor_backward(dout, cache)


def check_favor_inputs(q, k, v, features, kernel, eps, key_valid):
    """Check the inputs FAVOR+ shares with its materialised form; return (features, eps, key_valid).

    features comes back in q's dtype, eps with its kernel's default filled
    in, and key_valid broadcast to (..., M).
    """
    check_attention_inputs(q, k, v)
    features = check_features(features, q.shape[-1], q.dtype)
    check_choice("kernel", kernel, KERNELS)
    eps = DEFAULT_EPS[kernel] if eps is None else eps
    check_real("eps", eps, minimum=0.0)
    if key_valid is not None:
        key_valid = check_key_valid(key_valid, k.shape[:-1])
    return features, eps, key_valid


def check_given_stabilisers(stabilisers, kernel, query_shape, key_shape, dtype):
    """Check given (query c, key c) and return them broadcast to (..., N, 1) and (..., 1, 1)."""
    if kernel != "softmax":
        raise ValueError("stabilisers apply to the softmax kernel only; the relu kernel has none")
    if not isinstance(stabilisers, (tuple, list)) or len(stabilisers) != 2:
        raise ValueError(
            f"stabilisers must be a pair (query c (..., N, 1), key c (..., 1, 1)), got {type(stabilisers).__name__}"
        )
    shapes = (query_shape[:-1] + (1,), key_shape[:-2] + (1, 1))
    checked = []
    for name, stabiliser, shape in zip(("query", "key"), stabilisers, shapes):
        stabiliser = np.asarray(stabiliser, dtype=dtype)
        if not np.all(np.isfinite(stabiliser)):
            raise ValueError(f"the {name} stabiliser contains non-finite values; expected finite constants")
        try:
            checked.append(np.broadcast_to(stabiliser, shape))
        except ValueError:
            raise ValueError(
                f"the {name} stabiliser has shape {stabiliser.shape}; expected a shape broadcastable to {shape}"
            ) from None
    return tuple(checked)


def check_key_valid(key_valid, key_shape):
    """Check a bool key_valid array broadcastable to key_shape (..., M); return it broadcast."""
    if not isinstance(key_valid, np.ndarray) or key_valid.dtype != np.bool_:
        raise TypeError(f"key_valid must be a bool numpy.ndarray (..., M), got {type(key_valid).__name__}")
    try:
        return np.broadcast_to(key_valid, key_shape)
    except ValueError:
        raise ValueError(
            f"key_valid has shape {key_valid.shape}; expected a shape broadcastable to {key_shape} (..., M)"
        ) from None


def approximate_attention_matrix(q, k, features, *, causal=False, key_valid=None, kernel="softmax", eps=None):
    """Materialise the N x M matrix D^-1 phi(Q) phi(K)^T that FAVOR+ applies to V.

    For tests and teaching only: it costs O(N M) memory, which FAVOR+ avoids.
    Causal masking keeps j <= i + (M - N); an empty row stays zero.
    Returns the matrix (..., N, M).
    """
    features, eps, key_valid = check_favor_inputs(q, k, k, features, kernel, eps, key_valid)
    query_features, _ = feature_map(kernel, q, features, eps, "row", None)  # (..., N, F)
    key_features, _ = feature_map(kernel, k, features, eps, "shared", key_valid)  # (..., M, F)
    weights = query_features @ np.swapaxes(key_features, -1, -2)  # (..., N, F) @ (..., F, M) -> (..., N, M)
    if causal:
        n_queries, n_keys = q.shape[-2], k.shape[-2]
        weights *= np.arange(n_keys)[None, :] <= np.arange(n_queries)[:, None] + (n_keys - n_queries)
    matrix, _ = row_normalise(weights, np.sum(weights, axis=-1, keepdims=True))
    return matrix


# --- the method object ----------------------------------------------------------


class PerformerAttention:
    """FAVOR+ attention as an attention method object (features kept between calls).

    The features are drawn from rng when the head width is known: at
    construction when width or features is given, otherwise at the first
    forward. They change only when redraw_features() is called, never inside
    forward or backward. Accepted masks are key-padding masks, which broadcast
    over queries with shape (..., 1, M). A mask that differs between queries
    would need the N x M matrix, so it is rejected.
    """

    name = "performer"

    def __init__(
        self,
        *,
        rng=None,
        num_features=256,
        orthogonal=True,
        kernel="softmax",
        eps=None,
        chunk_size=64,
        width=None,
        features=None,
    ):
        self.rng = np.random.default_rng(0) if rng is None else rng
        check_generator("rng", self.rng)
        check_int("num_features", num_features, minimum=1)
        check_choice("kernel", kernel, KERNELS)
        self.eps = DEFAULT_EPS[kernel] if eps is None else eps
        check_real("eps", self.eps, minimum=0.0)
        check_int("chunk_size", chunk_size, minimum=1)
        self.num_features = num_features
        self.orthogonal = bool(orthogonal)
        self.kernel = kernel
        self.chunk_size = chunk_size
        self.features = None
        if features is not None:
            check_float_array("features", features, min_ndim=2)
            self.features = check_features(features, features.shape[-1], features.dtype)
            self.num_features = features.shape[0]
        elif width is not None:
            self.redraw_features(width)

    def redraw_features(self, width=None):
        """Draw a new feature matrix (F, D) from the kept generator and return it."""
        if width is None:
            if self.features is None:
                raise ValueError("redraw_features() needs width=D before the first forward")
            width = self.features.shape[1]
        self.features = draw_features(self.num_features, width, self.rng, orthogonal=self.orthogonal)
        return self.features

    def forward(self, q, k, v, *, mask=None, causal=False):
        check_attention_inputs(q, k, v)
        if self.features is None:
            self.redraw_features(q.shape[-1])
        key_valid = None
        if mask is not None:
            check_mask(mask, q.shape[:-2] + (q.shape[-2], k.shape[-2]))
            if mask.ndim >= 2 and mask.shape[-2] != 1:
                raise ValueError(
                    f"mask has shape {mask.shape}; performer accepts only key-padding masks that "
                    f"broadcast over queries, shape (..., 1, M), because a per-query mask needs "
                    f"the N x M matrix"
                )
            key_valid = mask[..., 0, :] if mask.ndim >= 2 else mask
        return favor_attention_forward(
            q, k, v, self.features, causal=causal, key_valid=key_valid, kernel=self.kernel,
            eps=self.eps, chunk_size=self.chunk_size,
        )

    def backward(self, dout, cache):
        return favor_attention_backward(dout, cache)

    def keys_seen(self, cache):
        """Return None: every allowed key contributes to every query's output."""
        return None


def make_method(rng=None, **options):
    """Return PerformerAttention(rng=rng, **options); see PerformerAttention for the options."""
    return PerformerAttention(rng=rng, **options)


def gradcheck_cases(rng):
    """Return small float64 gradient-check cases (label, forward, backward, inputs, names).

    The features are drawn once per case and closed over. Chunks and row
    blocks of 3 positions make the causal scan and the bidirectional blocks
    each take more than one step. The stabilisers are
    computed by the forward and differentiated as maxima, so a
    finite-difference step that moves c is matched by the backward. The
    large-norm cases (queries and keys scaled by 4) put most features below
    eps, where the output depends on c the most.
    """
    cases = []
    q = rng.standard_normal((1, 2, 5, 4))  # (B, H, N, D)
    k = rng.standard_normal((1, 2, 7, 4))  # (B, H, M, D)
    v = rng.standard_normal((1, 2, 7, 3))  # (B, H, M, Dv)
    features = draw_features(6, 4, rng)  # (F, D)
    settings = (("softmax", 0.0, 1.0), ("softmax", 1e-3, 1.0), ("softmax", 1e-6, 4.0), ("relu", 1e-3, 1.0))
    for causal in (False, True):
        for kernel, eps, size in settings:

            def forward(q, k, v, causal=causal, kernel=kernel, eps=eps):
                return favor_attention_forward(
                    q, k, v, features, causal=causal, kernel=kernel, eps=eps, chunk_size=3, block_rows=3,
                )

            label = f"{'causal' if causal else 'bidirectional'} {kernel} eps={eps:g}"
            if size != 1.0:
                label += f" |q|, |k| x{size:g}"
            cases.append((label, forward, favor_attention_backward, [q * size, k * size, v], ["q", "k", "v"]))
    return cases


__all__ = [
    "PerformerAttention",
    "approximate_attention_matrix",
    "draw_features",
    "favor_attention_backward",
    "favor_attention_forward",
    "gradcheck_cases",
    "linear_attention_backward",
    "linear_attention_forward",
    "make_method",
    "relu_kernel_features_backward",
    "relu_kernel_features_forward",
    "softmax_kernel_features_backward",
    "softmax_kernel_features_forward",
]
