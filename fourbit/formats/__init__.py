"""Packed weight layouts, each a pure-torch pack/unpack pair with its layout spelled out in the module docstring.

uint4: group quantization into uint4 codes (the common starting point); awq: AutoAWQ "GEMM" checkpoints;
gptq: GPTQ v1 checkpoints; quick: our W4A16 kernel layout. Kernels take their tile constants from here.
"""
