"""AutoAWQ "GEMM" checkpoint layout (quant_method "awq", version "gemm").

    qweight int32 [K, N/8]  packed along the output dim: word c of row k holds W's columns 8c .. 8c+7
    qzeros  int32 [G, N/8]  the uint4 zeros packed the same way (symmetric weights store 8)
    scales  fp16  [G, N]
    W[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]

Nibble i (bits 4i..4i+3) of a word holds column 8c + AWQ_ORDER[i], AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7):
the interleave lets AutoAWQ's kernel turn (w >> 4i) & 0x000F000F into the fp16 pair of columns (2i, 2i+1).
Codes, scales and zeros here use our (N, K) / (N, G) orientation; packing transposes.
"""
from __future__ import annotations

import torch

from ..errors import FourbitError
from .uint4 import pack_nibbles, unpack_nibbles

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_awq(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None):
    """codes uint8 (N, K), scales (N, G), zeros uint8 (N, G) or None (symmetric)
    -> qweight int32 [K, N/8], qzeros int32 [G, N/8], scales fp16 [G, N]."""
    n, k = codes.shape
    if n % 8:
        raise FourbitError(f"the AWQ layout packs 8 output channels per int32: out_features={n} must be a "
                           f"multiple of 8 (pad the weight with zero rows first)")
    g = scales.shape[1]
    if tuple(scales.shape) != (n, g) or k % g or (zeros is not None and zeros.shape != scales.shape):
        raise FourbitError(f"codes {tuple(codes.shape)}, scales {tuple(scales.shape)} and zeros "
                           f"{None if zeros is None else tuple(zeros.shape)} do not describe one grouped weight")
    if zeros is None:
        zeros = torch.full((n, g), 8, dtype=torch.uint8, device=codes.device)
    qweight = pack_nibbles(codes.t().reshape(k, n // 8, 8), AWQ_ORDER)  # (K, N/8)
    qzeros = pack_nibbles(zeros.t().reshape(g, n // 8, 8), AWQ_ORDER)  # (G, N/8)
    return qweight, qzeros, scales.t().half().contiguous()  # scales (G, N)


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor):
    """Inverse of pack_awq -> codes uint8 (N, K), scales fp16 (N, G), zeros uint8 (N, G)."""
    k, n8 = qweight.shape
    g = qzeros.shape[0]
    if tuple(qzeros.shape) != (g, n8) or tuple(scales.shape) != (g, 8 * n8) or g == 0 or k % g:
        raise FourbitError(f"AWQ tensors do not match: qweight {tuple(qweight.shape)}, qzeros "
                           f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)}; expected [K, N/8], "
                           f"[K/g, N/8], [K/g, N] — check the checkpoint is AWQ version 'gemm'")
    codes = unpack_nibbles(qweight, AWQ_ORDER).reshape(k, 8 * n8)  # (K, N)
    zeros = unpack_nibbles(qzeros, AWQ_ORDER).reshape(g, 8 * n8)  # (G, N)
    return codes.t().contiguous(), scales.t().half().contiguous(), zeros.t().contiguous()
