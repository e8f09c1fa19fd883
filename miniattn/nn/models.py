"""Whole models: the encoder-decoder Transformer and a decoder-only language model.

Letters: B batch, M source positions, N target positions, V vocabulary size,
C model width, H heads, F feed-forward width, L layers.

Encoder-decoder Transformer (Vaswani et al., 2017), source ids (B, M) and
target ids (B, N):

    x = Embed_src(src) * sqrt(C) + PE[:M]            (B, M, C)
    memory = EncoderLayer^L_enc(x)                   (B, M, C)   bidirectional
    y = Embed_tgt(tgt) * sqrt(C) + PE[:N]            (B, N, C)
    y = DecoderLayer^L_dec(y, memory)                (B, N, C)   causal + cross
    logits = y W_out + b_out                         (B, N, V)

PE is the fixed sinusoidal encoding. The source padding mask hides padded
source keys from encoder self-attention and from every cross-attention. The
target padding mask and the causal mask apply to decoder self-attention.
Every decoder layer reads the memory, so the memory gradient is the sum of
the cross-attention key/value gradients over the decoder layers. Pre-LN
stacks end with a final LayerNorm on the encoder and on the decoder.

Decoder-only language model (GPT-style), ids (B, N):

    h = Embed_tok(ids) + Embed_pos(0..N-1)           (B, N, C)   learned positions
    h = Block^L(h)                                   (B, N, C)   causal self-attention + FF
    logits = LayerNorm(h) W_out + b_out              (B, N, V)

Training step, with ``cross_entropy_forward/backward`` from ``miniattn.nn.functional``
and an optimizer from ``miniattn.nn.optim``:

    logits, cache = model.forward(inputs)
    loss, loss_cache = cross_entropy_forward(logits, targets)
    model.zero_grad()
    model.backward(cross_entropy_backward(1.0, loss_cache), cache)
    optimizer.step(model.parameters(), model.gradients())

Complexity per layer: O(N^2 C + N C F) time with dense attention, O(N^2 H)
memory for the stored attention probabilities.
"""

import numpy as np

from ..core.masks import padding_mask
from ..core.validate import check_int
from ..transformer import sinusoidal_positions
from .blocks import DecoderLayer, EncoderLayer
from .layers import Dropout, Embedding, LayerNorm, Linear, check_token_ids, default_rng, resolve_attention
from .module import Module, check_dtype


def check_ids_and_lengths(name, ids, vocab_size, lengths):
    """Check (B, L) token ids and optional (B,) lengths; return (ids, mask or None)."""
    ids = check_token_ids(name, ids, vocab_size)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"{name} has shape {ids.shape}; expected (B, L) token ids with L >= 1")
    if lengths is None:
        return ids, None
    lengths = np.asarray(lengths)
    if lengths.shape != (ids.shape[0],):
        raise ValueError(f"lengths for {name} have shape {lengths.shape}; expected ({ids.shape[0]},), one per sequence")
    return ids, padding_mask(lengths, ids.shape[1])  # (B, 1, 1, L)


def attention_name(attention):
    """Return the method name of an attention argument (None, a name or an object) for a config."""
    if attention is None or isinstance(attention, str):
        return attention
    return getattr(attention, "name", type(attention).__name__)


class Transformer(Module):
    """The encoder-decoder Transformer with sinusoidal positions and an output projection.

    Children: src_embedding, tgt_embedding, encoder.0 .. encoder.{L-1},
    decoder.0 .. decoder.{L-1}, encoder_norm and decoder_norm (pre-LN only),
    output, dropout (applied to the embeddings). ``attention`` chooses the
    self-attention method of every encoder and decoder layer: None (dense), a
    method name (one object per layer, built with attention_options and rng)
    or one method object shared by all layers. Cross-attention is always dense.
    """

    def __init__(
        self,
        src_vocab_size,
        tgt_vocab_size,
        *,
        width=32,
        n_heads=4,
        ff_width=64,
        n_encoder_layers=2,
        n_decoder_layers=2,
        activation="relu",
        pre_ln=False,
        dropout=0.0,
        attention=None,
        attention_options=None,
        rng=None,
        dtype=np.float64,
    ):
        super().__init__()
        check_int("n_encoder_layers", n_encoder_layers, minimum=1)
        check_int("n_decoder_layers", n_decoder_layers, minimum=1)
        check_int("width", width, minimum=2)
        if width % 2:
            raise ValueError(f"width={width} is invalid; the sinusoidal positions need an even width")
        rng = default_rng(rng)
        self.dtype = check_dtype(dtype)
        self.width = width
        self.pre_ln = pre_ln
        self.config = dict(
            src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size, width=width, n_heads=n_heads,
            ff_width=ff_width, n_encoder_layers=n_encoder_layers, n_decoder_layers=n_decoder_layers,
            activation=activation, pre_ln=pre_ln, dropout=dropout,
            attention=attention_name(attention), attention_options=dict(attention_options or {}),
        )
        layer_options = dict(activation=activation, pre_ln=pre_ln, dropout=dropout, rng=rng, dtype=dtype)

        self.src_embedding = self.add_module("src_embedding", Embedding(src_vocab_size, width, rng=rng, dtype=dtype))
        self.tgt_embedding = self.add_module("tgt_embedding", Embedding(tgt_vocab_size, width, rng=rng, dtype=dtype))
        self.encoder = [
            self.add_module(
                f"encoder.{index}",
                EncoderLayer(width, n_heads, ff_width, attention=resolve_attention(attention, rng, attention_options),
                             **layer_options),
            )
            for index in range(n_encoder_layers)
        ]
        self.decoder = [
            self.add_module(
                f"decoder.{index}",
                DecoderLayer(width, n_heads, ff_width, attention=resolve_attention(attention, rng, attention_options),
                             **layer_options),
            )
            for index in range(n_decoder_layers)
        ]
        if pre_ln:
            self.encoder_norm = self.add_module("encoder_norm", LayerNorm(width, dtype=dtype))
            self.decoder_norm = self.add_module("decoder_norm", LayerNorm(width, dtype=dtype))
        self.output = self.add_module("output", Linear(width, tgt_vocab_size, rng=rng, dtype=dtype))
        self.dropout = self.add_module("dropout", Dropout(dropout, rng=rng))

    def embed_forward(self, embedding, ids):
        """Return (Embed(ids) * sqrt(C) + PE, cache) for ids (B, L)."""
        rows, embedding_cache = embedding.forward(ids)  # (B, L, C)
        positions = sinusoidal_positions(ids.shape[1], self.width, dtype=self.dtype)  # (L, C)
        x = rows * self.dtype.type(np.sqrt(self.width)) + positions  # (B, L, C)
        x, dropout_cache = self.dropout.forward(x)
        return x, (embedding_cache, dropout_cache)

    def embed_backward(self, dx, embedding, cache):
        """Add the embedding gradient of dx (B, L, C) into embedding.grads."""
        embedding_cache, dropout_cache = cache
        dx = self.dropout.backward(dx, dropout_cache)
        embedding.backward(dx * self.dtype.type(np.sqrt(self.width)), embedding_cache)

    def encode(self, src_ids, *, src_lengths=None):
        """Encode source ids (B, M); return (memory (B, M, C), cache)."""
        src_ids, src_mask = check_ids_and_lengths("src_ids", src_ids, self.src_embedding.vocab_size, src_lengths)
        cache = {"src_mask": src_mask, "layers": []}

        # 1. Embed the source tokens and add the positions.
        x, cache["embedding"] = self.embed_forward(self.src_embedding, src_ids)  # (B, M, C)

        # 2. Bidirectional encoder layers; padded source keys are masked out.
        for layer in self.encoder:
            x, layer_cache = layer.forward(x, mask=src_mask)  # (B, M, C)
            cache["layers"].append(layer_cache)

        # 3. Pre-LN: a final normalisation.
        if self.pre_ln:
            x, cache["norm"] = self.encoder_norm.forward(x)
        return x, cache

    def encode_backward(self, dmemory, cache):
        """Backward of encode: add every encoder parameter gradient."""
        # 3. Final normalisation.
        dx = self.encoder_norm.backward(dmemory, cache["norm"]) if self.pre_ln else dmemory

        # 2. Encoder layers, last to first.
        for layer, layer_cache in zip(reversed(self.encoder), reversed(cache["layers"])):
            dx = layer.backward(dx, layer_cache)

        # 1. Embedding.
        self.embed_backward(dx, self.src_embedding, cache["embedding"])

    def decode(self, tgt_ids, memory, *, src_lengths=None, tgt_lengths=None):
        """Decode target ids (B, N) against the memory (B, M, C); return (logits (B, N, V), cache)."""
        tgt_ids, tgt_mask = check_ids_and_lengths("tgt_ids", tgt_ids, self.tgt_embedding.vocab_size, tgt_lengths)
        if memory.ndim != 3 or memory.shape[0] != tgt_ids.shape[0]:
            raise ValueError(f"memory has shape {memory.shape}; expected ({tgt_ids.shape[0]}, M, {self.width})")
        src_mask = None
        if src_lengths is not None:
            src_mask = padding_mask(np.asarray(src_lengths), memory.shape[1])  # (B, 1, 1, M)
        cache = {"layers": []}

        # 4. Embed the target tokens and add the positions.
        y, cache["embedding"] = self.embed_forward(self.tgt_embedding, tgt_ids)  # (B, N, C)

        # 5. Decoder layers: causal self-attention, cross-attention to the memory, FF.
        for layer in self.decoder:
            y, layer_cache = layer.forward(y, memory, self_mask=tgt_mask, memory_mask=src_mask)  # (B, N, C)
            cache["layers"].append(layer_cache)

        # 6. Pre-LN: a final normalisation.
        if self.pre_ln:
            y, cache["norm"] = self.decoder_norm.forward(y)

        # 7. Project to the target vocabulary.
        logits, cache["output"] = self.output.forward(y)  # (B, N, V)
        return logits, cache

    def decode_backward(self, dlogits, cache):
        """Backward of decode; return dmemory (B, M, C), summed over the decoder layers."""
        # 7. Output projection.
        dy = self.output.backward(dlogits, cache["output"])

        # 6. Final normalisation.
        if self.pre_ln:
            dy = self.decoder_norm.backward(dy, cache["norm"])

        # 5. Decoder layers, last to first. Each read the memory: a fork, the gradients add.
        dmemory = None
        for layer, layer_cache in zip(reversed(self.decoder), reversed(cache["layers"])):
            dy, dmemory_layer = layer.backward(dy, layer_cache)
            dmemory = dmemory_layer if dmemory is None else dmemory + dmemory_layer

        # 4. Embedding.
        self.embed_backward(dy, self.tgt_embedding, cache["embedding"])
        return dmemory

    def forward(self, src_ids, tgt_ids, *, src_lengths=None, tgt_lengths=None):
        """Return (logits (B, N, V), cache) for source ids (B, M) and target ids (B, N).

        src_lengths and tgt_lengths (B,) give the valid length of each padded
        sequence; positions at or after the length are padding.
        """
        memory, encoder_cache = self.encode(src_ids, src_lengths=src_lengths)  # (B, M, C)
        logits, decoder_cache = self.decode(tgt_ids, memory, src_lengths=src_lengths, tgt_lengths=tgt_lengths)
        return logits, (encoder_cache, decoder_cache)

    def backward(self, dlogits, cache):
        """Add the gradient of every parameter for upstream dlogits (B, N, V)."""
        encoder_cache, decoder_cache = cache
        dmemory = self.decode_backward(dlogits, decoder_cache)
        self.encode_backward(dmemory, encoder_cache)

    def attention_probabilities(self, cache):
        """Return the dense attention probabilities stored in a forward cache.

        A dict with lists, one (B, H, *, *) array per layer:
        "encoder_self" (B, H, M, M), "decoder_self" (B, H, N, N), "cross" (B, H, N, M).
        """
        encoder_cache, decoder_cache = cache
        maps = {"encoder_self": [], "decoder_self": [], "cross": []}
        for layer, layer_cache in zip(self.encoder, encoder_cache["layers"]):
            attention_cache = layer_cache["self_attention"][1]
            maps["encoder_self"].append(layer.self_attention.attention_probabilities(attention_cache))
        for layer, layer_cache in zip(self.decoder, decoder_cache["layers"]):
            self_cache = layer_cache["self_attention"][1]
            cross_cache = layer_cache["cross_attention"][1]
            maps["decoder_self"].append(layer.self_attention.attention_probabilities(self_cache))
            maps["cross"].append(layer.cross_attention.attention_probabilities(cross_cache))
        return maps


class DecoderLM(Module):
    """A decoder-only (GPT-style) language model with learned positions.

    Children: token_embedding, position_embedding, blocks.0 .. blocks.{L-1}
    (causal self-attention + FF), final_norm, head, dropout. ``attention``
    chooses the self-attention method of every block: None (dense), a name from
    ``miniattn.method_names()`` (one object per block, built with
    attention_options and rng) or one method object shared by all blocks.
    """

    def __init__(
        self,
        vocab_size,
        max_length,
        *,
        width=64,
        n_heads=4,
        n_layers=2,
        ff_width=None,
        activation="gelu",
        pre_ln=True,
        dropout=0.0,
        attention=None,
        attention_options=None,
        rng=None,
        dtype=np.float64,
    ):
        super().__init__()
        check_int("max_length", max_length, minimum=1)
        check_int("n_layers", n_layers, minimum=1)
        check_int("width", width, minimum=1)
        ff_width = 4 * width if ff_width is None else ff_width
        rng = default_rng(rng)
        self.dtype = check_dtype(dtype)
        self.max_length = max_length
        self.config = dict(
            vocab_size=vocab_size, max_length=max_length, width=width, n_heads=n_heads, n_layers=n_layers,
            ff_width=ff_width, activation=activation, pre_ln=pre_ln, dropout=dropout,
            attention=attention_name(attention), attention_options=dict(attention_options or {}),
        )

        self.token_embedding = self.add_module("token_embedding", Embedding(vocab_size, width, rng=rng, dtype=dtype))
        self.position_embedding = self.add_module(
            "position_embedding", Embedding(max_length, width, rng=rng, dtype=dtype)
        )
        self.blocks = [
            self.add_module(
                f"blocks.{index}",
                DecoderLayer(
                    width, n_heads, ff_width, cross_attention=False, activation=activation, pre_ln=pre_ln,
                    dropout=dropout, attention=resolve_attention(attention, rng, attention_options), rng=rng,
                    dtype=dtype,
                ),
            )
            for index in range(n_layers)
        ]
        self.final_norm = self.add_module("final_norm", LayerNorm(width, dtype=dtype))
        self.head = self.add_module("head", Linear(width, vocab_size, rng=rng, dtype=dtype))
        self.dropout = self.add_module("dropout", Dropout(dropout, rng=rng))

    @property
    def vocab_size(self):
        return self.token_embedding.vocab_size

    def check_ids(self, ids, start=0):
        """Check (B, N) token ids with 1 <= N and start + N <= max_length; return them as an ndarray."""
        ids = check_token_ids("ids", ids, self.vocab_size)
        check_int("start", start, minimum=0)
        if ids.ndim != 2 or not 1 <= ids.shape[1] <= self.max_length - start:
            raise ValueError(
                f"ids has shape {ids.shape} at start={start}; expected (B, N) with 1 <= N and "
                f"start + N <= max_length={self.max_length}"
            )
        return ids

    def embed(self, ids, start=0):
        """Return (token + position embeddings (B, N, C), cache) for checked ids (B, N).

        The ids sit at positions start .. start + N - 1.
        """
        tokens, token_cache = self.token_embedding.forward(ids)  # (B, N, C)
        positions, position_cache = self.position_embedding.forward(np.arange(start, start + ids.shape[1]))  # (N, C)
        h, dropout_cache = self.dropout.forward(tokens + positions)  # (B, N, C)
        return h, (token_cache, position_cache, dropout_cache)

    def forward(self, ids, *, start=0):
        """Return (logits (B, N, V), cache); logits[:, t] predicts the token after ids[:, t].

        start shifts the learned positions: the ids take positions start ..
        start + N - 1. Training windows shorter than max_length at random
        starts trains every row of the position table.
        """
        ids = self.check_ids(ids, start)
        cache = {"blocks": []}

        # 1. Token and position embeddings.
        h, cache["embedding"] = self.embed(ids, start)  # (B, N, C)

        # 2. Blocks: causal self-attention, then FF.
        for block in self.blocks:
            h, block_cache = block.forward(h)  # (B, N, C)
            cache["blocks"].append(block_cache)

        # 3. Final normalisation.
        h, cache["norm"] = self.final_norm.forward(h)  # (B, N, C)

        # 4. Logits over the vocabulary.
        logits, cache["head"] = self.head.forward(h)  # (B, N, V)
        return logits, cache

    def backward(self, dlogits, cache):
        """Add the gradient of every parameter for upstream dlogits (B, N, V)."""
        # 4. Logits.
        dh = self.head.backward(dlogits, cache["head"])

        # 3. Final normalisation.
        dh = self.final_norm.backward(dh, cache["norm"])

        # 2. Blocks, last to first.
        for block, block_cache in zip(reversed(self.blocks), reversed(cache["blocks"])):
            dh, _ = block.backward(dh, block_cache)

        # 1. Embeddings: h = tokens + positions, positions broadcast over the batch.
        token_cache, position_cache, dropout_cache = cache["embedding"]
        dh = self.dropout.backward(dh, dropout_cache)
        self.token_embedding.backward(dh, token_cache)
        self.position_embedding.backward(dh.sum(axis=0), position_cache)

    def attention_inputs(self, ids, layer):
        """Return the queries, keys and values (B, H, N, D) that block `layer` attends with."""
        ids = self.check_ids(ids)
        check_int("layer", layer, minimum=0, maximum=len(self.blocks) - 1)
        h, _ = self.embed(ids)
        for block in self.blocks[:layer]:
            h, _ = block.forward(h)
        z = self.blocks[layer].self_attention_input(h)  # (B, N, C)
        return self.blocks[layer].self_attention.project(z, z)

    def generate(self, prompt_ids, n_tokens, *, rng, temperature=1.0):
        """Sample n_tokens continuations of prompt_ids (B, P); return ids (B, P + n_tokens).

        Each step runs the model on the last max_length tokens (no key/value
        cache) and samples from softmax(logits / temperature).
        """
        check_int("n_tokens", n_tokens, minimum=0)
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} is invalid; expected a positive number")
        ids = check_token_ids("prompt_ids", prompt_ids, self.vocab_size)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"prompt_ids has shape {ids.shape}; expected (B, P) with P >= 1")
        was_training = self.training
        self.eval()
        for _ in range(n_tokens):
            logits, _ = self.forward(ids[:, -self.max_length:])
            scores = logits[:, -1].astype(np.float64) / temperature  # (B, V)
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            draws = rng.random((ids.shape[0], 1))  # (B, 1)
            next_ids = np.minimum((np.cumsum(probs, axis=-1) < draws).sum(axis=-1), self.vocab_size - 1)
            ids = np.concatenate([ids, next_ids[:, None].astype(ids.dtype)], axis=1)
        self.train(was_training)
        return ids
