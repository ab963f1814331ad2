"""Torch reference twins of the kernels: same signatures, plain torch, any device. Tests diff kernels against these."""
from __future__ import annotations

import torch

from ..formats.quick import unpack_quick


def w4a16_dequant_ref(qweight, scales, zeros, group_size: int, n: int, k: int) -> torch.Tensor:
    """W[n, k] = (q[n, k] - z[g, n]) * s[g, n] with g = k // group_size, in float32 -> (n, k).

    qweight int32 in the quick layout (formats/quick.py); scales (G, n) float; zeros (G, n) uint8 or None
    (symmetric: z = 8); group_size -1 = one group per output channel.
    """
    gs = k if group_size == -1 else group_size
    q = unpack_quick(qweight, n, k).float()  # (n, k)
    s = scales.float().repeat_interleave(gs, dim=0)[:k].t()  # (n, k)
    z = 8.0 if zeros is None else zeros.float().repeat_interleave(gs, dim=0)[:k].t()
    return (q - z) * s


def w4a16_gemm_ref(x, qweight, scales, zeros, group_size: int, n: int, k: int, bias=None) -> torch.Tensor:
    """Y = X · dequant(W)ᵀ (+ bias). x (M, k) -> (M, n) in x's dtype.

    The dequantized weight is rounded once to x's dtype and the product accumulates as torch's matmul does
    for that dtype (float32 accumulation for fp16/bf16), which is what the GPU kernel computes.
    """
    w = w4a16_dequant_ref(qweight, scales, zeros, group_size, n, k).to(x.dtype)
    y = x @ w.t()
    return y if bias is None else y + bias.to(x.dtype)
