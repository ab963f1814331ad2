"""Quantized layers and the Linear factory the model uses to build its projections."""
from .linear import W4A16Linear, linear_factory

__all__ = ["W4A16Linear", "linear_factory"]
