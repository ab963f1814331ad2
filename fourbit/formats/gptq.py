"""GPTQ "v1" checkpoint layout (AutoGPTQ / GPTQModel checkpoint_format "gptq", the one vLLM and transformers read).

    qweight int32 [K/8, N]  packed along the INPUT dim: nibble j (bits 4j..4j+3) of word [r, n] holds code q[n, 8r + j]
    qzeros  int32 [G, N/8]  zero - 1, packed along the output dim: nibble j of word [g, c] holds z[8c + j, g] - 1
    scales  fp16  [G, N]
    g_idx   int32 [K]       the group of each input channel: k // group_size, or any grouping with act-order (desc_act)
    W[n, k] = (q[n, k] - z[n, g_idx[k]]) * s[n, g_idx[k]]

Nibbles are in natural order (no interleave, unlike AWQ). "v1" stores zero - 1 and every v1 reader adds the 1 back,
so a stored nibble of 15 means zero 16 and zero 0 cannot be stored at all (AutoGPTQ's packer wraps its -1 into the
neighbouring nibbles; GPTQModel's "gptq_v2" format, which stores the zero itself, exists to fix that). unpack_gptq
therefore returns zeros in 1..16 (uint8), and pack_gptq refuses zero 0. Symmetric GPTQ stores 7 (zero 8).

Codes, scales and zeros here use our (N, K) / (N, G) orientation; packing transposes.
"""
from __future__ import annotations

import torch

from ..errors import FourbitError
from .uint4 import pack_nibbles, unpack_nibbles


def default_g_idx(k: int, group_size: int, device=None) -> torch.Tensor:
    """g_idx without act-order: channel k is in group k // group_size (group_size -1: all in group 0) -> int32 (K,)."""
    gs = k if group_size == -1 else group_size
    return (torch.arange(k, device=device) // gs).to(torch.int32)


def pack_gptq(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, g_idx: torch.Tensor):
    """codes uint8 (N, K), scales (N, G), zeros uint8 (N, G) in 1..16 or None (symmetric: 8), g_idx (K,)
    -> qweight int32 [K/8, N], qzeros int32 [G, N/8], scales fp16 [G, N], g_idx int32 [K]."""
    n, k = codes.shape
    g = scales.shape[1]
    if k % 8 or n % 8:
        raise FourbitError(f"the GPTQ layout packs 8 input channels per int32 of qweight and 8 output channels per "
                           f"int32 of qzeros: in_features={k} and out_features={n} must both be multiples of 8")
    if tuple(scales.shape) != (n, g) or (zeros is not None and zeros.shape != scales.shape) or g_idx.shape != (k,):
        raise FourbitError(f"codes {tuple(codes.shape)}, scales {tuple(scales.shape)}, zeros "
                           f"{None if zeros is None else tuple(zeros.shape)} and g_idx {tuple(g_idx.shape)} do not "
                           f"describe one grouped weight")
    if k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= g):
        raise FourbitError(f"g_idx holds groups {int(g_idx.min())}..{int(g_idx.max())} but there are {g} scale groups")
    if zeros is None:
        zeros = torch.full((n, g), 8, dtype=torch.uint8, device=codes.device)
    if zeros.numel() and (int(zeros.min()) < 1 or int(zeros.max()) > 16):
        raise FourbitError(f"GPTQ v1 stores zero - 1 in 4 bits, so zero points must lie in 1..16; this weight has "
                           f"{int(zeros.min())}..{int(zeros.max())} (zero 0 comes from a group with no negative "
                           f"weight): export it as AWQ instead")
    qweight = pack_nibbles(codes.t().reshape(k // 8, 8, n).transpose(1, 2))  # (K/8, N)
    qzeros = pack_nibbles((zeros - 1).t().reshape(g, n // 8, 8))  # (G, N/8)
    return qweight, qzeros, scales.t().half().contiguous(), g_idx.to(torch.int32).contiguous()


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None = None,
                group_size: int | None = None):
    """Inverse of pack_gptq -> codes uint8 (N, K), scales fp16 (N, G), zeros uint8 (N, G) in 1..16, g_idx int64 (K,).

    Without g_idx (old checkpoints) the groups are k // group_size; group_size -1 means one group.
    """
    k8, n = qweight.shape
    g = scales.shape[0]
    if tuple(scales.shape) != (g, n) or tuple(qzeros.shape) != (g, n // 8) or n % 8 or g == 0:
        raise FourbitError(f"GPTQ tensors do not match: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                           f"scales {tuple(scales.shape)}; expected [K/8, N], [G, N/8], [G, N] — check the checkpoint "
                           f"is 4-bit GPTQ v1 (checkpoint_format 'gptq')")
    k = 8 * k8
    if g_idx is None:
        if group_size is None:
            raise FourbitError("a GPTQ weight without g_idx needs its group_size")
        g_idx = default_g_idx(k, group_size, qweight.device)
    if tuple(g_idx.shape) != (k,) or (k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= g)):
        raise FourbitError(f"GPTQ g_idx of shape {tuple(g_idx.shape)} does not index the {g} groups of {k} input "
                           f"channels: the checkpoint is damaged or not GPTQ v1")
    codes = unpack_nibbles(qweight).transpose(1, 2).reshape(k, n)  # (K, N)
    zeros = unpack_nibbles(qzeros).reshape(g, n) + 1  # (G, N), 1..16
    return codes.t().contiguous(), scales.t().half().contiguous(), zeros.t().contiguous(), g_idx.long()
