"""Gradient checks of whole modules: inputs and every parameter at once.

``miniattn.gradcheck`` checks a pair of functions of arrays. A module keeps
its parameters inside, so ``gradcheck_module`` appends them to the inputs:
for each perturbed parameter it installs the perturbed array in the module,
runs the forward, and reads the hand-written parameter gradients from
``module.gradients()`` after the backward.
"""

import numpy as np

from ..core.gradcheck import gradcheck


def gradcheck_module(module, forward, backward, inputs=(), *, input_names=None, parameter_names=None, **options):
    """Check the input and parameter gradients of a module against finite differences.

    Inputs:
    - module: a float64 Module
    - forward: callable(*inputs) -> (out, cache) that calls the module
    - backward: callable(dout, cache) -> one gradient per input; with no float
      inputs (token ids closed over, say) it may return () or None
    - inputs: float64 arrays, the differentiable inputs
    - input_names: names for the inputs in the report
    - parameter_names: flat parameter names to check; all of them by default
    - options: passed on to miniattn.gradcheck (rng, eps, max_elementwise, n_directions)

    Returns the GradcheckResult; rows are the inputs, then the parameters by name.
    """
    parameters = module.parameters()
    names = list(parameters) if parameter_names is None else list(parameter_names)
    for name in names:
        if name not in parameters:
            raise ValueError(f"module has no parameter {name!r}; expected one of {sorted(parameters)}")
        if parameters[name].dtype != np.float64:
            raise TypeError(
                f"parameter {name!r} has dtype {parameters[name].dtype}; gradient checks need a float64 module"
            )
    inputs = list(inputs)
    input_names = [f"input{index}" for index in range(len(inputs))] if input_names is None else list(input_names)
    n_inputs = len(inputs)

    def forward_all(*arrays):
        for name, value in zip(names, arrays[n_inputs:]):
            module.set_parameter(name, value)
        return forward(*arrays[:n_inputs])

    def backward_all(dout, cache):
        module.zero_grad()
        input_grads = backward(dout, cache)
        if input_grads is None:
            input_grads = ()
        elif n_inputs == 1 and not isinstance(input_grads, (tuple, list)):
            input_grads = (input_grads,)
        gradients = module.gradients()
        return tuple(input_grads) + tuple(gradients[name].copy() for name in names)

    try:
        return gradcheck(
            forward_all,
            backward_all,
            inputs + [parameters[name] for name in names],
            names=input_names + names,
            **options,
        )
    finally:
        for name in names:
            module.set_parameter(name, parameters[name])


def check_all_layers(rng=None):
    """Gradient-check every layer class and both models on tiny float64 inputs.

    Returns a list of (label, GradcheckResult), one per layer or model, for a
    command line to print. Models are checked on their mean cross-entropy
    loss with GELU (a directional step can cross a ReLU kink) and eps = 3e-6
    (the rounding noise of a loss near 2 would reach 1e-6 of its smallest
    gradient entries at eps = 1e-6).
    """
    from ..core.masks import padding_mask
    from .blocks import DecoderLayer, EncoderLayer
    from .functional import cross_entropy_backward, cross_entropy_forward
    from .layers import Dropout, Embedding, FeedForward, LayerNorm, Linear, MultiHeadAttention
    from .models import DecoderLM, Transformer

    rng = np.random.default_rng(0) if rng is None else rng
    model_options = dict(eps=3e-6, max_elementwise=16)
    results = []

    def run(label, module, forward, backward, inputs=(), input_names=None, **options):
        result = gradcheck_module(module, forward, backward, inputs, input_names=input_names, rng=rng, **options)
        results.append((label, result))

    linear = Linear(4, 5, rng=rng)
    run("Linear", linear, linear.forward, linear.backward, [rng.standard_normal((2, 3, 4))], ["x"])

    embedding = Embedding(6, 4, rng=rng)
    ids = np.array([[0, 3, 3, 5], [3, 1, 0, 0]])
    run("Embedding", embedding, lambda: embedding.forward(ids), embedding.backward)

    norm = LayerNorm(5)
    run("LayerNorm", norm, norm.forward, norm.backward, [rng.standard_normal((2, 3, 5))], ["x"])

    for activation in ("relu", "gelu"):
        feed_forward = FeedForward(4, 6, activation=activation, rng=rng)
        run(f"FeedForward ({activation})", feed_forward, feed_forward.forward, feed_forward.backward,
            [rng.standard_normal((2, 3, 4))], ["x"])

    generator = np.random.default_rng(1)
    dropout = Dropout(0.3, rng=generator)
    state = generator.bit_generator.state

    def dropout_forward(x):
        generator.bit_generator.state = state  # the same mask at every step
        return dropout.forward(x)

    run("Dropout (p=0.3)", dropout, dropout_forward, dropout.backward, [rng.standard_normal((2, 3, 4))], ["x"])

    attention = MultiHeadAttention(4, 2, rng=rng)
    x_q, x_kv = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4))
    source_mask = padding_mask(np.array([5, 3]), 5)
    run("MultiHeadAttention cross (N=3, M=5, padding)", attention,
        lambda x_q, x_kv: attention.forward(x_q, x_kv, mask=source_mask), attention.backward,
        [x_q, x_kv], ["x_q", "x_kv"])
    run("MultiHeadAttention causal (N=3, M=5)", attention,
        lambda x_q, x_kv: attention.forward(x_q, x_kv, causal=True), attention.backward,
        [x_q, x_kv], ["x_q", "x_kv"])

    for pre_ln in (False, True):
        order = "pre-LN" if pre_ln else "post-LN"
        encoder = EncoderLayer(4, 2, 6, pre_ln=pre_ln, rng=rng)
        run(f"EncoderLayer {order}", encoder,
            lambda x: encoder.forward(x, mask=source_mask), encoder.backward,
            [rng.standard_normal((2, 5, 4))], ["x"])
        decoder = DecoderLayer(4, 2, 6, pre_ln=pre_ln, rng=rng)
        run(f"DecoderLayer {order}", decoder,
            lambda x, memory: decoder.forward(x, memory, memory_mask=source_mask), decoder.backward,
            [x_q, x_kv], ["x", "memory"])

    transformer = Transformer(
        7, 9, width=8, n_heads=2, ff_width=12, n_encoder_layers=1, n_decoder_layers=2, activation="gelu", rng=rng
    )
    src, tgt = rng.integers(0, 7, (2, 5)), rng.integers(0, 9, (2, 4))
    targets = rng.integers(0, 9, (2, 4))
    targets[1, 2:] = -1  # padded target positions are left out of the loss
    lengths = dict(src_lengths=np.array([5, 3]), tgt_lengths=np.array([4, 2]))

    def transformer_forward():
        logits, cache = transformer.forward(src, tgt, **lengths)
        loss, loss_cache = cross_entropy_forward(logits, targets, ignore_index=-1)
        return loss, (cache, loss_cache)

    def transformer_backward(dloss, caches):
        transformer.backward(cross_entropy_backward(dloss, caches[1]), caches[0])

    run("Transformer loss (N=4, M=5, padding)", transformer, transformer_forward, transformer_backward,
        **model_options)

    language_model = DecoderLM(6, 8, width=8, n_heads=2, n_layers=2, ff_width=12, rng=rng)
    tokens = rng.integers(0, 6, (2, 6))

    def lm_forward():
        logits, cache = language_model.forward(tokens[:, :-1])
        loss, loss_cache = cross_entropy_forward(logits, tokens[:, 1:])
        return loss, (cache, loss_cache)

    def lm_backward(dloss, caches):
        language_model.backward(cross_entropy_backward(dloss, caches[1]), caches[0])

    run("DecoderLM loss", language_model, lm_forward, lm_backward, **model_options)
    return results
