"""Shared machinery: softmax, masks, validation, kernels and the gradient checker."""
