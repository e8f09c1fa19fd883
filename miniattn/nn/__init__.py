"""Layers, losses, models and optimizers that models are assembled from.

``functional`` contains the forward/backward pairs. The classes wrap them and
own their parameters, as ``module`` describes.
"""

from .blocks import DecoderLayer, EncoderLayer
from .checks import check_all_layers, gradcheck_module
from .layers import (
    CrossEntropyLoss,
    Dropout,
    Embedding,
    FeedForward,
    LayerNorm,
    Linear,
    MultiHeadAttention,
)
from .models import DecoderLM, Transformer
from .module import Module
from .optim import SGD, Adam, clip_grad_norm

__all__ = [
    "Module",
    "Linear",
    "Embedding",
    "LayerNorm",
    "FeedForward",
    "Dropout",
    "MultiHeadAttention",
    "CrossEntropyLoss",
    "EncoderLayer",
    "DecoderLayer",
    "Transformer",
    "DecoderLM",
    "SGD",
    "Adam",
    "clip_grad_norm",
    "gradcheck_module",
    "check_all_layers",
]
