"""W4A16 GEMM (Triton): Y (M, N) = X (M, K) · dequant(W)ᵀ (+ bias), X fp16/bf16, output in X's dtype.

W is uint4 codes in the quick layout (formats/quick.py): qweight int32 (ceil(N/8), Kp), Kp = ceil(K/128)·128,
W[n, k] = (q[n, k] - z[g, n]) · s[g, n] with g = k // group_size (z = 8 when symmetric), scales fp16 (G, N).

Reading the layout tile by tile: for one 128-wide k tile kc, output channel n owns the 16 consecutive words
qweight[n // 8, 128·kc + 16·(n % 8) + (4q + j)], q, j in 0..3, and nibble i of word (q, j) holds
k = 128·kc + 32·j + 16·((i % 4) // 2) + 8·(i % 2) + 2·q + i // 4   (formats/quick.py, with ORDER inverted).
So a [BLOCK_N, 16·T] block of words unpacks to a [BLOCK_N, 128·T] weight block whose columns are a fixed
permutation of k; X's columns are put in the same order (formats/quick.interleave_k, one copy per call)
instead of moving the weights, and the GEMV reads X in that order directly.

Two kernels, chosen by M (`_config`):
- M = 1: `_w4a16_gemv_kernel`, CUDA cores, no shared memory; group scale and zero applied once per 32-wide chunk.
- M > 1: `_w4a16_kernel`, dequantize in fp32 registers, `tl.dot` with the weight as the B operand (Triton stages
  it through shared memory: the round trip QUICK removes is still here), split-K with fp32 atomics for small M.
Both turn codes into floats with the 2^23 mantissa trick (Hopper's int-to-float converts are slow).

Measured on an H200 (2026-11-21, benchmarks/results/h200-w4a16.md, CUDA-graph timing): correct, 1.3-1.45x
cuBLAS bf16 at M = 1, 0.41-0.65x at M = 16..64 and 0.15-0.32x at M >= 128: far from the W4A16 issue's targets
(benchmarks/NOTES-w4a16.md has the versions tried). ncu on the GEMV
(70B down_proj): 228 registers, 12.5% occupancy, 25% of DRAM bandwidth, SM 57% busy, ~7 instructions per weight.
Tried and dropped: unpacking through 2-D tensors only (each unpacked column re-reading its word) ran 5-10x
slower; the GEMV with an M loop inside ran 2x slower than the tl.dot kernel at M = 4.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.quick import K_TILE, interleave_k


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, bias_ptr, out_ptr, pid_k, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    """acc (BM, BN) fp32 -> Y: bias once (from the first K split), then an atomic add or a plain store."""
    n_ok = offs_n < N
    out_mask = (offs_m[:, None] < M) & n_ok[None, :]
    out_off = offs_m[:, None] * N + offs_n[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptr + out_off, acc, mask=out_mask)
    else:
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _w4a16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, KP, GS, TILES_PER_SPLIT,
                  SYM: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    n_ok = offs_n < N
    kt_total = KP // 128

    shifts = tl.reshape(4 * tl.arange(0, 8), (1, 1, 1, 8))
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
        codes = ((words[:, :, :, None] >> shifts) & 0xF) | 0x4B000000  # (BN, T, 16, 8): 2^23 + q as fp32 bits
        codes = tl.reshape(codes, (BLOCK_N, T, 4, 4, 8)).to(tl.float32, bitcast=True) - 8388608.0  # (n, t, q, j, i)
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
        # X arrives with its columns already in the layout's k order, zero-padded to KP (interleave_k)
        cols = kt * 128 + tl.arange(0, T * 128)
        x_mask = (offs_m[:, None] < M) & (cols[None, :] < kt_end * 128)
        x = tl.load(x_ptr + offs_m[:, None] * KP + cols[None, :], mask=x_mask, other=0.0)
        acc += tl.dot(x, tl.trans(w))

    _epilogue(acc, offs_m, offs_n, M, N, bias_ptr, out_ptr, pid_k, HAS_BIAS, ATOMIC)


@triton.jit
def _w4a16_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, KP, GS, TILES_PER_SPLIT,
                       SYM: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One row of X (M = 1) on CUDA cores, one 128-wide k tile per step, no tensor cores, no shared memory.

    Words stay 3-D (n, q, j) in the layout they were loaded in; the 8 nibbles are taken one at a time, each
    multiplied by the X values it stands for. Group parameters apply once per (n, 32-wide chunk j):
    y[n] += s[g, n] · (Σ q·x − z[g, n] · Σ x) over the chunk.
    """
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    q3 = tl.arange(0, 4)[None, :, None]
    j3 = tl.arange(0, 4)[None, None, :]
    j2 = tl.arange(0, 4)[None, :]
    row = ((offs_n // 8) * KP + (offs_n % 8) * 16)[:, None, None] + 4 * q3 + j3  # (BN, 4q, 4j) word offsets
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    kt_total = KP // 128
    kt_start = pid_k * TILES_PER_SPLIT
    kt_end = tl.minimum(kt_start + TILES_PER_SPLIT, kt_total)
    for kt in range(kt_start, kt_end):
        words = tl.load(qw_ptr + row + kt * 128, mask=n_ok[:, None, None], other=0)  # (BN, 4, 4)
        chunk = kt * 128 + 32 * j2  # (1, 4j): first k of each chunk
        g_off = (chunk // GS) * N + offs_n[:, None]
        g_ok = n_ok[:, None] & (chunk < K)
        s = tl.load(s_ptr + g_off, mask=g_ok, other=0).to(tl.float32)  # (BN, 4j)
        if SYM:
            z = tl.full((BLOCK_N, 4), 8.0, tl.float32)
        else:
            z = tl.load(z_ptr + g_off, mask=g_ok, other=0).to(tl.float32)
        dot = tl.zeros((BLOCK_N, 4, 4), dtype=tl.float32)
        xsum = tl.zeros((1, 4, 4), dtype=tl.float32)
        for i in tl.static_range(8):
            k_i = kt * 128 + 32 * j3 + 16 * ((i % 4) // 2) + 8 * (i % 2) + 2 * q3 + i // 4  # (1, 4q, 4j)
            x_i = tl.load(x_ptr + k_i, mask=k_i < K, other=0.0).to(tl.float32)
            xsum += x_i
            # q·16^r as a float without a (slow) int-to-float convert: OR the masked nibble into the
            # mantissa of 2^23 and subtract 2^23; X is scaled by 16^-r instead (exact, a power of two)
            # nibbles 4..7 are shifted down first (shifting per use keeps a second word tile out of registers)
            bits = ((words if i < 4 else words >> 16) & (0xF << (4 * (i % 4)))) | 0x4B000000
            dot += (bits.to(tl.float32, bitcast=True) - 8388608.0) * (x_i * (1.0 / (1 << (4 * (i % 4)))))
        acc += tl.sum(s * (tl.sum(dot, 1) - z * tl.sum(xsum, 1)), 1)  # (BN,)

    _epilogue(acc[None, :], tl.arange(0, BLOCK_M), offs_n, M, N, bias_ptr, out_ptr, pid_k, HAS_BIAS, ATOMIC)


GEMV_MAX_M = 1  # the CUDA-core kernel wins at M = 1 only (H200: 1.2-1.4x bf16; an M loop was 2x slower at M = 4)


def _config(m: int, n: int, k_tiles: int, sms: int):
    """("gemv", BLOCK_M, BLOCK_N, 1, split_k, num_warps, num_stages) or ("mma", BLOCK_M, BLOCK_N, T, ...)."""
    # Picked from benchmarks/tune_w4a16.py sweeps on an H200 (2026-11-21, Llama 7B/70B layer shapes).
    if m <= GEMV_MAX_M:  # one warp per program holding many words in flight; ~8 programs per SM
        kind, block_m, block_n, t, warps, per_sm = "gemv", 1, 128, 1, 1, 8
    elif m <= 16:
        kind, block_m, block_n, t, warps, per_sm = "mma", 16, 128, 1, 4, 4
    elif m <= 64:
        kind, block_m, block_n, t, warps, per_sm = "mma", 64, 64, 1, 4, 4
    else:
        kind, block_m, block_n, t, warps, per_sm = "mma", 128, 128, 1, 8, 4
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    # small grids leave SMs idle: split K until about per_sm programs per SM (each split >= T tiles)
    split = max(1, min(per_sm * sms // max(tiles, 1), k_tiles // t))
    return kind, block_m, block_n, t, split, warps, 3


def w4a16_gemm(x, qweight, scales, zeros, group_size: int, n: int, k: int, bias=None, config=None):
    """Y (M, n) = X (M, k) · dequant(W)ᵀ (+ bias) on the GPU (or under TRITON_INTERPRET=1). See the module doc.

    config: a tuple as _config returns, to override the choice by M (for tuning).
    """
    m = x.shape[0]
    x = x.contiguous()
    kp = qweight.shape[1]
    gs = kp if group_size == -1 else group_size  # per-channel: every k of the row is group 0
    k_tiles = kp // K_TILE
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    kind, block_m, block_n, t, split, warps, stages = config or _config(m, n, k_tiles, sms)
    per_split = triton.cdiv(triton.cdiv(k_tiles, split), t) * t
    split = triton.cdiv(k_tiles, per_split)
    atomic = split > 1
    out = torch.zeros((m, n), device=x.device, dtype=torch.float32) if atomic else x.new_empty((m, n))
    args = (x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out,
            m, n, k, kp, gs, per_split)
    flags = dict(SYM=zeros is None, HAS_BIAS=bias is not None, ATOMIC=atomic, BLOCK_M=block_m, BLOCK_N=block_n,
                 num_warps=warps, num_stages=stages)
    if kind == "gemv":
        if m != 1:
            raise ValueError(f"the gemv kernel takes one row of X, got M={m}")
        _w4a16_gemv_kernel[(triton.cdiv(n, block_n), split)](*args, **flags)
    else:
        args = (interleave_k(x),) + args[1:]
        _w4a16_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)](*args, T=t, **flags)
    return out.to(x.dtype) if atomic else out
