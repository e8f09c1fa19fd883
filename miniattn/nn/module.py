"""The parameter convention every layer and model follows.

A ``Module`` owns two dicts of the same keys: ``params`` (name -> array) and
``grads`` (name -> array of the same shape and dtype). Child modules are
registered by name, and their parameters appear in the flat views under
dotted names, for example ``decoder.0.cross_attention.W_k``:

    model.parameters()   # flat dict name -> the live parameter arrays
    model.gradients()    # flat dict name -> the live gradient arrays
    model.state_dict()   # flat dict name -> copies, ready for np.savez

A layer's ``forward(...)`` returns ``(y, cache)``. Its ``backward(dy, cache)``
returns the gradients of the inputs and adds the parameter gradients into
``grads``, so that a module called several times (or a parameter reached by
several paths) accumulates them. ``zero_grad()`` clears them in place, so a
dict returned by ``gradients()`` stays valid across steps. Everything a
backward needs travels in the cache; a module stores nothing per call.

Optimizers in ``miniattn.nn.optim`` take the two flat dicts and update the
parameter arrays in place, keyed by name.
"""

import numpy as np

from ..core.validate import check_float_array


def check_dtype(dtype):
    """Return dtype as a numpy dtype, rejecting anything but float32 and float64."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype={dtype} is invalid; expected float32 or float64")
    return dtype


def check_input(name, x, dtype, width=None):
    """Check that x is a finite float array of the module's dtype (and last axis `width`)."""
    check_float_array(name, x)
    if x.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the module's parameters are {dtype}; "
            f"convert with {name}.astype(np.{dtype})"
        )
    if width is not None and x.shape[-1] != width:
        raise ValueError(f"{name} has shape {x.shape}; expected a last axis of width {width}")


class Module:
    """Base class: named parameters with gradients, named children, train/eval mode."""

    def __init__(self):
        self.params = {}
        self.grads = {}
        self.children = {}
        self.training = True

    # --- registration ----------------------------------------------------------

    def add_parameter(self, name, value):
        """Register a parameter array and its zero gradient; return the array."""
        if "." in name:
            raise ValueError(f"parameter name {name!r} is invalid; dots separate module names")
        self.params[name] = value
        self.grads[name] = np.zeros_like(value)
        return value

    def add_module(self, name, module):
        """Register a child module under name; return the child."""
        if not isinstance(module, Module):
            raise TypeError(f"module {name!r} must be a Module, got {type(module).__name__}")
        self.children[name] = module
        return module

    # --- flat views --------------------------------------------------------------

    def named_modules(self, prefix=""):
        """Yield (dotted prefix, module) for this module and every descendant."""
        yield prefix, self
        for name, child in self.children.items():
            yield from child.named_modules(f"{prefix}{name}.")

    def parameters(self):
        """Return the flat dict name -> parameter array (the arrays themselves, not copies)."""
        return {
            prefix + name: value
            for prefix, module in self.named_modules()
            for name, value in module.params.items()
        }

    def gradients(self):
        """Return the flat dict name -> gradient array, with the keys of parameters()."""
        return {
            prefix + name: value
            for prefix, module in self.named_modules()
            for name, value in module.grads.items()
        }

    def parameter_count(self):
        """Return the total number of parameter entries."""
        return sum(value.size for value in self.parameters().values())

    def zero_grad(self):
        """Set every gradient to zero, in place."""
        for _, module in self.named_modules():
            for grad in module.grads.values():
                grad.fill(0)

    def set_parameter(self, name, value):
        """Replace the array of the flat parameter `name` by `value` (same shape)."""
        owner, local = self._owner(name)
        if value.shape != owner.params[local].shape:
            raise ValueError(f"{name} has shape {owner.params[local].shape}; got {value.shape}")
        owner.params[local] = value

    def _owner(self, name):
        for prefix, module in self.named_modules():
            if name.startswith(prefix) and name[len(prefix):] in module.params:
                return module, name[len(prefix):]
        raise KeyError(f"no parameter named {name!r}")

    # --- mode -----------------------------------------------------------------------

    def train(self, mode=True):
        """Switch this module and its children to training mode (dropout active)."""
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self):
        """Switch to evaluation mode: dropout passes its input through unchanged."""
        return self.train(False)

    # --- saving and loading -------------------------------------------------------------

    def state_dict(self):
        """Return a flat dict name -> copy of every parameter, ready for np.savez."""
        return {name: value.copy() for name, value in self.parameters().items()}

    def load_state_dict(self, state):
        """Copy the arrays of a state dict into the parameters, in place.

        Every parameter must be present with its exact shape, and no extra key
        is allowed; otherwise ValueError names the keys. Values are converted
        to the module's dtype.
        """
        params = self.parameters()
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(
                f"state dict does not match the model: missing keys {missing}, unexpected keys "
                f"{unexpected}; was it saved from a model with another configuration?"
            )
        wrong = [
            f"{name}: saved {np.shape(state[name])}, model {value.shape}"
            for name, value in params.items()
            if np.shape(state[name]) != value.shape
        ]
        if wrong:
            raise ValueError("state dict shapes do not match the model: " + "; ".join(wrong))
        for name, value in params.items():
            value[...] = state[name]

    def save(self, path):
        """Write the state dict to an .npz file (np.savez adds .npz to a name without it)."""
        np.savez(path, **self.state_dict())

    def load(self, path):
        """Read parameters saved by save(path)."""
        with np.load(path) as data:
            self.load_state_dict({name: data[name] for name in data.files})
        return self
