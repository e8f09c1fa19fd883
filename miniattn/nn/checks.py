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
