"""Quantized layers, the Linear factory the model uses to build its projections, and projection fusion."""
from .fuse import fuse_projections_
from .linear import W4A16Linear, linear_factory

__all__ = ["W4A16Linear", "fuse_projections_", "linear_factory"]
