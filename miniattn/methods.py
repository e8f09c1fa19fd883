"""The registry of attention methods, in the order of their history.

Each entry names the method, its paper, its idea, the file that implements it
and its cost. ``load(name)`` imports the method's module and returns its
factory ``make_method(rng=None, **options)``, which builds an attention method
object with three calls:

    forward(q, k, v, mask=None, causal=False) -> (out, cache)
    backward(dout, cache) -> (dq, dk, dv)
    keys_seen(cache) -> bool array (..., N, M) of the keys each query attended,
                        or None when every allowed key takes part

q, k and v are (B, H, N, D), (B, H, M, D) and (B, H, M, D). A method that
cannot honour an argument (a general mask, say) raises instead of ignoring it.
MultiHeadAttention, ``python -m miniattn bench`` and ``tour`` use only these
calls, so a new method joins all three by adding its entry here.
"""

import importlib
import inspect
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MethodInfo:
    """One row of the history: what the method is and where it lives."""

    name: str
    year: int
    paper: str
    idea: str
    module: str
    time: str
    memory: str
    letters: str = ""

    @property
    def file(self):
        return self.module.replace(".", "/") + ".py"


METHODS = (
    MethodInfo(
        "transformer", 2017, "Vaswani et al., Attention Is All You Need",
        "scaled dot-product and multi-head attention (encoder, decoder, cross)",
        "miniattn.transformer", "O(N M D)", "O(N M)",
    ),
    MethodInfo(
        "sparse_transformer", 2019, "Child et al., Generating Long Sequences with Sparse Transformers",
        "factorized strided and fixed sparse patterns",
        "miniattn.sparse_transformer", "O(N sqrt(N) D)", "O(N sqrt(N))", "l stride, c summary width",
    ),
    MethodInfo(
        "transformer_xl", 2019, "Dai et al., Transformer-XL",
        "segment recurrence with cached memory, relative positions",
        "miniattn.transformer_xl", "O(N (N + Mem) D)", "O(N (N + Mem))", "Mem memory length",
    ),
    MethodInfo(
        "reformer", 2020, "Kitaev et al., Reformer: The Efficient Transformer",
        "angular LSH buckets, sorted chunks, shared QK, reversible layers",
        "miniattn.reformer", "O(K N log N D)", "O(K N c)", "K hash rounds, c chunk length",
    ),
    MethodInfo(
        "routing_transformer", 2020, "Roy et al., Efficient Content-Based Sparse Attention with Routing Transformers",
        "online k-means routing: attend within clusters",
        "miniattn.routing_transformer", "O(N^1.5 D)", "O(N^1.5)", "sqrt(N) clusters",
    ),
    MethodInfo(
        "longformer", 2020, "Beltagy et al., Longformer: The Long-Document Transformer",
        "sliding and dilated windows plus global tokens",
        "miniattn.longformer", "O(N (W + G) D)", "O(N (W + G))", "W window, G global tokens",
    ),
    MethodInfo(
        "bigbird", 2020, "Zaheer et al., Big Bird: Transformers for Longer Sequences",
        "block-sparse window + global + random blocks, bidirectional and causal",
        "miniattn.bigbird", "O(N (W + G + R) D)", "O(N (W + G + R))", "R random blocks",
    ),
    MethodInfo(
        "performer", 2020, "Choromanski et al., Rethinking Attention with Performers",
        "FAVOR+: positive orthogonal random features, linear time",
        "miniattn.performer", "O(N F D)", "O(N F + F D)", "F random features",
    ),
    MethodInfo(
        "ring_attention", 2024, "Liu et al., Ring Attention with Blockwise Transformers",
        "blockwise online softmax; key/value blocks passed around a ring",
        "miniattn.ring_attention", "O(N M D / P) per worker", "O((N / P) D) per worker", "P ring workers",
    ),
)

BY_NAME = {method.name: method for method in METHODS}


def method_names():
    """Return the registered method names in historical order."""
    return [method.name for method in METHODS]


def info(name):
    """Return the MethodInfo for name, or raise ValueError listing the known names."""
    if name not in BY_NAME:
        raise ValueError(f"unknown attention method {name!r}; expected one of {', '.join(BY_NAME)}")
    return BY_NAME[name]


def is_implemented(name):
    """Return True when the method's module exists and defines make_method."""
    try:
        module = importlib.import_module(info(name).module)
    except ModuleNotFoundError as error:
        if error.name == info(name).module:
            return False
        raise
    return hasattr(module, "make_method")


def implemented_methods():
    """Return the MethodInfo of every implemented method, in historical order."""
    return [method for method in METHODS if is_implemented(method.name)]


def load(name):
    """Return the factory make_method(rng=None, **options) of the named method."""
    if not is_implemented(name):
        raise ValueError(f"attention method {name!r} is registered but not implemented yet")
    return importlib.import_module(info(name).module).make_method


def make_method(name, rng=None, **options):
    """Build the named attention method object with the given options.

    An option the method does not take raises ValueError listing the ones it does.
    """
    factory = load(name)
    try:
        return factory(rng=rng, **options)
    except TypeError as error:
        # Python rejects an unknown keyword before the constructor runs, so rng is untouched.
        if "unexpected keyword argument" not in str(error):
            raise
    method_class = type(factory(rng=np.random.default_rng(0)))
    accepted = [
        parameter.name for parameter in inspect.signature(method_class.__init__).parameters.values()
        if parameter.name not in ("self", "rng") and parameter.kind is not parameter.VAR_KEYWORD
    ]
    unknown = sorted(set(options) - set(accepted))
    raise ValueError(
        f"attention method {name!r} has no option {', '.join(map(repr, unknown))}; "
        f"its options are {', '.join(accepted) or 'none'}"
    )
