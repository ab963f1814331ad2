"""Quantization algorithms: each turns a float weight into uint4 codes + group parameters."""
