"""miniattn: efficient attention from the 2017 Transformer to Ring Attention, in NumPy.

Every method has a forward pass, a hand-written backward pass and a
finite-difference gradient check. Start with ``python -m miniattn tour`` or
``python -m miniattn list``.
"""

from .core.gradcheck import GradcheckResult, gradcheck
from .core.kernels import backend
from .methods import make_method, method_names

__version__ = "0.1.0"

__all__ = ["gradcheck", "GradcheckResult", "backend", "make_method", "method_names", "__version__"]
