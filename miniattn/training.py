"""Training the character language model: corpus, loop, evaluation and checkpoints.

The commands ``train``, ``sample`` and ``tour`` build on these functions;
they print, this module does not. One training step on a batch of B windows
of N characters (N = the context) is

    logits, cache = model.forward(inputs, start=s)       (B, N, V)
    loss = cross_entropy(logits, targets)                 nats per character
    model.backward(dloss, cache); clip the gradient norm; Adam step

where s is 0 when the position table has exactly N rows, and a random start
in [0, max_length - N] otherwise, so that every learned position is trained
even though each window is short.

A checkpoint is one ``.npz`` file. It stores the parameters
(``param/NAME``), the Adam state (``optimizer/KEY``) and the attention
methods' own arrays (``attention/blocks.I/ATTRIBUTE``: random features,
rotations, centroids, relative-position weights). It also stores the model
configuration as JSON and the vocabulary, so it can be loaded without the
text it was trained on.
"""

import json
import math
import os
import pathlib
import time
import tracemalloc
import zipfile

import numpy as np

from .data import CharVocabulary, read_text, split_ids, stdlib_text, unigram_cross_entropy
from .methods import info, is_implemented, make_method, method_names
from .nn import Adam, DecoderLM, clip_grad_norm
from .nn.functional import cross_entropy_backward, cross_entropy_forward

CHECKPOINT_FORMAT = 1

# The model configuration a checkpoint stores; two models with the same
# configuration and vocabulary have the same parameter shapes and behaviour.
MODEL_DEFAULTS = dict(
    context=64,
    max_length=None,  # rows of the position table; None means the context
    width=64,
    n_heads=4,
    n_layers=2,
    attention="transformer",
    attention_options={},
    dtype="float32",
)

# Settings of one training run, which may change between runs of one checkpoint.
TRAIN_DEFAULTS = dict(batch_size=16, lr=3e-3, max_grad_norm=1.0, eval_every=50, eval_windows=64)


# --- options ---------------------------------------------------------------------------


def parse_option(text):
    """Parse one ``KEY=VALUE`` method option; return (key, value).

    VALUE becomes a bool (true/false), None (none), an int, a float, a tuple
    of those when it contains commas, or else stays a string.
    """
    key, separator, raw = text.partition("=")
    key = key.strip()
    if not separator or not key.isidentifier():
        raise ValueError(f"option {text!r} is invalid; expected KEY=VALUE, for example window=32")
    if "," in raw:
        return key, tuple(parse_value(part) for part in raw.split(",") if part.strip())
    return key, parse_value(raw)


def parse_value(raw):
    """Convert the text of one option value to a bool, None, int, float or string."""
    raw = raw.strip()
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for convert in (int, float):
        try:
            return convert(raw)
        except ValueError:
            pass
    return raw


def context_options(name, context, options, heads=MODEL_DEFAULTS["n_heads"]):
    """Return the method options for a context of N characters and H heads, filling defaults.

    The library defaults of some methods assume thousands of positions, so at a
    short context their pattern would cover every key and they would equal dense
    attention. The Routing Transformer mixes local-window heads with routing
    heads, as its official implementation does, and routes into 4 clusters of
    about N / 4 keys. Options the user set are kept as given.
    """
    chosen = {}
    if name == "routing_transformer":
        chosen["n_clusters"] = 4
        chosen["local_heads"] = heads // 2
    if name == "reformer":
        chosen["chunk_length"] = max(1, context // 4)  # 8 buckets of about N / 8 positions
    if name == "longformer":
        chosen["window"] = max(1, context // 4)  # one-sided: a quarter of the context
    if name == "bigbird":
        # BigBird falls back to dense attention when N <= (5 + 2R) b; with the
        # default R = 3 random blocks, b = N / 16 keeps it on its sparse plan.
        chosen["block_size"] = max(1, context // 16)
    elif name == "ring_attention":
        chosen["block_size"] = max(1, context // 4)
    chosen.update(options)
    return chosen


def check_method_name(name):
    """Raise ValueError unless name is a registered and implemented method."""
    if name not in method_names():
        implemented = [method for method in method_names() if is_implemented(method)]
        raise ValueError(
            f"unknown attention method {name!r}; expected one of {', '.join(implemented)} "
            f"(python -m miniattn list shows them all)"
        )
    if not is_implemented(name):
        raise ValueError(f"attention method {name!r} is registered but not implemented yet; pick another")


def check_causal_method(name, options, context, dtype, heads=1):
    """Run the method once causally on a tiny input; raise ValueError saying why it cannot train the LM."""
    check_method_name(name)
    method = make_method(name, rng=np.random.default_rng(0), **options)
    q = np.random.default_rng(0).standard_normal((1, heads, context, 4)).astype(dtype)  # (1, H, N, 4)
    try:
        method.forward(q, q, q, causal=True)
    except ValueError as error:
        raise ValueError(
            f"attention method {name!r} with options {options} cannot run the causal language model: {error}"
        ) from None


# --- the text --------------------------------------------------------------------------


class Corpus:
    """A text split into training and validation ids, with its unigram baseline."""

    def __init__(self, text, description, vocabulary, context, validation_fraction=0.1):
        self.text = text
        self.description = description
        self.vocabulary = vocabulary
        ids = vocabulary.encode(text)  # (T,)
        self.train_ids, self.validation_ids = split_ids(ids, validation_fraction)
        for part, part_ids in (("training", self.train_ids), ("validation", self.validation_ids)):
            if len(part_ids) < context + 1:
                needed = math.ceil((context + 1) / min(validation_fraction, 1 - validation_fraction))
                raise ValueError(
                    f"{description} has {len(text)} characters, so its {part} part ({len(part_ids)}) is shorter "
                    f"than one sequence of context + 1 = {context + 1} characters; use a text of at least "
                    f"{needed} characters or a shorter --context"
                )
        self.unigram_loss = unigram_cross_entropy(self.train_ids, self.validation_ids, len(vocabulary))


def load_corpus(path, context, vocabulary=None):
    """Read the text (the standard-library sources when path is None) and split it.

    A vocabulary (from a checkpoint) is used as given; otherwise it is built
    from the text.
    """
    if path is None:
        text, paths = stdlib_text()
        description = f"the standard-library sources ({len(paths)} files)"
    else:
        text = read_text(path)
        description = f"text file {str(path)!r}"
    vocabulary = CharVocabulary(text) if vocabulary is None else vocabulary
    return Corpus(text, description, vocabulary, context)


# --- the model -------------------------------------------------------------------------


def model_config(vocab_size, **settings):
    """Return a complete model configuration: MODEL_DEFAULTS updated by settings."""
    unknown = sorted(set(settings) - set(MODEL_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown model settings {unknown}; expected some of {sorted(MODEL_DEFAULTS)}")
    config = dict(MODEL_DEFAULTS, **settings, vocab_size=int(vocab_size))
    if config["max_length"] is None:
        config["max_length"] = config["context"]
    config["attention_options"] = dict(config["attention_options"])
    if config["max_length"] < config["context"]:
        raise ValueError(
            f"max_length={config['max_length']} is invalid; expected at least the context {config['context']}"
        )
    return config


def build_model(config, seed=0):
    """Build a DecoderLM from a configuration made by model_config."""
    dtype = np.dtype(config["dtype"])
    check_causal_method(config["attention"], config["attention_options"], config["context"], dtype, config["n_heads"])
    return DecoderLM(
        config["vocab_size"],
        config["max_length"],
        width=config["width"],
        n_heads=config["n_heads"],
        n_layers=config["n_layers"],
        attention=config["attention"],
        attention_options=config["attention_options"],
        rng=np.random.default_rng(seed),
        dtype=dtype,
    )


# --- training ----------------------------------------------------------------------------


def validation_windows(ids, context, count):
    """Return inputs and targets (W, N) of up to `count` evenly spaced windows of ids."""
    last_start = len(ids) - context - 1
    starts = np.unique(np.linspace(0, last_start, num=count).astype(np.int64))  # (W,)
    windows = np.stack([ids[start : start + context + 1] for start in starts])  # (W, N + 1)
    return windows[:, :-1], windows[:, 1:]


def evaluate(model, inputs, targets, batch_size):
    """Return the mean cross-entropy (nats per character) of the model on the windows."""
    was_training = model.training
    model.eval()
    total = 0.0
    for first in range(0, len(inputs), batch_size):
        logits, _ = model.forward(inputs[first : first + batch_size])
        loss, _ = cross_entropy_forward(logits, targets[first : first + batch_size])
        total += loss * len(inputs[first : first + batch_size])
    model.train(was_training)
    return total / len(inputs)


def update_attention_state(model, cache):
    """Let each block's attention method learn from its last forward (online k-means centroids).

    Methods with a state trained outside gradient descent offer
    update_centroids(attention_cache), and every other method is left alone.
    A routing method whose heads are all local has no centroids to move.

    NOTE: the Routing Transformer's commitment loss, which pulls queries and
    keys towards their centroids, is not added to the training loss.
    """
    for block, block_cache in zip(model.blocks, cache["blocks"]):
        attention = block.self_attention.attention
        all_local = getattr(attention, "local_heads", 0) >= block.self_attention.n_heads
        if callable(getattr(attention, "update_centroids", None)) and not all_local:
            mha_cache = block_cache["self_attention"][1]  # (norm, attention, dropout) caches of the sublayer
            attention.update_centroids(mha_cache[5])  # the attention method's own cache


def train(model, corpus, context, *, steps=None, time_budget=None, optimizer=None, seed=0, callback=None, **settings):
    """Train the model on windows of `context` characters for `steps` steps or `time_budget` seconds.

    Training stops at whichever budget runs out first.

    settings override TRAIN_DEFAULTS (batch_size, lr, max_grad_norm,
    eval_every, eval_windows). callback(event) receives a dict after every
    step ("kind": "step") and after every validation ("kind": "eval").
    Returns (history, optimizer): history lists every event, the last one a
    validation at the final step. Memory is the tracemalloc peak since the
    start of this call.
    """
    if steps is None and time_budget is None:
        raise ValueError("give steps or time_budget (or both); training needs a budget")
    if steps is not None and (not isinstance(steps, (int, np.integer)) or steps <= 0):
        raise ValueError(f"steps={steps!r} is invalid; expected a positive number of steps")
    if time_budget is not None and not time_budget > 0:
        raise ValueError(f"time_budget={time_budget!r} is invalid; expected a positive number of seconds")
    settings = dict(TRAIN_DEFAULTS, **settings)
    optimizer = Adam(settings["lr"]) if optimizer is None else optimizer
    rng = np.random.default_rng(seed)
    valid_inputs, valid_targets = validation_windows(corpus.validation_ids, context, settings["eval_windows"])
    params, grads = model.parameters(), model.gradients()

    started_tracing = not tracemalloc.is_tracing()
    if started_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    history = []
    start_time = time.perf_counter()
    step = 0
    try:
        while True:
            # 1. A batch of random training windows, at a random position offset.
            starts = rng.integers(0, len(corpus.train_ids) - context, size=settings["batch_size"])
            windows = np.stack([corpus.train_ids[s : s + context + 1] for s in starts])  # (B, N + 1)
            offset = int(rng.integers(0, model.max_length - context + 1))

            # 2. Forward, loss, backward, clipped Adam step.
            logits, cache = model.forward(windows[:, :-1], start=offset)  # (B, N, V)
            loss, loss_cache = cross_entropy_forward(logits, windows[:, 1:])
            model.zero_grad()
            model.backward(cross_entropy_backward(1.0, loss_cache), cache)
            method_params, method_grads = attention_parameters(model)
            all_params, all_grads = dict(params, **method_params), dict(grads, **method_grads)
            clip_grad_norm(all_grads, settings["max_grad_norm"])
            optimizer.step(all_params, all_grads)
            update_attention_state(model, cache)
            step += 1

            # 3. Report the step, and validate now and then and at the end.
            elapsed = time.perf_counter() - start_time
            done = (steps is not None and step >= steps) or (time_budget is not None and elapsed >= time_budget)
            event = {
                "kind": "step", "step": step, "steps": steps, "time_s": elapsed, "loss": float(loss),
                "tokens_per_s": step * settings["batch_size"] * context / elapsed,
                "peak_bytes": tracemalloc.get_traced_memory()[1],
            }
            history.append(event)
            if callback is not None:
                callback(event)
            if done or step % settings["eval_every"] == 0:
                validation_loss = evaluate(model, valid_inputs, valid_targets, settings["batch_size"])
                event = dict(event, kind="eval", validation_loss=validation_loss, unigram_loss=corpus.unigram_loss)
                history.append(event)
                if callback is not None:
                    callback(event)
            if done:
                break
    finally:
        if started_tracing:
            tracemalloc.stop()
    return history, optimizer


# --- sampling ----------------------------------------------------------------------------------


def generate_text(model, vocabulary, prompt, length, context, *, rng, temperature=1.0):
    """Continue prompt by `length` sampled characters; return the prompt and its continuation.

    Every step runs the model on a full window of `context` characters, the
    shape it was trained on, because some methods need a minimum length (a
    window, clusters or ring workers per key). A prompt shorter than the window
    is padded on the left with newlines (or the first character of the
    vocabulary when the text had no newline).
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} is invalid; expected a positive number")
    filler = "\n" if "\n" in vocabulary.index else vocabulary.characters[0]
    ids = vocabulary.encode(filler * max(0, context - len(prompt)) + prompt)  # (P,)
    first_new = len(ids)
    was_training = model.training
    model.eval()
    for _ in range(length):
        logits, _ = model.forward(ids[None, -context:])  # (1, N, V)
        scores = logits[0, -1].astype(np.float64) / temperature  # (V,)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        ids = np.append(ids, rng.choice(len(probs), p=probs))
    model.train(was_training)
    return prompt + vocabulary.decode(ids[first_new:])


# --- checkpoints --------------------------------------------------------------------------


def cache_dir():
    """Return the directory for saved models: $MINIATTN_CACHE, else ~/.cache/miniattn."""
    return pathlib.Path(os.environ.get("MINIATTN_CACHE") or pathlib.Path.home() / ".cache" / "miniattn")


def method_parameter_sets(attention):
    """Yield (label, dict of arrays) for the parameter sets an attention method keeps in ``params``.

    Transformer-XL's relative attention keeps u, v and W_r per (H, D) shape
    in ``params``; the label is "HxD". A flat dict of arrays gets the label "".
    """
    params = getattr(attention, "params", None)
    if not isinstance(params, dict):
        return
    if all(isinstance(value, np.ndarray) for value in params.values()):
        yield "", params
        return
    for key, arrays in params.items():
        if isinstance(arrays, dict) and isinstance(key, tuple):
            yield "x".join(str(part) for part in key), arrays


def is_array_table(value):
    """Return True for a non-empty dict from tuples of integers (or booleans) to arrays."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(key, tuple) and all(isinstance(part, (int, np.integer)) for part in key) for key in value)
        and all(isinstance(array, np.ndarray) for array in value.values())
    )


def attention_state(model):
    """Return the arrays each block's attention method keeps: "blocks.I/NAME" -> array.

    Those are the attributes that are arrays (random features, rotations,
    centroids) and the parameter sets in ``params`` ("blocks.I/params.HxD.u").
    """
    state = {}
    for index, block in enumerate(model.blocks):
        attention = block.self_attention.attention
        for attribute, value in vars(attention).items():
            if isinstance(value, np.ndarray):
                state[f"blocks.{index}/{attribute}"] = value
            elif attribute != "params" and is_array_table(value):
                # e.g. BigBird's random blocks per (H, nb, causal): "blocks.I/adjacency[2x16x1]"
                for key, array in value.items():
                    label = "x".join(str(int(part)) for part in key)
                    state[f"blocks.{index}/{attribute}[{label}]"] = array
        for label, arrays in method_parameter_sets(attention):
            for name, array in arrays.items():
                state[f"blocks.{index}/params.{label}.{name}"] = array
    return state


def load_attention_state(model, state):
    """Put arrays saved by attention_state back into the blocks' attention methods."""
    for key, value in state.items():
        block_name, _, attribute = key.partition("/")
        attention = model.blocks[int(block_name.split(".")[1])].self_attention.attention
        if attribute.endswith("]") and "[" in attribute:  # one entry of a table of arrays
            table_name, _, label = attribute[:-1].partition("[")
            key = tuple(int(part) for part in label.split("x"))  # True == 1 as a dict key
            getattr(attention, table_name)[key] = value
            continue
        if not attribute.startswith("params."):
            setattr(attention, attribute, value)
            continue
        label, _, name = attribute[len("params."):].rpartition(".")
        if label:
            shape_key = tuple(int(part) for part in label.split("x"))
            attention.params.setdefault(shape_key, {})[name] = value
        else:
            attention.params[name] = value


def attention_parameters(model):
    """Return (params, grads): the arrays attention methods learn with their own backward.

    After a backward, Transformer-XL's relative attention leaves the gradients
    of its u, v and W_r in ``grads``. They join the model's parameters here
    under "attention.blocks.I.NAME", so Adam trains them too.
    """
    params, grads = {}, {}
    for index, block in enumerate(model.blocks):
        attention = block.self_attention.attention
        method_grads = getattr(attention, "grads", None)
        if not isinstance(method_grads, dict):
            continue
        for label, arrays in method_parameter_sets(attention):
            if set(arrays) != set(method_grads):
                continue
            for name, grad in method_grads.items():
                if arrays[name].shape == grad.shape:
                    params[f"attention.blocks.{index}.{label}.{name}"] = arrays[name]
                    grads[f"attention.blocks.{index}.{label}.{name}"] = grad
    return params, grads


def save_checkpoint(path, model, config, vocabulary, optimizer=None, extra=None):
    """Write parameters, optimizer state, configuration and vocabulary to one .npz file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"param/{name}": value for name, value in model.state_dict().items()}
    if optimizer is not None:
        arrays.update({f"optimizer/{key}": value for key, value in optimizer.state_dict().items()})
    arrays.update({f"attention/{key}": value for key, value in attention_state(model).items()})
    arrays["config"] = np.array(json.dumps(config, sort_keys=True))
    arrays["vocabulary"] = np.array(vocabulary.characters)
    arrays["format"] = np.array(CHECKPOINT_FORMAT)
    arrays["extra"] = np.array(json.dumps(extra or {}))
    # np.savez adds .npz to a name without it; write to the exact name the caller gave.
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def read_checkpoint(path):
    """Read a checkpoint file; return (config, vocabulary, params, optimizer_state, attention, extra)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} not found; train one with python -m miniattn train --save {path}"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        raise ValueError(
            f"checkpoint {str(path)!r} is not a readable .npz file; expected a checkpoint written by "
            f"python -m miniattn train --save"
        ) from None
    if "config" not in arrays or "vocabulary" not in arrays:
        raise ValueError(
            f"checkpoint {str(path)!r} has no configuration or vocabulary; "
            f"expected a file written by python -m miniattn train"
        )
    config = json.loads(str(arrays["config"]))
    vocabulary = CharVocabulary(str(arrays["vocabulary"]))
    params = {key[len("param/"):]: value for key, value in arrays.items() if key.startswith("param/")}
    optimizer_state = {key[len("optimizer/"):]: value for key, value in arrays.items() if key.startswith("optimizer/")}
    attention = {key[len("attention/"):]: value for key, value in arrays.items() if key.startswith("attention/")}
    extra = json.loads(str(arrays["extra"])) if "extra" in arrays else {}
    return config, vocabulary, params, optimizer_state, attention, extra


def config_differences(saved, requested):
    """Return 'key: checkpoint X, requested Y' for every requested setting that differs."""
    differences = []
    for key, value in requested.items():
        if key in saved and normalise(saved[key]) != normalise(value):
            differences.append(f"{key}: checkpoint {saved[key]!r}, requested {value!r}")
    return differences


def normalise(value):
    """Make lists and tuples compare equal, as JSON turns tuples into lists."""
    if isinstance(value, (list, tuple)):
        return [normalise(item) for item in value]
    if isinstance(value, dict):
        return {key: normalise(item) for key, item in value.items()}
    return value


def load_checkpoint(path, requested=None):
    """Load a checkpoint; return (model, config, vocabulary, optimizer, extra).

    requested contains model settings the caller requested. Any that differ
    from the checkpoint's raise ValueError, which names each difference.
    """
    config, vocabulary, params, optimizer_state, attention, extra = read_checkpoint(path)
    differences = config_differences(config, requested or {})
    if differences:
        raise ValueError(
            f"checkpoint {str(path)!r} was trained with another configuration ({'; '.join(differences)}); "
            f"drop those options to use the checkpoint's, or train a new model without it"
        )
    model = build_model(config)
    try:
        model.load_state_dict(params)
    except ValueError as error:
        raise ValueError(f"checkpoint {str(path)!r} does not match its own configuration: {error}") from None
    load_attention_state(model, attention)
    optimizer = None
    if optimizer_state:
        optimizer = Adam(TRAIN_DEFAULTS["lr"])
        optimizer.load_state_dict(optimizer_state)
    return model, config, vocabulary, optimizer, extra


def describe_method(name):
    """Return 'YEAR name' for a registered method."""
    return f"{info(name).year} {name}"
