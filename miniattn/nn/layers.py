"""Layer classes: thin wrappers that own parameters and call the functional pairs.

Letters: B batch, N positions (queries), M keys, V vocabulary size, C model
width, F feed-forward width, H heads, D head width (C = H * D).

Each class follows the convention of ``miniattn.nn.module``:

    y, cache = layer.forward(x, ...)
    dx = layer.backward(dy, cache)     # also adds parameter gradients into layer.grads

Parameters are created in the dtype given to the constructor (float64 by
default, float32 for training speed), and inputs must have the same dtype.
"""

import numpy as np

from ..core.kernels import gather_rows, scatter_add_rows
from ..core.validate import check_choice, check_generator, check_int, check_real
from ..methods import make_method
from ..transformer import (
    DenseAttention,
    attention_probabilities,
    init_mha_params,
    mha_backward,
    mha_forward,
    split_heads,
)
from . import functional as F
from .module import Module, check_dtype, check_input


def glorot_uniform(rng, fan_in, fan_out, dtype):
    """Draw a (fan_in, fan_out) matrix uniformly in +-sqrt(6 / (fan_in + fan_out))."""
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(dtype)


def default_rng(rng):
    """Return rng after checking it, or a generator seeded with 0 when rng is None."""
    if rng is None:
        return np.random.default_rng(0)
    check_generator("rng", rng)
    return rng


# --- Linear ----------------------------------------------------------------------------


class Linear(Module):
    """y = x W + b with W (C_in, C_out) and b (C_out,), Glorot-uniform initialised."""

    def __init__(self, in_width, out_width, *, bias=True, rng=None, dtype=np.float64):
        super().__init__()
        check_int("in_width", in_width, minimum=1)
        check_int("out_width", out_width, minimum=1)
        rng = default_rng(rng)
        self.dtype = check_dtype(dtype)
        self.add_parameter("weight", glorot_uniform(rng, in_width, out_width, self.dtype))
        if bias:
            self.add_parameter("bias", np.zeros(out_width, dtype=self.dtype))

    def forward(self, x):
        """x (..., C_in) -> y (..., C_out). Returns (y, cache)."""
        check_input("x", x, self.dtype, self.params["weight"].shape[0])
        return F.linear_forward(x, self.params["weight"], self.params.get("bias"))

    def backward(self, dy, cache):
        """Return dx (..., C_in); add dW and db into grads."""
        dx, dweight, dbias = F.linear_backward(dy, cache)
        self.grads["weight"] += dweight
        if dbias is not None:
            self.grads["bias"] += dbias
        return dx


# --- Embedding ---------------------------------------------------------------------------


class Embedding(Module):
    """A lookup table: token id t -> row t of weight (V, C).

    The forward is a row gather, so the backward is a scatter-add of the
    upstream rows into the rows of dW: a token that occurs several times in
    the batch accumulates one gradient row per occurrence.
    """

    def __init__(self, vocab_size, width, *, std=None, rng=None, dtype=np.float64):
        super().__init__()
        check_int("vocab_size", vocab_size, minimum=1)
        check_int("width", width, minimum=1)
        rng = default_rng(rng)
        self.dtype = check_dtype(dtype)
        std = 1.0 / np.sqrt(width) if std is None else std
        check_real("std", std, minimum=0.0)
        self.add_parameter("weight", (std * rng.standard_normal((vocab_size, width))).astype(self.dtype))

    @property
    def vocab_size(self):
        return self.params["weight"].shape[0]

    def forward(self, ids):
        """ids (...) of integers in [0, V) -> rows (..., C). Returns (y, cache)."""
        ids = check_token_ids("ids", ids, self.vocab_size)
        weight = self.params["weight"]
        flat_ids = ids.reshape(-1)  # (B*N,)
        y = gather_rows(weight, flat_ids).reshape(ids.shape + (weight.shape[1],))  # (..., C)
        return y, (flat_ids,)

    def backward(self, dy, cache):
        """Scatter-add dy into the rows of dW; return None (ids are not differentiable)."""
        (flat_ids,) = cache
        width = self.params["weight"].shape[1]
        rows = np.ascontiguousarray(dy.reshape(-1, width), dtype=self.dtype)  # (B*N, C)
        # y = weight[ids]: duplicate ids must add up, which plain dW[ids] += rows would not do.
        self.grads["weight"] += scatter_add_rows(rows, flat_ids, self.vocab_size)
        return None


def check_token_ids(name, ids, vocab_size):
    """Check an integer array of token ids in [0, vocab_size); return it as an ndarray."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name} has dtype {ids.dtype}; expected integer token ids")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(
            f"{name} must lie in [0, {vocab_size}) for a vocabulary of {vocab_size} tokens, "
            f"got values from {ids.min()} to {ids.max()}"
        )
    return ids


# --- LayerNorm -----------------------------------------------------------------------------


class LayerNorm(Module):
    """Normalise the last axis, then scale by gamma (ones) and shift by beta (zeros)."""

    def __init__(self, width, *, eps=1e-5, dtype=np.float64):
        super().__init__()
        check_int("width", width, minimum=1)
        check_real("eps", eps, minimum=0.0, open_interval=True)
        self.eps = eps
        self.dtype = check_dtype(dtype)
        self.add_parameter("gamma", np.ones(width, dtype=self.dtype))
        self.add_parameter("beta", np.zeros(width, dtype=self.dtype))

    def forward(self, x):
        """x (..., C) -> y (..., C). Returns (y, cache)."""
        check_input("x", x, self.dtype, self.params["gamma"].shape[0])
        return F.layer_norm_forward(x, self.params["gamma"], self.params["beta"], self.eps)

    def backward(self, dy, cache):
        """Return dx; add dgamma and dbeta into grads."""
        dx, dgamma, dbeta = F.layer_norm_backward(dy, cache)
        self.grads["gamma"] += dgamma
        self.grads["beta"] += dbeta
        return dx


# --- FeedForward -------------------------------------------------------------------------------


class FeedForward(Module):
    """Position-wise FF(x) = act(x W1 + b1) W2 + b2 with act ReLU or GELU."""

    def __init__(self, width, ff_width, *, activation="relu", rng=None, dtype=np.float64):
        super().__init__()
        check_int("width", width, minimum=1)
        check_int("ff_width", ff_width, minimum=1)
        check_choice("activation", activation, tuple(F.ACTIVATIONS))
        rng = default_rng(rng)
        self.activation = activation
        self.dtype = check_dtype(dtype)
        self.add_parameter("W1", glorot_uniform(rng, width, ff_width, self.dtype))
        self.add_parameter("b1", np.zeros(ff_width, dtype=self.dtype))
        self.add_parameter("W2", glorot_uniform(rng, ff_width, width, self.dtype))
        self.add_parameter("b2", np.zeros(width, dtype=self.dtype))

    def forward(self, x):
        """x (..., C) -> y (..., C). Returns (y, cache)."""
        check_input("x", x, self.dtype, self.params["W1"].shape[0])
        p = self.params
        return F.feed_forward_forward(x, p["W1"], p["b1"], p["W2"], p["b2"], self.activation)

    def backward(self, dy, cache):
        """Return dx; add dW1, db1, dW2, db2 into grads."""
        dx, dw1, db1, dw2, db2 = F.feed_forward_backward(dy, cache)
        for name, grad in (("W1", dw1), ("b1", db1), ("W2", dw2), ("b2", db2)):
            self.grads[name] += grad
        return dx


# --- Dropout -----------------------------------------------------------------------------------


class Dropout(Module):
    """Inverted dropout with probability p, drawing its masks from an explicit Generator.

    In evaluation mode (``eval()``) or with p = 0 it passes x through. To replay
    the same masks (for a gradient check), restore the generator's state with
    ``rng.bit_generator.state = saved_state`` before each forward.
    """

    def __init__(self, p, *, rng=None):
        super().__init__()
        check_real("p", p, minimum=0.0, maximum=1.0)
        if p == 1.0:
            raise ValueError("p=1.0 is invalid; expected 0 <= p < 1 (p = 1 would drop every entry)")
        if p > 0:
            if rng is None:
                raise ValueError(f"dropout with p={p} needs rng, a numpy.random.Generator for its masks")
            check_generator("rng", rng)
        self.p = p
        self.rng = rng

    def forward(self, x):
        """Return (y, cache); y = x * mask / (1 - p) in training mode."""
        if not self.training or self.p == 0.0:
            return x, (None,)
        return F.dropout_forward(x, self.p, self.rng)

    def backward(self, dy, cache):
        """Return dx = dy * the scaled mask of the forward."""
        return F.dropout_backward(dy, cache)


# --- MultiHeadAttention ------------------------------------------------------------------------


def resolve_attention(attention, rng, options=None):
    """Return an attention method object from None (dense), a method name, or an object.

    A name is built with ``miniattn.methods.make_method(name, rng=rng, **options)``.
    An object must offer forward(q, k, v, mask=, causal=) and backward(dout, cache).
    """
    options = {} if options is None else dict(options)
    if attention is None:
        return DenseAttention(**options)
    if isinstance(attention, str):
        return make_method(attention, rng=rng, **options)
    if options:
        raise ValueError("attention_options apply only when attention is None or a method name")
    for call in ("forward", "backward"):
        if not callable(getattr(attention, call, None)):
            raise TypeError(
                f"attention object {attention!r} has no {call}() method; expected an object from "
                f"miniattn.make_method(name) or a method name"
            )
    return attention


class MultiHeadAttention(Module):
    """Multi-head attention of x_q (B, N, C) over x_kv (B, M, C_kv) with any attention method.

    ``attention`` is None (dense scaled dot-product attention), a method name
    from ``miniattn.method_names()`` or an attention method object. The layer
    hands the heads (B, H, N, D) to its forward and backward. The parameters are
    W_q (C, C), W_k and W_v (C_kv, C), W_o (C, C) and their biases.
    """

    def __init__(
        self, width, n_heads, *, kv_width=None, attention=None, attention_options=None, rng=None, dtype=np.float64
    ):
        super().__init__()
        rng = default_rng(rng)
        self.dtype = check_dtype(dtype)
        for name, value in init_mha_params(width, n_heads, rng, dtype=self.dtype, kv_width=kv_width).items():
            self.add_parameter(name, value)
        self.n_heads = n_heads
        self.attention = resolve_attention(attention, rng, attention_options)

    def forward(self, x_q, x_kv, *, mask=None, causal=False):
        """Attend from x_q (B, N, C) to x_kv (B, M, C_kv); returns (y (B, N, C), cache).

        mask is a boolean array broadcastable to (B, H, N, M), True where a query
        may attend a key; causal adds the bottom-right-aligned causal mask.
        For self-attention pass the same array as x_q and x_kv.
        """
        check_input("x_q", x_q, self.dtype)
        check_input("x_kv", x_kv, self.dtype)
        # A shallow copy, so that the cache keeps this call's arrays even if a
        # parameter array is later replaced in self.params.
        params = dict(self.params)
        return mha_forward(
            x_q, x_kv, params, n_heads=self.n_heads, mask=mask, causal=causal, attention=self.attention
        )

    def backward(self, dy, cache):
        """Return (dx_q, dx_kv); add the gradients of W_q .. b_o into grads.

        For self-attention the caller adds dx_q and dx_kv, because one input fed both.
        """
        dx_q, dx_kv, dparams = mha_backward(dy, cache)
        for name, grad in dparams.items():
            self.grads[name] += grad
        return dx_q, dx_kv

    def project(self, x_q, x_kv):
        """Return the per-head queries, keys and values (B, H, N, D), (B, H, M, D), (B, H, M, D)."""
        p = self.params
        q = split_heads(x_q @ p["W_q"] + p["b_q"], self.n_heads)  # (B, H, N, D)
        k = split_heads(x_kv @ p["W_k"] + p["b_k"], self.n_heads)  # (B, H, M, D)
        v = split_heads(x_kv @ p["W_v"] + p["b_v"], self.n_heads)  # (B, H, M, D)
        return q, k, v

    def attention_probabilities(self, cache):
        """Return the attention probabilities (B, H, N, M) of a forward with dense attention."""
        attention, attention_cache = cache[4], cache[5]
        if not isinstance(attention, DenseAttention):
            raise ValueError(
                f"attention_probabilities needs dense attention; this layer uses "
                f"{getattr(attention, 'name', type(attention).__name__)!r}, whose cache holds no (N, M) matrix"
            )
        return attention_probabilities(attention_cache)


# --- loss --------------------------------------------------------------------------------------


class CrossEntropyLoss(Module):
    """Mean softmax cross-entropy of logits (..., V) against integer targets (...).

    Targets equal to ignore_index (for example a padding id) are left out of the mean.
    """

    def __init__(self, *, ignore_index=None):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits, targets):
        """Return (loss, cache); loss is a Python float."""
        return F.cross_entropy_forward(logits, targets, self.ignore_index)

    def backward(self, dloss, cache):
        """Return dlogits (..., V) for the upstream gradient dloss of the loss (1.0 to train)."""
        return F.cross_entropy_backward(dloss, cache)
