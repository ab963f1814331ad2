"""The "quick" W4A16 kernel layout, version 1: uint4 codes interleaved so that one 128-bit load per thread,
after in-register dequantization, is that thread's B operand of mma.m16n8k16 (QUICK, Kim et al. 2024).

Codes C (N, K) are zero-padded to Np = multiple of N_TILE = 8 rows and Kp = multiple of K_TILE = 128
columns (padded activations are zero and padded rows are never written, so the padding never shows).
One tile (nt, kc) covers rows 8nt .. 8nt+7 and columns 128kc .. 128kc+127 = 1024 codes = 128 words:
32 lanes x 4 words (j = 0..3), 8 codes per word. Indices decompose as

    n = 8 nt + nl                                     nl in 0..7
    k = 128 kc + 32 j + 16 f + 8 h + 2 q + b          j in 0..3, f, h, b in 0..1, q in 0..3
    lane = 4 nl + q,   element e = 4 f + 2 h + b      of word j of that lane

In an m16n8k16 B fragment lane l holds n = l // 4 and k = 2 (l % 4) + {0, 1} (register b0) and the same
+ 8 (register b1): that is (nl, q, b, h). f picks one of two k16 fragments, j one of four k32 chunks.
Nibble i (bits 4i..4i+3) of a word holds element ORDER[i]:

    bits:     31..28 27..24 23..20 19..16 | 15..12 11..8 7..4 3..0
    element:     7      5      3      1   |    6     4    2    0

so (w >> 4i) & 0x000F000F has elements (2i, 2i+1) in its low / high 16-bit halves; OR 0x64006400 makes
the fp16 pair 1024 + q, and subtracting 1024 + z, times s, gives register b_h of fragment f, (f, h) = divmod(i, 2).

Storage: qweight int32 (Np / 8, Kp). Row nt holds its tiles kc = 0, 1, ... in order; each tile is 128 words,
lane-major, each lane's 4 words (j = 0..3) contiguous, i.e. qweight[nt, 128 kc + 4 lane + j]:

    row nt: | kc=0: lane0[j0 j1 j2 j3] lane1[j0 .. j3] ... lane31[j0 .. j3] | kc=1: ... |
"""
from __future__ import annotations

import torch

from ..errors import FourbitError
from .uint4 import pack_nibbles, pad_to, unpack_nibbles

N_TILE = 8  # output channels per tile (the mma n)
K_TILE = 128  # input channels per tile: 32 lanes x 4 words x 8 codes / N_TILE
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # element held by nibble i
VERSION = 1


def pack_quick(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 (N, K) -> qweight int32 (ceil(N / 8), ceil(K / 128) * 128)."""
    c = pad_to(pad_to(codes, 0, N_TILE), 1, K_TILE)  # (Np, Kp)
    np_, kp = c.shape
    nt, kc = np_ // N_TILE, kp // K_TILE
    c = c.reshape(nt, 8, kc, 4, 2, 2, 4, 2)  # (nt, nl, kc, j, f, h, q, b)
    c = c.permute(0, 2, 1, 6, 3, 4, 5, 7)  # (nt, kc, nl, q, j, f, h, b)
    words = pack_nibbles(c.reshape(nt, kc, 32, 4, 8), ORDER)  # (nt, kc, lane, j)
    return words.reshape(nt, kp)


def unpack_quick(qweight: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of pack_quick: qweight int32 (ceil(n / 8), ceil(k / 128) * 128) -> codes uint8 (n, k)."""
    nt, kp = -(-n // N_TILE), -(-k // K_TILE) * K_TILE
    if tuple(qweight.shape) != (nt, kp):
        raise FourbitError(f"quick qweight has shape {tuple(qweight.shape)} but a ({n}, {k}) weight packs to "
                           f"({nt}, {kp}): check out_features/in_features against the checkpoint")
    kc = kp // K_TILE
    e = unpack_nibbles(qweight.reshape(nt, kc, 32, 4), ORDER)  # (nt, kc, lane, j, e)
    c = e.reshape(nt, kc, 8, 4, 4, 2, 2, 2)  # (nt, kc, nl, q, j, f, h, b)
    c = c.permute(0, 2, 1, 4, 5, 6, 3, 7)  # (nt, nl, kc, j, f, h, q, b)
    return c.reshape(nt * N_TILE, kp)[:n, :k].contiguous()


def interleave_k(x: torch.Tensor) -> torch.Tensor:
    """Activations (M, K) -> (M, Kp), zero-padded, with columns in the order a row's words unpack to.

    Within each 128-wide tile, output channel n's 16 words are w = 4q + j and nibble i of a word is
    i = 4b + 2f + h (ORDER inverted), so column 8w + i holds k = 32j + 16f + 8h + 2q + b. A kernel that unpacks
    the words in storage order multiplies them by these columns and never moves the weights.
    """
    xp = pad_to(x, 1, K_TILE)
    m, kp = xp.shape
    xp = xp.reshape(m, kp // K_TILE, 4, 2, 2, 4, 2)  # (m, kc, j, f, h, q, b)
    return xp.permute(0, 1, 5, 2, 6, 3, 4).reshape(m, kp)  # (m, kc, q, j, b, f, h)
