"""Optimizers over flat parameter and gradient dicts, and gradient-norm clipping.

An optimizer's ``step(params, grads)`` takes two dicts with the same keys
(for example ``model.parameters()`` and ``model.gradients()``) and updates
every parameter array in place. Its state (momentum, moment estimates) is
kept per parameter name, so the same names must come back at every step.
For a parameter p with gradient g at step t = 1, 2, ...:

SGD with momentum mu and L2 weight decay lambda (PyTorch's formulation):

    g = g + lambda p
    u = mu u + g                    (u = g when mu = 0)
    p = p - lr u

Adam (Kingma and Ba, 2015) with bias correction, and decoupled weight decay
lambda (AdamW, Loshchilov and Hutter, 2019):

    m = beta1 m + (1 - beta1) g
    v = beta2 v + (1 - beta2) g^2
    m_hat = m / (1 - beta1^t),   v_hat = v / (1 - beta2^t)
    p = p - lr lambda p - lr m_hat / (sqrt(v_hat) + eps)

Adam's weight decay applies only to parameters with two or more axes
(weight matrices and embedding tables), not to biases or LayerNorm scales.
"""

import numpy as np

from ..core.validate import check_real


def check_step_dicts(params, grads):
    """Check that params and grads share keys and shapes."""
    if set(params) != set(grads):
        missing = sorted(set(params) - set(grads))
        extra = sorted(set(grads) - set(params))
        raise ValueError(f"params and grads must have the same keys; grads lacks {missing} and adds {extra}")
    for name, value in params.items():
        if not isinstance(value, np.ndarray):
            raise TypeError(f"parameter {name!r} must be a numpy.ndarray, got {type(value).__name__}")
        if grads[name].shape != value.shape:
            raise ValueError(f"gradient {name!r} has shape {grads[name].shape}; expected {value.shape}")


class Optimizer:
    """Shared state handling: per-name buffers and their saving and loading."""

    def __init__(self):
        self.state = {}  # buffer kind -> {parameter name -> array}
        self.step_count = 0

    def buffer(self, kind, name, like):
        """Return the buffer `kind` of parameter `name`, created as zeros on first use."""
        buffers = self.state.setdefault(kind, {})
        if name not in buffers:
            buffers[name] = np.zeros_like(like)
        elif buffers[name].shape != like.shape:
            raise ValueError(
                f"parameter {name!r} has shape {like.shape} but its optimizer state has shape {buffers[name].shape}; "
                f"use a new optimizer for a model of another shape"
            )
        return buffers[name]

    def state_dict(self):
        """Return a flat dict: "step" and "<kind>/<name>" -> copies of the buffers."""
        flat = {"step": np.array(self.step_count)}
        for kind, buffers in self.state.items():
            for name, value in buffers.items():
                flat[f"{kind}/{name}"] = value.copy()
        return flat

    def load_state_dict(self, flat):
        """Restore buffers saved by state_dict()."""
        if "step" not in flat:
            raise ValueError("optimizer state dict has no 'step' entry; expected one saved by state_dict()")
        self.step_count = int(flat["step"])
        self.state = {}
        for key, value in flat.items():
            if key == "step":
                continue
            kind, _, name = key.partition("/")
            self.state.setdefault(kind, {})[name] = np.array(value)


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and L2 weight decay."""

    def __init__(self, lr, *, momentum=0.0, weight_decay=0.0):
        super().__init__()
        check_real("lr", lr, minimum=0.0, open_interval=True)
        check_real("momentum", momentum, minimum=0.0, maximum=1.0)
        if momentum == 1.0:
            raise ValueError("momentum=1.0 is invalid; expected 0 <= momentum < 1")
        check_real("weight_decay", weight_decay, minimum=0.0)
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay

    def step(self, params, grads):
        """Update every array in params in place from grads."""
        check_step_dicts(params, grads)
        self.step_count += 1
        for name, param in params.items():
            grad = grads[name]
            if self.weight_decay:
                grad = grad + self.weight_decay * param
            if self.momentum:
                velocity = self.buffer("velocity", name, param)
                velocity *= self.momentum
                velocity += grad
                grad = velocity
            param -= self.lr * grad


class Adam(Optimizer):
    """Adam with bias correction and optional decoupled weight decay (AdamW)."""

    def __init__(self, lr=1e-3, *, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__()
        check_real("lr", lr, minimum=0.0, open_interval=True)
        if len(betas) != 2:
            raise ValueError(f"betas={betas!r} is invalid; expected two numbers (beta1, beta2)")
        check_real("beta1", betas[0], minimum=0.0, maximum=1.0)
        check_real("beta2", betas[1], minimum=0.0, maximum=1.0)
        if betas[0] == 1.0 or betas[1] == 1.0:
            raise ValueError(f"betas={betas!r} is invalid; expected both in [0, 1)")
        check_real("eps", eps, minimum=0.0, open_interval=True)
        check_real("weight_decay", weight_decay, minimum=0.0)
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay

    def step(self, params, grads):
        """Update every array in params in place from grads."""
        check_step_dicts(params, grads)
        self.step_count += 1
        t = self.step_count
        bias1 = 1.0 - self.beta1**t
        bias2 = 1.0 - self.beta2**t
        for name, param in params.items():
            grad = grads[name]
            m = self.buffer("m", name, param)
            v = self.buffer("v", name, param)

            # 1. Moment estimates.
            m *= self.beta1
            m += (1.0 - self.beta1) * grad
            v *= self.beta2
            v += (1.0 - self.beta2) * grad * grad

            # 2. Decoupled weight decay on weight matrices and embedding tables.
            if self.weight_decay and param.ndim >= 2:
                param *= 1.0 - self.lr * self.weight_decay

            # 3. Bias-corrected step.
            denominator = np.sqrt(v / bias2)
            denominator += self.eps
            param -= (self.lr / bias1) * m / denominator


def clip_grad_norm(grads, max_norm):
    """Scale every gradient in place so that their joint L2 norm is at most max_norm.

    Returns the norm before clipping.
    """
    check_real("max_norm", max_norm, minimum=0.0, open_interval=True)
    total = float(np.sqrt(sum(float(np.sum(np.square(grad, dtype=np.float64))) for grad in grads.values())))
    if total > max_norm:
        scale = max_norm / (total + 1e-12)
        for grad in grads.values():
            grad *= scale
    return total
