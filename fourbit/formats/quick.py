"""The "quick" W4A16 kernel layout, version 2: uint4 codes stored so that each thread's two 128-bit loads,
after in-register dequantization, are its A operands of mma.m16n8k16 / wgmma (QUICK, Kim et al. 2024, with
the weight as the *A* operand: the kernel computes Yᵀ = W·Xᵀ, so decode batch sizes fill the mma's n = 8).

Codes C (N, K) are zero-padded to Np = multiple of N_TILE = 16 rows and Kp = multiple of K_TILE = 128
columns (padded activations are zero and padded rows are never written, so the padding never shows).
One tile (nb, kc) covers rows 16 nb .. 16 nb + 15 and columns 128 kc .. 128 kc + 127 = 2048 codes = 256
words: 32 lanes x 8 words, 8 codes per word. Indices decompose as

    n = 16 nb + 8 rh + g                                   g in 0..7, rh in 0..1
    k = 128 kc + 16 i + 8 ch + 2 t + e,   i = 4 h + a       t, a in 0..3; e, ch, h in 0..1
    lane = 4 g + t,   word r = 4 h + 2 ch + rh,   nibble p = 4 e + a   (bits 4p .. 4p+3)

Why: the kernel multiplies the tile as eight k16 slices i (A = W[:, 16i .. 16i+15], B = X's same columns,
so X needs no reordering). In an m16n8k16 A fragment lane l = 4g + t holds row g, columns 2t, 2t+1 in
register 0, row g+8 in register 1, and columns + 8 in registers 2 and 3: register j = 2 ch + rh. Word r of
a lane therefore carries the (e = 0, 1) column pair of register j = r % 4 for the four slices i of half
h = r // 4, and (w >> 4a) & 0x000F000F puts that pair in the low / high halves of one 32-bit register:
OR 0x64006400 (fp16 1024 + q) or 0x43004300 (bf16 128 + q), subtract the same constant plus z, and it is
register j of slice i = 4h + a. The same per-warp fragment is wgmma's register A operand.

Storage: qweight int32 (Np / 16, Kp / 128 * 256). Row nb holds its tiles kc = 0, 1, ... in order; each tile
is 256 words, lane-major, each lane's 8 words contiguous (two 128-bit loads, r = 0..3 then 4..7):

    row nb: | kc=0: lane0[r0 .. r7] lane1[r0 .. r7] ... lane31[r0 .. r7] | kc=1: ... |
"""
from __future__ import annotations

import torch

from ..errors import FourbitError
from .uint4 import pack_nibbles, pad_to, unpack_nibbles

N_TILE = 16  # output channels per tile (the mma m, with W as the A operand)
K_TILE = 128  # input channels per tile: 32 lanes x 8 words x 8 codes / N_TILE
WORDS_PER_TILE = N_TILE * K_TILE // 8
VERSION = 2


def qweight_shape(n: int, k: int) -> tuple[int, int]:
    return -(-n // N_TILE), -(-k // K_TILE) * WORDS_PER_TILE


def gated_halves(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A gated layer's output (M, n) (nn/fuse.W4A16GatedLinear: in every N_TILE channels, 8 gate channels and then
    their 8 up channels) -> (gate, up), strided (M, n / 16, 8) views."""
    pairs = y.view(y.shape[0], y.shape[1] // N_TILE, 2, N_TILE // 2)
    return pairs[:, :, 0], pairs[:, :, 1]


def pack_quick(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 (N, K) -> qweight int32 (ceil(N / 16), ceil(K / 128) * 256)."""
    c = pad_to(pad_to(codes, 0, N_TILE), 1, K_TILE)  # (Np, Kp)
    nb, kc = c.shape[0] // N_TILE, c.shape[1] // K_TILE
    c = c.reshape(nb, 2, 8, kc, 2, 4, 2, 4, 2)  # (nb, rh, g, kc, h, a, ch, t, e)
    c = c.permute(0, 3, 2, 7, 4, 6, 1, 8, 5)  # (nb, kc, g, t, h, ch, rh, e, a)
    return pack_nibbles(c.reshape(nb, kc * WORDS_PER_TILE, 8))  # nibble p = 4e + a


def unpack_quick(qweight: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of pack_quick: qweight int32 (ceil(n / 16), ceil(k / 128) * 256) -> codes uint8 (n, k)."""
    shape = qweight_shape(n, k)
    if tuple(qweight.shape) != shape:
        raise FourbitError(f"quick qweight has shape {tuple(qweight.shape)} but a ({n}, {k}) weight packs to "
                           f"{shape}: check out_features/in_features against the checkpoint")
    nb, kc = shape[0], shape[1] // WORDS_PER_TILE
    c = unpack_nibbles(qweight).reshape(nb, kc, 8, 4, 2, 2, 2, 2, 4)  # (nb, kc, g, t, h, ch, rh, e, a)
    c = c.permute(0, 6, 2, 1, 4, 8, 5, 3, 7)  # (nb, rh, g, kc, h, a, ch, t, e)
    return c.reshape(nb * N_TILE, kc * K_TILE)[:n, :k].contiguous()
