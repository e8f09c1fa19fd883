"""Layers, losses and optimizers that models are assembled from.

``functional`` holds the forward/backward pairs; the classes wrap them.
"""
