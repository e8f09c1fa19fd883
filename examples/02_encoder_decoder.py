"""The three kinds of attention in the encoder-decoder Transformer, side by side.

One short sentence pair goes through a tiny, untrained Transformer:

1. the source and target words become ids and embeddings,
2. the encoder's self-attention is bidirectional: every source word attends to every other,
3. the decoder's masked self-attention is causal: a lower-triangular matrix,
4. the cross-attention is rectangular: target positions (rows) over source words (columns),
5. the whole model turns the pair into a loss,
6. a few Adam steps teach it this one pair.

Every step prints shapes, the attention matrix it builds, and a gradient
check of its hand-written backward against finite differences (float64,
maximum relative error, tolerance 1e-6). Run it with

    python examples/02_encoder_decoder.py

or step through the cells (# %%) in an editor.
"""

# %% Setup: a tiny vocabulary and one sentence pair.
import numpy as np

from miniattn.nn import (
    Adam,
    DecoderLayer,
    Embedding,
    EncoderLayer,
    MultiHeadAttention,
    Transformer,
    gradcheck_module,
)
from miniattn.nn.functional import cross_entropy_backward, cross_entropy_forward

TOLERANCE = 1e-6
# Matrices are checked along 6 random directions, vectors entry by entry. The
# step eps = 3e-6 keeps the rounding noise of L(x +- h u), about 1e-15 / h,
# below the tolerance even for the smallest gradient entries.
CHECK_OPTIONS = dict(eps=3e-6, max_elementwise=16)
rng = np.random.default_rng(0)

source_words = ["the", "black", "cat", "sleeps"]
target_words = ["le", "chat", "noir", "dort"]
source_vocab = ["<pad>"] + sorted(set(source_words))
target_vocab = ["<pad>", "<bos>", "<eos>"] + sorted(set(target_words))

# The decoder reads the target shifted right by one and predicts the next word.
decoder_words = ["<bos>"] + target_words  # N = 5 decoder positions
predicted_words = target_words + ["<eos>"]

src = np.array([[source_vocab.index(word) for word in source_words]])  # (B, M) = (1, 4)
tgt = np.array([[target_vocab.index(word) for word in decoder_words]])  # (B, N) = (1, 5)
targets = np.array([[target_vocab.index(word) for word in predicted_words]])  # (B, N)
print(f"source {source_words} -> ids {src[0].tolist()}, shape {src.shape} (B, M)")
print(f"decoder input {decoder_words} -> ids {tgt[0].tolist()}, shape {tgt.shape} (B, N)")
print(f"targets {predicted_words} -> ids {targets[0].tolist()}")

# GELU rather than ReLU: finite differences of a whole model cannot follow ReLU's kink.
model = Transformer(
    len(source_vocab), len(target_vocab), width=16, n_heads=2, ff_width=32,
    n_encoder_layers=2, n_decoder_layers=2, activation="gelu", rng=rng,
)
print(f"model: width C=16, H=2 heads of D=8, 2 encoder and 2 decoder layers, {model.parameter_count()} parameters")


def show_matrix(title, matrix, row_words, column_words):
    """Print an attention matrix with the words as row and column labels."""
    print(title)
    print(" " * 8 + "".join(f"{word:>8}" for word in column_words))
    for word, row in zip(row_words, matrix):
        print(f"{word:>8}" + "".join(f"{value:8.2f}" for value in row))


def report_check(label, result):
    """Print one line: the worst relative error of a gradient check and whether it passes."""
    verdict = "ok" if result.passed(TOLERANCE) else "FAILED"
    print(f"gradcheck {label}: {len(result.inputs)} arrays, max relative error "
          f"{result.max_rel_error:.1e} (tolerance {TOLERANCE:.0e}) {verdict}")


# %% 1. Embeddings: ids -> vectors, scaled by sqrt(C), plus sinusoidal positions.
x, embedding_cache = model.embed_forward(model.src_embedding, src)
print(f"\nsource embeddings x: {x.shape} (B, M, C)")

embedding = Embedding(len(source_vocab), 16, rng=rng)


def embedding_forward():
    return embedding.forward(src)


def embedding_backward(dy, cache):
    embedding.backward(dy, cache)  # adds into embedding.grads; the ids have no gradient
    return ()


result = gradcheck_module(embedding, embedding_forward, embedding_backward, rng=rng, **CHECK_OPTIONS)
report_check("Embedding (the backward is a scatter-add of rows)", result)

# %% 2. Encoder self-attention: bidirectional, an M x M matrix with no zeros.
memory, encoder_cache = model.encode(src)
print(f"\nencoder output (the memory): {memory.shape} (B, M, C)")
logits, decoder_cache = model.decode(tgt, memory)
# The caches keep every attention matrix; this collects them per layer.
maps = model.attention_probabilities((encoder_cache, decoder_cache))
probabilities = maps["encoder_self"][0]  # (B, H, M, M)
print(f"encoder self-attention probabilities: {probabilities.shape} (B, H, M, M)")
show_matrix("layer 0, head 0 (rows: queries, columns: keys)", probabilities[0, 0], source_words, source_words)
print(f"rows sum to 1: {np.allclose(probabilities.sum(axis=-1), 1.0)}")

check_rng = np.random.default_rng(1)
encoder_layer = EncoderLayer(16, 2, 32, activation="gelu", rng=check_rng)
x_check = check_rng.standard_normal((1, 4, 16))
result = gradcheck_module(
    encoder_layer, encoder_layer.forward, encoder_layer.backward, [x_check],
    input_names=["x"], rng=check_rng, **CHECK_OPTIONS,
)
report_check("EncoderLayer", result)

# %% 3. Decoder masked self-attention: causal, so the N x N matrix is lower triangular.
decoder_self = maps["decoder_self"][0]  # (B, H, N, N)
print(f"\ndecoder masked self-attention probabilities: {decoder_self.shape} (B, H, N, N)")
show_matrix("layer 0, head 0: position i attends only to positions j <= i", decoder_self[0, 0], decoder_words, decoder_words)
print(f"zero above the diagonal: {np.all(np.triu(decoder_self[0, 0], 1) == 0)}")

decoder_layer = DecoderLayer(16, 2, 32, activation="gelu", rng=check_rng)
y_check = check_rng.standard_normal((1, 5, 16))
memory_check = check_rng.standard_normal((1, 4, 16))
result = gradcheck_module(
    decoder_layer, decoder_layer.forward, decoder_layer.backward, [y_check, memory_check],
    input_names=["x", "memory"], rng=check_rng, **CHECK_OPTIONS,
)
report_check("DecoderLayer (x and memory)", result)

# %% 4. Cross-attention: queries from the decoder, keys and values from the encoder: N x M.
cross = maps["cross"][0]  # (B, H, N, M)
print(f"\ncross-attention probabilities: {cross.shape} (B, H, N, M), N={tgt.shape[1]} target, M={src.shape[1]} source")
show_matrix("layer 0, head 0 (rows: target positions, columns: source words)", cross[0, 0], decoder_words, source_words)
print("every decoder layer reads the same memory, so its gradient adds up over the layers")

cross_attention = MultiHeadAttention(16, 2, rng=check_rng)
queries_check = check_rng.standard_normal((1, 5, 16))
result = gradcheck_module(
    cross_attention, cross_attention.forward, cross_attention.backward, [queries_check, memory_check],
    input_names=["x_q", "x_kv"], rng=check_rng, **CHECK_OPTIONS,
)
report_check("MultiHeadAttention, cross (N=5, M=4)", result)

# %% 5. The whole model: logits over the target vocabulary and the cross-entropy loss.
loss, loss_cache = cross_entropy_forward(logits, targets)
print(f"\nlogits: {logits.shape} (B, N, V), loss {loss:.3f} (a uniform guess gives ln V = {np.log(len(target_vocab)):.3f})")


def loss_forward():
    logits, cache = model.forward(src, tgt)
    loss, loss_cache = cross_entropy_forward(logits, targets)
    return loss, (cache, loss_cache)


def loss_backward(dloss, caches):
    cache, loss_cache = caches
    model.backward(cross_entropy_backward(dloss, loss_cache), cache)
    return ()


result = gradcheck_module(model, loss_forward, loss_backward, rng=check_rng, **CHECK_OPTIONS)
report_check("whole Transformer, loss w.r.t. every parameter", result)

# %% 6. Training: Adam on this one pair until the model reproduces the translation.
optimizer = Adam(1e-2)
for step in range(1, 61):
    logits, cache = model.forward(src, tgt)
    loss, loss_cache = cross_entropy_forward(logits, targets)
    model.zero_grad()
    model.backward(cross_entropy_backward(1.0, loss_cache), cache)
    optimizer.step(model.parameters(), model.gradients())
    if step % 20 == 0:
        print(f"step {step}: loss {loss:.4f}")
predicted = [target_vocab[index] for index in logits[0].argmax(axis=-1)]
print(f"predicted {predicted}, expected {predicted_words}: {'match' if predicted == predicted_words else 'no match'}")
