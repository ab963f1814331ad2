"""W4A16 GEMM (Triton): Y (M, N) = X (M, K) · dequant(W)ᵀ (+ bias), X fp16/bf16, output in X's dtype.

W is uint4 codes in the quick layout (formats/quick.py): qweight int32 (ceil(N/8), Kp), Kp = ceil(K/128)·128,
W[n, k] = (q[n, k] - z[g, n]) · s[g, n] with g = k // group_size (z = 8 when symmetric), scales fp16 (G, N).

Reading the layout tile by tile: for one 128-wide k tile kc, output channel n owns the 16 consecutive words
qweight[n // 8, 128·kc + 16·(n % 8) + (4q + j)], q, j in 0..3, and nibble i of word (q, j) holds
k = 128·kc + 32·j + 16·((i % 4) // 2) + 8·(i % 2) + 2·q + i // 4   (formats/quick.py, with ORDER inverted).
So a [BLOCK_N, 16·T] block of words unpacks to a [BLOCK_N, 128·T] weight block whose columns are a fixed
permutation of k; the kernel loads X's columns in the same permuted order instead of moving the weights.

Version 1 (this file): dequantize in fp32 registers, `tl.dot` with the weight as the B operand (Triton stages
it through shared memory), split-K with fp32 atomics for small M. Configs by M below; no autotuning yet.
Measured on an H200 (2026-11-21, benchmarks/results/h200-w4a16.md): correct, but 0.4-0.6x cuBLAS bf16 at
M <= 16 and 0.05-0.07x at M >= 256, far from the targets: this is the baseline the Gluon kernel must beat.
Tried and dropped: unpacking through 2-D tensors only (each unpacked column re-reading its word, so no
reshape moves registers) ran 5-10x slower still: the 8x load instructions cost more than the reshapes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.quick import K_TILE


@triton.jit
def _w4a16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, KP, GS, TILES_PER_SPLIT,
                  SYM: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    n_ok = offs_n < N
    kt_total = KP // 128

    # word (t, w) of a row -> its 8 nibbles' k offsets inside the tile t: (T, 16, 8) -> flattened (T*128,)
    t_idx = tl.arange(0, T)[:, None, None]
    w_idx = tl.arange(0, 16)[None, :, None]  # w = 4q + j
    i_idx = tl.arange(0, 8)[None, None, :]
    q, j = w_idx // 4, w_idx % 4
    k_in = 32 * j + 16 * ((i_idx % 4) // 2) + 8 * (i_idx % 2) + 2 * q + i_idx // 4  # (1, 16, 8)
    k_slot = tl.reshape(128 * t_idx + k_in, (T * 128,))  # permuted k of each weight column, within the step
    shifts = tl.reshape(4 * i_idx, (1, 1, 1, 8))
    j_grp = tl.arange(0, 4)  # the 32-wide k chunk of a word: scales are per chunk (group size >= 32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kt_start = pid_k * TILES_PER_SPLIT
    kt_end = tl.minimum(kt_start + TILES_PER_SPLIT, kt_total)
    for kt in range(kt_start, kt_end, T):
        tiles = kt + tl.arange(0, T)  # (T,)
        t_ok = tiles < kt_end
        # words (BN, T, 16)
        w_off = (offs_n // 8)[:, None, None] * KP + tiles[None, :, None] * 128 + \
            (offs_n % 8)[:, None, None] * 16 + tl.arange(0, 16)[None, None, :]
        w_mask = n_ok[:, None, None] & t_ok[None, :, None]
        words = tl.load(qw_ptr + w_off, mask=w_mask, other=0)
        codes = (words[:, :, :, None] >> shifts) & 0xF  # (BN, T, 16, 8)
        codes = tl.reshape(codes, (BLOCK_N, T, 4, 4, 8)).to(tl.float32)  # (n, t, q, j, i)
        # group parameters per (n, t, j): (BN, T, 4)
        k_chunk = tiles[None, :, None] * 128 + 32 * j_grp[None, None, :]  # first k of each 32-wide chunk
        g_off = (k_chunk // GS) * N + offs_n[:, None, None]
        g_mask = n_ok[:, None, None] & t_ok[None, :, None] & (k_chunk < K)  # chunks past K have no group
        s = tl.load(s_ptr + g_off, mask=g_mask, other=0).to(tl.float32)
        if SYM:
            w = (codes - 8.0) * s[:, :, None, :, None]
        else:
            z = tl.load(z_ptr + g_off, mask=g_mask, other=0).to(tl.float32)
            w = (codes - z[:, :, None, :, None]) * s[:, :, None, :, None]
        w = tl.reshape(w, (BLOCK_N, T * 128)).to(x_ptr.dtype.element_ty)
        # X columns in the same permuted order (zero beyond K: the padding codes never count)
        k_abs = kt * 128 + k_slot  # (T*128,)
        x_mask = (offs_m[:, None] < M) & (k_abs[None, :] < K) & (k_abs[None, :] < kt_end * 128)
        x = tl.load(x_ptr + offs_m[:, None] * K + k_abs[None, :], mask=x_mask, other=0.0)
        acc += tl.dot(x, tl.trans(w))

    out_mask = (offs_m[:, None] < M) & n_ok[None, :]
    out_off = offs_m[:, None] * N + offs_n[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptr + out_off, acc, mask=out_mask)
    else:
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _config(m: int, n: int, k_tiles: int, sms: int):
    """(BLOCK_M, BLOCK_N, T, split_k, num_warps, num_stages) for a problem of M rows."""
    if m <= 16:
        block_m, block_n, t, warps = 16, 64, 2, 4
    elif m <= 64:
        block_m, block_n, t, warps = 64, 64, 1, 4
    else:
        block_m, block_n, t, warps = 128, 128, 1, 8
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    # small grids leave SMs idle: split K until about two programs per SM (each split >= T tiles)
    split = max(1, min(2 * sms // max(tiles, 1), k_tiles // t))
    return block_m, block_n, t, split, warps, 3


def w4a16_gemm(x, qweight, scales, zeros, group_size: int, n: int, k: int, bias=None, config=None):
    """Y (M, n) = X (M, k) · dequant(W)ᵀ (+ bias) on the GPU (or under TRITON_INTERPRET=1). See the module doc.

    config: (BLOCK_M, BLOCK_N, T, split_k, num_warps, num_stages) to override the choice by M (for tuning).
    """
    m = x.shape[0]
    x = x.contiguous()
    kp = qweight.shape[1]
    gs = kp if group_size == -1 else group_size  # per-channel: every k of the row is group 0
    k_tiles = kp // K_TILE
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    block_m, block_n, t, split, warps, stages = config or _config(m, n, k_tiles, sms)
    per_split = triton.cdiv(triton.cdiv(k_tiles, split), t) * t
    split = triton.cdiv(k_tiles, per_split)
    atomic = split > 1
    out = torch.zeros((m, n), device=x.device, dtype=torch.float32) if atomic else x.new_empty((m, n))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
    _w4a16_kernel[grid](x, qweight, scales, zeros if zeros is not None else scales,
                        bias if bias is not None else scales, out, m, n, k, kp, gs, per_split,
                        SYM=zeros is None, HAS_BIAS=bias is not None, ATOMIC=atomic,
                        BLOCK_M=block_m, BLOCK_N=block_n, T=t, num_warps=warps, num_stages=stages)
    return out.to(x.dtype) if atomic else out

