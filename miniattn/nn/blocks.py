"""Encoder and decoder layers: attention and feed-forward sublayers with residuals.

Letters: B batch, N target (decoder) positions, M source (encoder) positions,
C model width, F feed-forward width, H heads.

Every sublayer (self-attention, cross-attention, feed-forward) is wrapped in a
residual connection with layer normalisation, in one of two orders:

    post-LN (the 2017 paper):  y = LayerNorm(x + Dropout(Sublayer(x)))
    pre-LN (GPT-2 and later):  y = x + Dropout(Sublayer(LayerNorm(x)))

Pre-LN leaves the residual path free of normalisation, which trains deep
stacks without warm-up. A model built from pre-LN layers adds one final
LayerNorm after the stack. The backward of the residual is a fork: the
gradient reaching y flows both into the sublayer and straight into x, and
the two parts add.

    EncoderLayer:  bidirectional self-attention, then FF
    DecoderLayer:  causal self-attention, then cross-attention to the encoder
                   output (the memory), then FF; without cross-attention it
                   is the block of a decoder-only language model.

NOTE: dropout is applied to each sublayer's output only; the attention
probabilities are not dropped, because the attention methods own the
softmax.
"""

import numpy as np

from ..core.validate import check_int
from .layers import Dropout, FeedForward, LayerNorm, MultiHeadAttention, default_rng, resolve_attention
from .module import Module, check_dtype, check_input


def residual_forward(x, norm, dropout, pre_ln, sublayer):
    """Apply one residual sublayer. sublayer(z) -> (out, cache) runs on z (B, N, C).

    Returns (y, cache) with y = x + drop(sublayer(norm(x))) for pre-LN, or
    y = norm(x + drop(sublayer(x))) for post-LN.
    """
    if pre_ln:
        # 1. Normalise, 2. run the sublayer, 3. drop, 4. add the residual.
        z, norm_cache = norm.forward(x)  # (B, N, C)
        out, sublayer_cache = sublayer(z)  # (B, N, C)
        out, dropout_cache = dropout.forward(out)
        y = x + out  # (B, N, C)
    else:
        # 1. Run the sublayer, 2. drop, 3. add the residual, 4. normalise.
        out, sublayer_cache = sublayer(x)  # (B, N, C)
        out, dropout_cache = dropout.forward(out)
        y, norm_cache = norm.forward(x + out)  # (B, N, C)
    return y, (norm_cache, sublayer_cache, dropout_cache)


def residual_backward(dy, cache, norm, dropout, pre_ln, sublayer_backward):
    """Backward of residual_forward.

    sublayer_backward(dout, sublayer_cache) -> (dz, extra) returns the gradient
    of the sublayer's input and anything else it produces (the memory gradient
    of cross-attention). Returns (dx, extra).
    """
    norm_cache, sublayer_cache, dropout_cache = cache
    if pre_ln:
        # 4. y = x + out: a fork, dy reaches x directly and through the sublayer.
        # 3. Dropout.
        dout = dropout.backward(dy, dropout_cache)
        # 2. Sublayer.
        dz, extra = sublayer_backward(dout, sublayer_cache)
        # 1. z = norm(x), added to the direct path.
        dx = dy + norm.backward(dz, norm_cache)
    else:
        # 4. y = norm(x + out)
        dsum = norm.backward(dy, norm_cache)
        # 3. x + out: a fork, dsum reaches x directly and through the sublayer.
        # 2. Dropout.
        dout = dropout.backward(dsum, dropout_cache)
        # 1. Sublayer, added to the direct path.
        dz, extra = sublayer_backward(dout, sublayer_cache)
        dx = dsum + dz
    return dx, extra


def self_attention_backward(attention):
    """Return the backward of self-attention in the (dz, extra) form of residual_backward."""

    def backward(dout, cache):
        dz_q, dz_kv = attention.backward(dout, cache)
        # z fed the queries and the keys/values: a fork, the gradients add.
        return dz_q + dz_kv, None

    return backward


def feed_forward_backward(feed_forward):
    """Return FeedForward.backward in the (dz, extra) form of residual_backward."""

    def backward(dout, cache):
        return feed_forward.backward(dout, cache), None

    return backward


class TransformerLayer(Module):
    """Shared constructor checks and settings of EncoderLayer and DecoderLayer."""

    def __init__(self, width, n_heads, *, pre_ln, dropout, rng, dtype):
        super().__init__()
        check_int("width", width, minimum=1)
        check_int("n_heads", n_heads, minimum=1)
        if width % n_heads:
            raise ValueError(
                f"width={width} is not divisible by n_heads={n_heads}; expected width = n_heads * head_width"
            )
        if not isinstance(pre_ln, bool):
            raise TypeError(f"pre_ln must be True or False, got {pre_ln!r}")
        self.width = width
        self.pre_ln = pre_ln
        self.dtype = check_dtype(dtype)
        self.dropout = self.add_module("dropout", Dropout(dropout, rng=rng))


class EncoderLayer(TransformerLayer):
    """Bidirectional self-attention, then a feed-forward sublayer, each residual.

    Parameters live in the children self_attention, feed_forward, norm1
    (around self-attention) and norm2 (around the feed-forward).
    """

    def __init__(
        self,
        width,
        n_heads,
        ff_width,
        *,
        activation="relu",
        pre_ln=False,
        dropout=0.0,
        attention=None,
        attention_options=None,
        rng=None,
        dtype=np.float64,
    ):
        rng = default_rng(rng)
        super().__init__(width, n_heads, pre_ln=pre_ln, dropout=dropout, rng=rng, dtype=dtype)
        attention = resolve_attention(attention, rng, attention_options)
        self.self_attention = self.add_module(
            "self_attention", MultiHeadAttention(width, n_heads, attention=attention, rng=rng, dtype=dtype)
        )
        self.feed_forward = self.add_module(
            "feed_forward", FeedForward(width, ff_width, activation=activation, rng=rng, dtype=dtype)
        )
        self.norm1 = self.add_module("norm1", LayerNorm(width, dtype=dtype))
        self.norm2 = self.add_module("norm2", LayerNorm(width, dtype=dtype))

    def forward(self, x, *, mask=None):
        """x (B, M, C) -> (y (B, M, C), cache).

        mask: optional boolean key mask broadcastable to (B, H, M, M), usually
        the source padding mask ``padding_mask(lengths, M)``. No causal mask.
        """
        check_input("x", x, self.dtype, self.width)

        def attend(z):
            return self.self_attention.forward(z, z, mask=mask, causal=False)

        # 1. Bidirectional self-attention sublayer.
        h, attention_cache = residual_forward(x, self.norm1, self.dropout, self.pre_ln, attend)  # (B, M, C)

        # 2. Feed-forward sublayer.
        y, ff_cache = residual_forward(h, self.norm2, self.dropout, self.pre_ln, self.feed_forward.forward)
        return y, {"self_attention": attention_cache, "feed_forward": ff_cache}

    def backward(self, dy, cache):
        """Return dx (B, M, C); add every parameter gradient into the children's grads."""
        # 2. Feed-forward sublayer.
        ff_backward = feed_forward_backward(self.feed_forward)
        dh, _ = residual_backward(dy, cache["feed_forward"], self.norm2, self.dropout, self.pre_ln, ff_backward)

        # 1. Self-attention sublayer.
        attend_backward = self_attention_backward(self.self_attention)
        dx, _ = residual_backward(dh, cache["self_attention"], self.norm1, self.dropout, self.pre_ln, attend_backward)
        return dx


class DecoderLayer(TransformerLayer):
    """Causal self-attention, then cross-attention to the memory, then FF, each residual.

    With cross_attention=False the middle sublayer is left out: this is the
    block of a decoder-only language model. Parameters live in the children
    self_attention, cross_attention, feed_forward and norm1, norm2, norm3
    (norm2 exists only with cross-attention).
    """

    def __init__(
        self,
        width,
        n_heads,
        ff_width,
        *,
        cross_attention=True,
        memory_width=None,
        activation="relu",
        pre_ln=False,
        dropout=0.0,
        attention=None,
        attention_options=None,
        rng=None,
        dtype=np.float64,
    ):
        rng = default_rng(rng)
        super().__init__(width, n_heads, pre_ln=pre_ln, dropout=dropout, rng=rng, dtype=dtype)
        attention = resolve_attention(attention, rng, attention_options)
        self.self_attention = self.add_module(
            "self_attention", MultiHeadAttention(width, n_heads, attention=attention, rng=rng, dtype=dtype)
        )
        self.norm1 = self.add_module("norm1", LayerNorm(width, dtype=dtype))
        self.has_cross_attention = cross_attention
        if cross_attention:
            # NOTE: cross-attention always uses dense attention. The attention
            # argument chooses the method of the self-attention only.
            self.cross_attention = self.add_module(
                "cross_attention",
                MultiHeadAttention(width, n_heads, kv_width=memory_width, rng=rng, dtype=dtype),
            )
            self.norm2 = self.add_module("norm2", LayerNorm(width, dtype=dtype))
        elif memory_width is not None:
            raise ValueError("memory_width is set but cross_attention=False; a decoder-only block has no memory")
        self.feed_forward = self.add_module(
            "feed_forward", FeedForward(width, ff_width, activation=activation, rng=rng, dtype=dtype)
        )
        self.norm3 = self.add_module("norm3", LayerNorm(width, dtype=dtype))

    def forward(self, x, memory=None, *, self_mask=None, memory_mask=None):
        """x (B, N, C), memory (B, M, C_mem) -> (y (B, N, C), cache).

        self_mask: optional boolean mask broadcastable to (B, H, N, N), e.g. the
        target padding mask; the causal mask is always added.
        memory_mask: optional boolean mask broadcastable to (B, H, N, M), usually
        the source padding mask. Pass memory=None when there is no cross-attention.
        """
        check_input("x", x, self.dtype, self.width)
        if self.has_cross_attention:
            if memory is None:
                raise ValueError("memory is missing; this DecoderLayer has cross-attention to an encoder output")
            check_input("memory", memory, self.dtype)
            if memory.shape[0] != x.shape[0]:
                raise ValueError(f"memory has batch {memory.shape[0]} but x has batch {x.shape[0]}")
        elif memory is not None or memory_mask is not None:
            raise ValueError("memory was given, but this DecoderLayer was built with cross_attention=False")
        cache = {}

        def attend(z):
            return self.self_attention.forward(z, z, mask=self_mask, causal=True)

        # 1. Masked (causal) self-attention sublayer.
        h, cache["self_attention"] = residual_forward(x, self.norm1, self.dropout, self.pre_ln, attend)  # (B, N, C)

        # 2. Cross-attention sublayer: queries from h, keys and values from the memory.
        if self.has_cross_attention:

            def attend_memory(z):
                return self.cross_attention.forward(z, memory, mask=memory_mask)

            h, cache["cross_attention"] = residual_forward(
                h, self.norm2, self.dropout, self.pre_ln, attend_memory
            )  # (B, N, C)

        # 3. Feed-forward sublayer.
        y, cache["feed_forward"] = residual_forward(
            h, self.norm3, self.dropout, self.pre_ln, self.feed_forward.forward
        )  # (B, N, C)
        return y, cache

    def backward(self, dy, cache):
        """Return (dx (B, N, C), dmemory (B, M, C_mem) or None); add parameter gradients."""
        # 3. Feed-forward sublayer.
        ff_backward = feed_forward_backward(self.feed_forward)
        dh, _ = residual_backward(dy, cache["feed_forward"], self.norm3, self.dropout, self.pre_ln, ff_backward)

        # 2. Cross-attention sublayer: the query side continues down the stack and
        #    the key/value side is the gradient of the memory.
        dmemory = None
        if self.has_cross_attention:
            cross_backward = self.cross_attention.backward  # (dout, cache) -> (dz, dmemory)
            dh, dmemory = residual_backward(
                dh, cache["cross_attention"], self.norm2, self.dropout, self.pre_ln, cross_backward
            )

        # 1. Causal self-attention sublayer.
        attend_backward = self_attention_backward(self.self_attention)
        dx, _ = residual_backward(dh, cache["self_attention"], self.norm1, self.dropout, self.pre_ln, attend_backward)
        return dx, dmemory

    def self_attention_input(self, x):
        """Return the input of the self-attention for layer input x: LayerNorm(x) for pre-LN, else x."""
        return self.norm1.forward(x)[0] if self.pre_ln else x
