"""W4A16 GEMM: Y (M, N) = X (M, K) · dequant(W)ᵀ (+ bias), X fp16/bf16, output in X's dtype.

W is uint4 codes in the quick layout v2 (formats/quick.py): qweight int32 (ceil(N/16), KT·256), KT = ceil(K/128),
W[n, k] = (q[n, k] - z[g, n]) · s[g, n] with g = k // group_size (z = 8 when symmetric), scales fp16 (G, N).

Kernels by M (the stored format is the same for all): `_w4a16_ring_kernel` for M <= 16 where N and K are
multiples of 16, `_w4a16_mma_kernel` for M <= 8 otherwise and for every M on sm_80/sm_89, `_w4a16_ws_kernel`
for 16 < M <= 64 (and up to 256 where K <= 4096 is too short to split well) and `_w4a16_wgmma_kernel` for the
rest on Hopper. On large layers an M just past 128 or 256 runs as two launches, the first 128 / 256 rows and the
rest (_row_parts), unless a tile in parts takes it (below). Every Gluon kernel also has a gated form (GLU, for
nn/fuse.W4A16GatedLinear): its epilogue writes silu(gate) · up of the weight's alternating 8-row blocks, N / 2
columns (_glu).

`_w4a16_mma_kernel` (Gluon) computes Yᵀ = W·Xᵀ with mma.m16n8k16, the weight as the A operand, so a decode batch
fills the instruction's n = 8 instead of wasting 15/16 of m = 16:
- Each lane loads its 8 words of a 16 x 128 tile with two 128-bit loads. For each k16 slice i = 4h + a, one
  shift, one LOP3 (mask | magic) and one HSUB2 (minus magic + z) per word produce register j of the slice's A
  fragment (formats/quick.py says why). The dequantized tile never leaves registers: the kernel declares the
  unpacked words' layout and `convert_layout(..., assert_trivial=True)` proves at compile time that it already
  is the mma operand layout, and the compiled kernel has no shared memory for weights (tests/
  test_w4a16_kernel.py checks both from an offline sm_90 compile).
- q - z is exact in fp16/bf16, so with POST_SCALE the group scale multiplies each group's fp32 partial sum
  after the mma (one FMA per accumulator per group, instead of a multiply per weight); per-channel scales apply
  once at the end. Without POST_SCALE (large M, where a second accumulator costs registers) the HSUB2 is followed by
  an HMUL2 with the scale.
- X (the B operand, BLOCK_M columns) is read from global memory straight into B fragments at M = 1 and staged
  through shared memory otherwise (activations only: weights never touch shared memory).
- With group size 128 (one group per tile) the next tile's zero points and scales are loaded with its weights:
  otherwise every tile starts by waiting for them (ptxas issues the "prefetched" loads late in the loop body,
  so little latency is left to hide them).
- Split-K over programs when the (N, M) grid alone would leave SMs idle: the splits add into a persistent
  fp32 workspace and the last split of each output tile (a counter) writes Y and re-zeroes the workspace, so a
  call is one launch. The order of the adds varies, so split results can differ in the last bit run to run.
`_w4a16_ring_kernel` does the mma kernel's math with every global read of a tile (packed weight words, X, the
tile's group parameters) issued by cp.async a few tiles ahead into a shared-memory ring, so the loop body waits
only on shared memory; each lane reads back its own packed words, and dequantized weights still never touch
shared memory. On sm_90 it is launched with programmatic dependent launch (kernels/pdl.py): the first tiles'
weights are requested while the previous kernel (whose output X may be) is still running.
`_w4a16_wgmma_kernel` (sm_90; the other M > 8 on Hopper) feeds the same register fragments to async wgmma
(m64nBLOCK_Mk16, BLOCK_M from 16 to 256), with X streamed by TMA through a small ring of shared-memory tiles
(mbarrier per stage) so X's loads overlap the tensor cores, and the next slice's dequant overlapping the running
wgmma. X is read once per CTA instead of once per warp. For 256 < M <= 384 on layers wide enough to fill the SMs
with one row of CTAs, a tile takes all of M in two parts (256 rows and the next power of two, tile_parts), each
with its own accumulator and X box, fed the same dequantized fragments.
`_w4a16_ws_kernel` (sm_90; 16 < M <= 64, and 80 < M <= 256 where K <= 4096 would otherwise be split; N and K
multiples of 16) is the wgmma kernel warp-specialized: two one-warp loaders stream X and the packed weight words
(with their group parameters) into rings of their own, and the consumer warps read the words back from shared
memory (each lane its own), dequantize them in registers and issue the wgmmas.
Speedups by M: benchmarks/results/<gpu>-w4a16.md; what limits each and what was tried: benchmarks/NOTES-w4a16.md.

`_w4a16_dot_kernel` (Triton, tl.dot) computes the same product from the same layout; it runs under
TRITON_INTERPRET=1 (CPU tests: Gluon has no interpreter) and on GPUs older than sm_80.
"""
from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..errors import FourbitError
from ..formats.quick import K_TILE, N_TILE, WORDS_PER_TILE, gated_halves
from . import capability, sm_count
from .fused import silu_mul
from .pdl import pdl_args


@triton.constexpr_function
def _dequant_asm(shift, bf16, scale):
    """PTX for one word and slice a: (w >> 4a) & 0x000F000F | magic is the half pair magic + q; minus $3 =
    magic + z (both halves) gives q - z exactly; optionally times $4 = the packed scale pair."""
    magic, sub, mul = (("0x43004300", "sub.rn.bf16x2", "mul.rn.bf16x2") if bf16
                       else ("0x64006400", "sub.f16x2", "mul.f16x2"))
    scaled = f"{mul} t, t, $4; " if scale else ""
    return (f"{{ .reg .b32 t; shr.u32 t, $2, {shift}; lop3.b32 t, t, 0x000F000F, {magic}, 0xEA; "
            f"{sub} t, t, $3; {scaled}mov.b32 {{$0, $1}}, t; }}")


@gluon.jit
def _dequant(words, zz, s2, A: gl.constexpr, BF16: gl.constexpr, SCALE: gl.constexpr):
    """words (BN, 8) int32 -> the (even, odd) column halves of slice 4h + a, each (BN, 8) fp16/bf16."""
    if SCALE:
        args = [words, zz, s2]
        cons: gl.constexpr = "=h,=h,r,r,r"
    else:
        args = [words, zz]
        cons: gl.constexpr = "=h,=h,r,r"
    if BF16:
        lo, hi = gl.inline_asm_elementwise(_dequant_asm(4 * A, True, SCALE), cons, args,
                                           dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
    else:
        lo, hi = gl.inline_asm_elementwise(_dequant_asm(4 * A, False, SCALE), cons, args,
                                           dtype=(gl.float16, gl.float16), is_pure=True, pack=1)
    return lo, hi


@gluon.jit
def _load_tile(qw_ptr, w_off, w_ok, RB: gl.constexpr):
    """A lane's 8 words of each 16-row block (two 128-bit loads) -> the two halves of _tile_halves."""
    return _tile_halves(gl.load(qw_ptr + w_off, mask=w_ok, other=0), RB)


@gluon.jit
def _tile_halves(words, RB: gl.constexpr):
    """words (RB, lane, r) -> the two halves h, (16·RB, 8) words each, rows n = 16 rb + 8 rh + g and columns
    4 ch + t, held as the slice fragments need them (register bits rh, ch; lane bits t, g): only the tensor's
    index labels change, no data moves."""
    words = gl.reshape(words, (RB, 8, 4, 2, 2, 2))  # (rb, g, t, h, ch, rh)
    words = gl.permute(words, (0, 5, 1, 4, 2, 3))  # (rb, rh, g, ch, t, h)
    return gl.split(gl.reshape(words, (16 * RB, 8, 2)))


@gluon.jit
def _zero_pair(z, BF16: gl.constexpr):
    """int32 zero points -> the half pair magic + z in both halves, what _dequant subtracts."""
    magic: gl.constexpr = 0x4300 if BF16 else 0x6400
    return (magic + z) * 0x10001


@gluon.jit
def _group_params(s_ptr, z_ptr, g, rows, ok, N, SYM: gl.constexpr, BF16: gl.constexpr, SCALE: gl.constexpr):
    """Group g's packed (magic + z) pair and, if SCALE, packed scale pair for `rows`: int32 (BN, 1) each.
    ok masks rows past N and groups past K (a K tail's last slices have no group: their X is zero)."""
    z = gl.full(rows.shape, 8, gl.int32, layout=rows.type.layout)
    if not SYM:
        z = gl.load(z_ptr + g * N + rows, mask=ok, other=0).to(gl.int32)
    s = gl.load(s_ptr + g * N + rows, mask=ok, other=0) if SCALE else None
    return _pack_params(z, s, BF16, SCALE)


@gluon.jit
def _pack_params(z, s, BF16: gl.constexpr, SCALE: gl.constexpr):
    """Zero points z (int32) and fp16 scales s of a group's rows -> the packed pairs _dequant takes, (BN, 1) each."""
    zz = _zero_pair(z, BF16)
    s2 = zz
    if SCALE:
        if BF16:
            s = s.to(gl.float32).to(gl.bfloat16)
        bits = s.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        s2 = bits * 0x10001
    return zz[:, None], s2[:, None]


@gluon.jit
def _ring_params(s_ring, z_ring, slot, rows, SYM: gl.constexpr, BF16: gl.constexpr):
    """_group_params of the group in ring slot `slot` (the warp-specialized kernel's loader copied it there)."""
    z = gl.full(rows.shape, 8, gl.int32, layout=rows.type.layout)
    if not SYM:
        z = z_ring.index(slot).load(rows.type.layout).to(gl.int32)
    return _pack_params(z, s_ring.index(slot).load(rows.type.layout), BF16, True)


@triton.constexpr_function
def _words_layout(num_warps):
    """How a program holds its packed words (RB, lane, word): each lane its 8 words of every 16-row block."""
    return gl.BlockedLayout([1, 1, 8], [1, 32, 1], [num_warps, 1, 1], [2, 1, 0])


@triton.constexpr_function
def _groups_per_tile(group_size):
    """Groups of a 128-wide K tile (per-channel: the one group): the group-parameter slots of a ring stage."""
    return 1 if group_size == -1 else 128 // group_size


@gluon.jit
def _word_offsets(pid_n, N, KT, RB: gl.constexpr, NUM_WARPS: gl.constexpr):
    """Offsets (RB, lane, word) of this program's 16-row blocks in tile 0, and their mask (rows past N)."""
    w_l: gl.constexpr = _words_layout(NUM_WARPS)
    rb = pid_n * RB + gl.arange(0, RB, layout=gl.SliceLayout(1, gl.SliceLayout(2, w_l)))
    lane = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, w_l)))
    word = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, w_l)))
    w_off = rb[:, None, None] * (KT * 256) + (lane * 8)[None, :, None] + word[None, None, :]
    w_ok = (rb < (N + 15) // 16)[:, None, None] & (word < 8)[None, None, :]
    return w_off, w_ok


@gluon.jit
def _k_range(KT, TILES_PER_SPLIT):
    """This program's K split (grid axis 2): 128-wide tiles kt0 .. kt1 - 1."""
    kt0 = gl.program_id(2) * TILES_PER_SPLIT
    return kt0, gl.minimum(kt0 + TILES_PER_SPLIT, KT)


@gluon.jit
def _glu(y, dtype: gl.constexpr):
    """y (BN, BLOCK_M) fp32, Yᵀ's tile of a gated layer -> silu(gate) · up (BN / 2, BLOCK_M) fp32. In each 16-row
    block the first 8 rows are gate channels and the next 8 their up channels (nn/fuse.py), the rows g and g + 8
    that one thread holds in the mma and wgmma accumulators (or 16 consecutive rows, _store_acc's layout), so
    the pairing moves no data. Gate and up are rounded to `dtype` first, as a separate GEMM would have stored
    them, and the formula is _silu_mul_kernel's: the fused result is the unfused one."""
    BN: gl.constexpr = y.shape[0]
    BLOCK_M: gl.constexpr = y.shape[1]
    y = y.to(dtype).to(gl.float32)
    gate, up = gl.split(gl.permute(gl.reshape(y, [BN // 16, 2, 8, BLOCK_M]), [0, 2, 3, 1]))
    return gl.reshape(gate / (1.0 + gl.exp(-gate)) * up, [BN // 2, BLOCK_M])


@gluon.jit
def _store_y(y, col0, M, N, out_ptr, GLU: gl.constexpr):
    """y (BN, BLOCK_M) fp32, the finished tile of Yᵀ at program pid_n and X rows col0 .. col0 + BLOCK_M - 1 -> Y
    (M, N) in its dtype; with GLU silu(gate) · up of its row pairs (_glu) -> Y (M, N / 2)."""
    if GLU:
        y = _glu(y, out_ptr.dtype.element_ty)
        N = N // 2
    BN: gl.constexpr = y.shape[0]
    BLOCK_M: gl.constexpr = y.shape[1]
    rows = gl.program_id(0) * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, y.type.layout))
    cols = col0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, y.type.layout))
    mask = (rows < N)[:, None] & (cols < M)[None, :]
    gl.store(out_ptr + cols[None, :] * N + rows[:, None], y.to(out_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _write_out(acc, rows, rows_ok, M, N, bias_ptr, out_ptr, ws_ptr, count_ptr,
               HAS_BIAS: gl.constexpr, ATOMIC: gl.constexpr, BLOCK_M: gl.constexpr, GLU: gl.constexpr = False,
               OFFSET: gl.constexpr = 0):
    """acc (BN, width) fp32 = Yᵀ's tile -> Y, bias added once (by the first K split); GLU: _store_y. The program's
    X rows start at pid_m · BLOCK_M; the tile's at OFFSET past that (a part of the rows, _row_part).

    With ATOMIC (split K) the call stays one launch: every split adds its part into an fp32 workspace that is
    all zeros between calls; the split that arrives last (a counter per output tile) writes Y and re-zeroes both.
    """
    pid_m = gl.program_id(1)
    if HAS_BIAS:
        bias = gl.load(bias_ptr + rows, mask=rows_ok & (gl.program_id(2) == 0), other=0).to(gl.float32)
        acc += bias[:, None]
    col0 = pid_m * BLOCK_M + OFFSET
    cols = col0 + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, acc.type.layout))
    out_off = cols[None, :] * N + rows[:, None]
    out_mask = rows_ok[:, None] & (cols < M)[None, :]
    if ATOMIC:
        gl.atomic_add(ws_ptr + out_off, acc, mask=out_mask, sem="relaxed")  # plain RED: no fence per element
        gl.thread_barrier()  # every thread's adds are issued before the release below
        tile = pid_m * gl.num_programs(0) + gl.program_id(0)
        arrived = gl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == gl.num_programs(2) - 1:
            total = gl.load(ws_ptr + out_off, mask=out_mask, other=0.0, cache_modifier=".cg")  # from L2
            gl.store(ws_ptr + out_off, gl.zeros_like(total), mask=out_mask)
            gl.atomic_xchg(count_ptr + tile, 0, sem="relaxed")
            _store_y(total, col0, M, N, out_ptr, GLU)
    else:
        _store_y(acc, col0, M, N, out_ptr, GLU)


@gluon.jit
def _w4a16_mma_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, KT, TILES_PER_SPLIT,
                      ws_ptr, count_ptr, GS: gl.constexpr, SYM: gl.constexpr, HAS_BIAS: gl.constexpr, ATOMIC: gl.constexpr,
                      POST_SCALE: gl.constexpr, X_SMEM: gl.constexpr, EVEN_K: gl.constexpr,
                      BLOCK_M: gl.constexpr, R: gl.constexpr, NUM_WARPS: gl.constexpr,
                      ROUND_TRIP: gl.constexpr = False, GLU: gl.constexpr = False):
    BF16: gl.constexpr = x_ptr.dtype.element_ty == gl.bfloat16
    RB: gl.constexpr = R * NUM_WARPS  # 16-row blocks per program, R per warp
    BN: gl.constexpr = 16 * RB
    PER_CHANNEL: gl.constexpr = GS == -1
    SLICES_PER_GROUP: gl.constexpr = 8 if PER_CHANNEL else GS // 16  # (per-channel: reset never used)
    TILE_GROUP: gl.constexpr = GS == 128  # one group per 128-wide tile
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NUM_WARPS, 1],
                                                  instr_shape=[16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)

    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    kt0, kt1 = _k_range(KT, TILES_PER_SPLIT)

    w_off, w_ok = _word_offsets(pid_n, N, KT, RB, NUM_WARPS)
    w0, w1 = _load_tile(qw_ptr, w_off + kt0 * 256, w_ok & (kt0 < kt1), RB)

    rows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, w0.type.layout))  # as the words hold them
    rows_ok = rows < N
    acc_rows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))  # as the accumulator holds them
    acc_rows_ok = acc_rows < N

    kk = gl.arange(0, 16, layout=gl.SliceLayout(1, b_l))
    mm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, b_l))
    if X_SMEM:
        x_l: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [NUM_WARPS, 1], [1, 0])  # 128-bit loads
        xm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_l))
        xk = gl.arange(0, 128, layout=gl.SliceLayout(0, x_l))
        x_smem = gl.allocate_shared_memory(x_ptr.dtype.element_ty, [BLOCK_M, 128],
                                           gl.SwizzledSharedLayout(8, 1, 8, order=[1, 0]))

    if ROUND_TRIP:  # measurement only: the shared-memory write-back of the dequantized tile that QUICK removes
        w_smem = gl.allocate_shared_memory(x_ptr.dtype.element_ty, [BN, 16],
                                           gl.SwizzledSharedLayout(8, 1, 8, order=[1, 0]))

    acc = gl.zeros((BN, BLOCK_M), gl.float32, layout=mma)
    # group 0 for per-channel; the first tile's group when a group is a tile (prefetched from then on)
    zz, s2 = _group_params(s_ptr, z_ptr, kt0 if TILE_GROUP else 0, rows, rows_ok, N, SYM, BF16, not POST_SCALE)
    if TILE_GROUP and POST_SCALE:
        sc = gl.load(s_ptr + kt0 * N + acc_rows, mask=acc_rows_ok, other=0).to(gl.float32)
    for kt in range(kt0, kt1):
        n0, n1 = _load_tile(qw_ptr, w_off + (kt + 1) * 256, w_ok & (kt + 1 < kt1), RB)  # next tile in flight
        if TILE_GROUP:  # and its group's parameters, so that no tile starts by waiting for them
            nzz, ns2 = _group_params(s_ptr, z_ptr, kt + 1, rows, rows_ok & (kt + 1 < kt1), N, SYM, BF16,
                                     not POST_SCALE)
            if POST_SCALE:
                nsc = gl.load(s_ptr + (kt + 1) * N + acc_rows, mask=acc_rows_ok & (kt + 1 < kt1), other=0)
        if X_SMEM:
            gl.thread_barrier()  # every warp is done with the previous tile's X
            x_mask = (xm < M)[:, None] & ((kt * 128 + xk) < K)[None, :]
            x_smem.store(gl.load(x_ptr + xm[:, None] * K + (kt * 128 + xk)[None, :], mask=x_mask, other=0.0))
            gl.thread_barrier()
        for h in gl.static_range(2):
            wh = w0 if h == 0 else w1
            for a in gl.static_range(4):
                if not PER_CHANNEL and not TILE_GROUP:
                    if (4 * h + a) % SLICES_PER_GROUP == 0:  # a new group starts at this slice
                        k0 = kt * 128 + 16 * (4 * h + a)
                        zz, s2 = _group_params(s_ptr, z_ptr, k0 // GS, rows, rows_ok & (k0 < K), N, SYM, BF16,
                                               not POST_SCALE)
                lo, hi = _dequant(wh, zz, s2, a, BF16, not POST_SCALE)
                w = gl.reshape(gl.join(lo, hi), (BN, 16))  # (n, 16 columns of slice (4 * h + a))
                w = gl.convert_layout(w, a_l, assert_trivial=True)  # already the A fragment: no data moves
                if ROUND_TRIP:
                    gl.thread_barrier()
                    w_smem.store(w)
                    gl.thread_barrier()
                    w = w_smem.load(a_l)
                if X_SMEM:
                    x = x_smem.slice(16 * (4 * h + a), 16, dim=1).permute((1, 0)).load(b_l)
                else:
                    k = kt * 128 + 16 * (4 * h + a) + kk
                    x_mask = (mm < M)[None, :]
                    if not EVEN_K:
                        x_mask = x_mask & (k < K)[:, None]
                    x = gl.load(x_ptr + mm[None, :] * K + k[:, None], mask=x_mask, other=0.0)  # (16, BM)
                if PER_CHANNEL or not POST_SCALE:
                    acc = mma_v2(w, x, acc)
                else:
                    if (4 * h + a) % SLICES_PER_GROUP == 0:
                        part = mma_v2(w, x, gl.zeros((BN, BLOCK_M), gl.float32, layout=mma))
                    else:
                        part = mma_v2(w, x, part)
                    if (4 * h + a) % SLICES_PER_GROUP == SLICES_PER_GROUP - 1:  # the group's sum, times its scale
                        if TILE_GROUP:
                            s = sc
                        else:
                            g = (kt * 128 + 16 * (4 * h + a)) // GS
                            s = gl.load(s_ptr + g * N + acc_rows, mask=acc_rows_ok & (g * GS < K), other=0)
                            s = s.to(gl.float32)
                        acc += part * s[:, None]
        w0, w1 = n0, n1
        if TILE_GROUP:
            zz, s2 = nzz, ns2
            if POST_SCALE:
                sc = nsc.to(gl.float32)

    if PER_CHANNEL and POST_SCALE:
        acc *= gl.load(s_ptr + acc_rows, mask=acc_rows_ok, other=0).to(gl.float32)[:, None]
    _write_out(acc, acc_rows, acc_rows_ok, M, N, bias_ptr, out_ptr, ws_ptr, count_ptr, HAS_BIAS,
               ATOMIC, BLOCK_M, GLU)


@gluon.jit
def _ring_weights(stage, kt, kt1, K, N, qw_ptr, w_off, w_ok, w_ring, s_ptr, z_ptr, p_off, p_ok, s_ring, z_ring,
                  GS: gl.constexpr, SYM: gl.constexpr):
    """Start the async copies (cp.async, not committed) of tile kt's weights into ring stage `stage`: this
    program's packed words and the tile's group parameters (_copy_params). Past the split's last tile the copies
    are masked off, which writes zeros and reads nothing."""
    live = kt < kt1
    async_copy.async_copy_global_to_shared(w_ring.index(stage), qw_ptr + w_off + kt * 256, mask=w_ok & live)
    _copy_params(stage, kt, K, N, s_ptr, z_ptr, p_off, p_ok & live, s_ring, z_ring, GS, SYM)


@gluon.jit
def _copy_params(stage, kt, K, N, s_ptr, z_ptr, p_off, p_ok, s_ring, z_ring, GS: gl.constexpr, SYM: gl.constexpr):
    """Start the cp.async copies of tile kt's zero points and scales (rows p_off where p_ok; per-channel: group 0
    each time, from L2) into the rings' slots of stage `stage` (stage · groups per tile + group). Groups past K
    are masked off: zeros written, nothing read."""
    GPT: gl.constexpr = _groups_per_tile(GS)
    for q in gl.static_range(GPT):
        g = 0 if GS == -1 else kt * GPT + q  # the tile's groups
        p_mask = p_ok & (g * GS < K)
        slot = stage * GPT + q
        async_copy.async_copy_global_to_shared(s_ring.index(slot), s_ptr + g * N + p_off, mask=p_mask)
        if not SYM:
            async_copy.async_copy_global_to_shared(z_ring.index(slot), z_ptr + g * N + p_off, mask=p_mask)


@gluon.jit
def _ring_x(stage, kt, kt1, K, x_ptr, x_off, x_ok, xk, x_ring):
    """Start the async copy (not committed) of X's 128 columns of tile kt into ring stage `stage`."""
    x_mask = x_ok & ((kt * 128 + xk) < K)[None, :] & (kt < kt1)
    async_copy.async_copy_global_to_shared(x_ring.index(stage), x_ptr + x_off + kt * 128, mask=x_mask)


@gluon.jit
def _w4a16_ring_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, KT, TILES_PER_SPLIT,
                       ws_ptr, count_ptr, GS: gl.constexpr, SYM: gl.constexpr, HAS_BIAS: gl.constexpr,
                       ATOMIC: gl.constexpr, BLOCK_M: gl.constexpr, R: gl.constexpr, NUM_WARPS: gl.constexpr,
                       STAGES: gl.constexpr, PDL: gl.constexpr = False, GLU: gl.constexpr = False):
    """Small M (BLOCK_M 8 or 16): the mma kernel's math, with every global read of a tile (packed weights, X, group
    parameters) issued STAGES - 1 tiles ahead by cp.async into a shared-memory ring, so the loop body waits on
    nothing but shared memory and the registers hold one tile. Each lane copies and then reads back its own
    weight words; only the packed words pass through shared memory, the dequantized fragments are made in
    registers as in the mma kernel. Needs N and K multiples of 16 (16-byte copies).
    PDL (kernels/pdl.py): the first tiles' weights are requested before waiting for the previous kernel (whose
    output X may be), and the next kernel may launch once every program is past its K loop."""
    BF16: gl.constexpr = x_ptr.dtype.element_ty == gl.bfloat16
    RB: gl.constexpr = R * NUM_WARPS
    BN: gl.constexpr = 16 * RB
    GPT: gl.constexpr = _groups_per_tile(GS)
    SPG: gl.constexpr = 8 if GS == -1 else GS // 16  # slices per group (per-channel: a tile's worth)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NUM_WARPS, 1],
                                                  instr_shape=[16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    x_l: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [NUM_WARPS, 1], [1, 0])  # 16-byte copies
    p_l: gl.constexpr = gl.BlockedLayout([8], [32], [NUM_WARPS], [0])
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    kt0, kt1 = _k_range(KT, TILES_PER_SPLIT)

    w_off, w_ok = _word_offsets(pid_n, N, KT, RB, NUM_WARPS)
    w_ring = gl.allocate_shared_memory(gl.int32, [STAGES, RB, 32, 8], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    xm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_l))
    xk = gl.arange(0, 128, layout=gl.SliceLayout(0, x_l))
    x_off = xm[:, None] * K + xk[None, :]
    x_ok = (xm < M)[:, None]
    x_ring = gl.allocate_shared_memory(x_ptr.dtype.element_ty, [STAGES, BLOCK_M, 128],
                                       gl.SwizzledSharedLayout(8, 1, 8, [1, 0]))
    p_off = pid_n * BN + gl.arange(0, BN, layout=p_l)
    p_ok = p_off < N
    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    s_ring = gl.allocate_shared_memory(s_ptr.dtype.element_ty, [STAGES * GPT, BN], flat)  # slot stage·GPT + q
    z_ring = gl.allocate_shared_memory(gl.uint8, [STAGES * GPT, BN], flat)
    # The ring's first STAGES - 1 tiles in flight: their weights (one commit group each), then, once the previous
    # kernel is done, their X (one group each). Groups complete in order, so the loop's wait for all but the
    # STAGES - 2 newest groups still covers tile kt's weights and X.
    for f in gl.static_range(STAGES - 1):
        _ring_weights(f, kt0 + f, kt1, K, N, qw_ptr, w_off, w_ok, w_ring, s_ptr, z_ptr, p_off, p_ok, s_ring,
                      z_ring, GS, SYM)
        async_copy.commit_group()
    if PDL:
        gdc_wait()  # X, the workspace and Y only from here on
    for f in gl.static_range(STAGES - 1):
        _ring_x(f, kt0 + f, kt1, K, x_ptr, x_off, x_ok, xk, x_ring)
        async_copy.commit_group()

    acc = gl.zeros((BN, BLOCK_M), gl.float32, layout=mma)
    for kt in range(kt0, kt1):
        j = kt - kt0
        stage = j % STAGES
        async_copy.wait_group(STAGES - 2)  # this thread's copies of tile kt have landed
        gl.thread_barrier()  # every thread's (X and the parameters are shared), and tile kt - 1's stage is free
        refill = (j + STAGES - 1) % STAGES
        _ring_weights(refill, kt + STAGES - 1, kt1, K, N, qw_ptr, w_off, w_ok, w_ring, s_ptr, z_ptr, p_off, p_ok,
                      s_ring, z_ring, GS, SYM)
        _ring_x(refill, kt + STAGES - 1, kt1, K, x_ptr, x_off, x_ok, xk, x_ring)
        async_copy.commit_group()
        w0, w1 = _tile_halves(w_ring.index(stage).load(w_off.type.layout), RB)
        z_l: gl.constexpr = gl.SliceLayout(1, w0.type.layout)
        for h in gl.static_range(2):
            wh = w0 if h == 0 else w1
            for a in gl.static_range(4):
                if (4 * h + a) % SPG == 0:  # a new group starts at this slice
                    if SYM:
                        zz = _zero_pair(gl.full((BN, ), 8, gl.int32, layout=z_l), BF16)
                    else:
                        zz = _zero_pair(z_ring.index(stage * GPT + (4 * h + a) // SPG).load(z_l).to(gl.int32), BF16)
                    sc = s_ring.index(stage * GPT + (4 * h + a) // SPG).load(gl.SliceLayout(1, mma)).to(gl.float32)
                lo, hi = _dequant(wh, zz[:, None], zz[:, None], a, BF16, False)
                w = gl.convert_layout(gl.reshape(gl.join(lo, hi), (BN, 16)), a_l, assert_trivial=True)
                x = x_ring.index(stage).slice(16 * (4 * h + a), 16, dim=1).permute((1, 0)).load(b_l)
                if (4 * h + a) % SPG == 0:
                    part = mma_v2(w, x, gl.zeros((BN, BLOCK_M), gl.float32, layout=mma))
                else:
                    part = mma_v2(w, x, part)
                if (4 * h + a) % SPG == SPG - 1:  # the group's sum, times its scale
                    acc += part * sc[:, None]
    async_copy.wait_group(0)  # the masked-off copies past the last tile
    if PDL:  # late: triggering at the start measured slower at M = 16 when GEMMs follow each other
        gdc_launch_dependents()

    acc_rows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    _write_out(acc, acc_rows, acc_rows < N, M, N, bias_ptr, out_ptr, ws_ptr, count_ptr, HAS_BIAS, ATOMIC,
               BLOCK_M, GLU)


@gluon.jit
def _issue_x(x_desc, x_smem, bars, stage, m0, kt, pred, ROWS: gl.constexpr):
    """Start the TMA copy of X's (box rows, 128) tile kt into ring stage `stage`; bars[stage] completes when
    ROWS rows of it have landed: the box's, or a CTA's rows in parts, whose other copies follow (_copy_x)."""
    bar = bars.index(stage)
    mbarrier.expect(bar, 2 * x_desc.block_type.nbytes // x_desc.block_type.shape[0] * ROWS, pred=pred)
    _copy_x(x_desc, x_smem, bar, stage, m0, kt, pred)


@gluon.jit
def _copy_x(x_desc, x_smem, bar, stage, m0, kt, pred):
    """X rows m0 .. m0 + box rows - 1 of tile kt into ring stage `stage` as two 64-column boxes (the widest a
    128-byte swizzle takes), completing on bar. Rows past M and columns past K arrive as zeros."""
    tma.async_copy_global_to_shared(x_desc, [m0, kt * 128], bar, x_smem.index(2 * stage), pred=pred)
    tma.async_copy_global_to_shared(x_desc, [m0, kt * 128 + 64], bar, x_smem.index(2 * stage + 1), pred=pred)


@gluon.jit
def _issue_parts(x_desc, x_desc2, x_smem, x_smem2, bars, stage, m0, kt, pred, BLOCK_M: gl.constexpr):
    """_issue_x for both parts of a CTA's BLOCK_M rows (_row_part), completing on bars[stage]."""
    _issue_x(x_desc, x_smem, bars, stage, m0, kt, pred, BLOCK_M)
    if _row_part(BLOCK_M, 1) > 0:
        _copy_x(x_desc2, x_smem2, bars.index(stage), stage, m0 + _row_part(BLOCK_M, 0), kt, pred)


@triton.constexpr_function  # (also called on the host)
def tile_parts(block_m: int) -> tuple:
    """The parts of a wgmma CTA's BLOCK_M rows: BLOCK_M itself (a power of two up to 256), or 256 and a smaller
    power of two from 8 (e.g. 384 = 256 + 128). Each part has its own accumulator (wgmma n = its rows) and X box,
    and both take the same dequantized weights: an M between two tile heights is neither padded to the next nor
    has its weights dequantized once per tile."""
    parts = (block_m, ) if block_m <= 256 else (256, block_m - 256)
    if any(p < 8 or p & (p - 1) for p in parts) or parts[-1] > 256 // len(parts):
        raise ValueError(f"BLOCK_M {block_m} is not a power of two from 8 to 256, nor 256 and a smaller one")
    return parts


@triton.constexpr_function
def _row_part(block_m, i):
    """Rows of part i of BLOCK_M (tile_parts); 0 past the last part."""
    parts = tile_parts(block_m)
    return parts[i] if i < len(parts) else 0


@triton.constexpr_function
def _inflight(block_m):
    """wgmmas a warpgroup keeps in flight (H100 sweep: more pays from n = 128 on, n = 256 peaks at 2)."""
    return 1 if block_m <= 64 else (2 if block_m == 256 else 3)


@gluon.jit
def _wgmma_slices(acc, acc2, w0, w1, x_smem, x_smem2, stage, zz, s2, kt, rows, rows_ok, s_ptr, z_ptr,
                  N, K, GS: gl.constexpr, SYM: gl.constexpr, BF16: gl.constexpr, BLOCK_M: gl.constexpr,
                  NUM_WARPS: gl.constexpr, INFLIGHT: gl.constexpr, FIRST: gl.constexpr, LAST: gl.constexpr,
                  RING: gl.constexpr = False):
    """k16 slices FIRST .. LAST - 1 of tile kt: each dequantized from the words (w0: slices 0-3, w1: 4-7) straight
    into wgmma's register A layout and multiplied with X's slice of ring stage `stage` by an async wgmma (one per
    part of the BLOCK_M rows, _row_part: acc / x_smem, then acc2 / x_smem2 where the second part exists, else acc2
    is returned as given), keeping up to INFLIGHT slices in flight. Group parameters are (re)loaded where a group
    starts inside the tile (group size below 128): from global memory, or with RING from the parameter rings
    s_ptr / z_ptr (slot stage · groups per tile + group). Returns (acc, acc2, zz, s2)."""
    B1: gl.constexpr = _row_part(BLOCK_M, 0)
    B2: gl.constexpr = _row_part(BLOCK_M, 1)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                  instr_shape=[16, B1, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    BN: gl.constexpr = acc.shape[0]
    for i in gl.static_range(FIRST, LAST):
        if GS != -1 and GS < 128:
            if i % (GS // 16) == 0:  # a new group starts at this slice
                if RING:
                    zz, s2 = _ring_params(s_ptr, z_ptr, stage * _groups_per_tile(GS) + i // (GS // 16), rows, SYM,
                                          BF16)
                else:
                    k0 = kt * 128 + 16 * i
                    zz, s2 = _group_params(s_ptr, z_ptr, k0 // GS, rows, rows_ok & (k0 < K), N, SYM, BF16, True)
        lo, hi = _dequant(w0 if i < 4 else w1, zz, s2, i % 4, BF16, True)
        w = gl.convert_layout(gl.reshape(gl.join(lo, hi), (BN, 16)), a_l, assert_trivial=True)
        acc = warpgroup_mma(w, _x_slice(x_smem, stage, i), acc, is_async=True)
        if B2 > 0:
            acc2 = warpgroup_mma(w, _x_slice(x_smem2, stage, i), acc2, is_async=True)
            acc, acc2 = warpgroup_mma_wait(num_outstanding=2 * INFLIGHT, deps=[acc, acc2])
        else:
            acc = warpgroup_mma_wait(num_outstanding=INFLIGHT, deps=[acc])
    return acc, acc2, zz, s2


@gluon.jit
def _x_slice(x_smem, stage, i):
    """k16 slice i of X's tile in ring stage `stage`, as wgmma's B operand (16, rows)."""
    return x_smem.index(2 * stage + i // 4).slice(16 * (i % 4), 16, dim=1).permute((1, 0))


@gluon.jit
def _store_acc(acc, pid_n, M, N, bias_ptr, out_ptr, ws_ptr, count_ptr, HAS_BIAS: gl.constexpr, ATOMIC: gl.constexpr,
               BLOCK_M: gl.constexpr, NUM_WARPS: gl.constexpr, GLU: gl.constexpr, OFFSET: gl.constexpr = 0):
    """The wgmma accumulator (BN, BLOCK_M) -> Y. Y is contiguous along N (acc's rows): re-laid out with 8 rows per
    thread (16 with GLU: a gate / up pair of 8-row halves, whose 8 results are stored), stores are 16 bytes wide
    and addresses cheap; the lanes of a warp span the tile's BN rows (a wider span would hold every element
    twice)."""
    BN: gl.constexpr = acc.shape[0]
    PER_THREAD: gl.constexpr = 16 if GLU else 8
    ROW_LANES: gl.constexpr = min(32, BN // PER_THREAD)
    acc = gl.convert_layout(acc, gl.BlockedLayout([PER_THREAD, 1], [ROW_LANES, 32 // ROW_LANES], [1, NUM_WARPS],
                                                  [0, 1]))
    acc_rows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, acc.type.layout))
    _write_out(acc, acc_rows, acc_rows < N, M, N, bias_ptr, out_ptr, ws_ptr, count_ptr, HAS_BIAS, ATOMIC, BLOCK_M,
               GLU, OFFSET)


@gluon.jit
def _w4a16_wgmma_kernel(x_desc, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, KT, TILES_PER_SPLIT,
                        ws_ptr, count_ptr, x_desc2, GS: gl.constexpr, SYM: gl.constexpr,
                        HAS_BIAS: gl.constexpr, ATOMIC: gl.constexpr, BLOCK_M: gl.constexpr, R: gl.constexpr,
                        NUM_WARPS: gl.constexpr, STAGES: gl.constexpr, GLU: gl.constexpr = False):
    """M > 8 on Hopper: the same register A fragments fed to async wgmma (m64nBLOCK_Mk16, one warpgroup per
    64 rows), X (the B operand) streamed by TMA through a ring of STAGES shared-memory tiles so its loads overlap
    the tensor cores; scales applied in the dequant. The next slice's dequant overlaps the running wgmmas (up to
    INFLIGHT of them: with n >= 128 one at a time leaves the tensor cores waiting). A BLOCK_M past 256 is taken in
    two parts (_row_part; x_desc2 is the second part's X box, else unused): one wgmma per part and slice, both
    from the same A fragments. No split K with parts (its arrival counter is per program)."""
    BF16: gl.constexpr = x_desc.dtype == gl.bfloat16
    RB: gl.constexpr = R * NUM_WARPS
    BN: gl.constexpr = 16 * RB
    TILE_GROUP: gl.constexpr = GS == 128  # one group per 128-wide tile
    B1: gl.constexpr = _row_part(BLOCK_M, 0)
    B2: gl.constexpr = _row_part(BLOCK_M, 1)
    INFLIGHT: gl.constexpr = _inflight(B1)
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    kt0, kt1 = _k_range(KT, TILES_PER_SPLIT)
    m0 = pid_m * BLOCK_M

    x_smem = gl.allocate_shared_memory(x_desc.dtype, [2 * STAGES, B1, 64], x_desc.layout)
    acc = gl.zeros((BN, B1), gl.float32, layout=_wgmma_layout(NUM_WARPS, B1))
    x_smem2, acc2 = x_smem, acc  # (no second part: never used)
    if B2 > 0:
        x_smem2 = gl.allocate_shared_memory(x_desc.dtype, [2 * STAGES, B2, 64], x_desc.layout)
        acc2 = gl.zeros((BN, B2), gl.float32, layout=_wgmma_layout(NUM_WARPS, B2))
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()
    for i in gl.static_range(STAGES - 1):  # the ring's first tiles in flight
        _issue_parts(x_desc, x_desc2, x_smem, x_smem2, bars, i, m0, kt0 + i, kt0 + i < kt1, BLOCK_M)

    w_off, w_ok = _word_offsets(pid_n, N, KT, RB, NUM_WARPS)
    w0, w1 = _load_tile(qw_ptr, w_off + kt0 * 256, w_ok & (kt0 < kt1), RB)
    rows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, w0.type.layout))
    rows_ok = rows < N

    zz, s2 = _group_params(s_ptr, z_ptr, kt0 if TILE_GROUP else 0, rows, rows_ok, N, SYM, BF16, True)
    for kt in range(kt0, kt1):
        j = kt - kt0
        stage = j % STAGES
        n0, n1 = _load_tile(qw_ptr, w_off + (kt + 1) * 256, w_ok & (kt + 1 < kt1), RB)  # next weights in flight
        if TILE_GROUP:  # with their group's parameters
            nzz, ns2 = _group_params(s_ptr, z_ptr, kt + 1, rows, rows_ok & (kt + 1 < kt1), N, SYM, BF16, True)
        mbarrier.wait(bars.index(stage), (j // STAGES) & 1)
        acc, acc2, zz, s2 = _wgmma_slices(acc, acc2, w0, w1, x_smem, x_smem2, stage, zz, s2, kt, rows, rows_ok, s_ptr,
                                          z_ptr, N, K, GS, SYM, BF16, BLOCK_M, NUM_WARPS, INFLIGHT, 0, INFLIGHT)
        # this warpgroup's wgmmas of the previous tile are done (all but the INFLIGHT newest slices' are); once
        # every warpgroup is here, its ring stage is free for the tile STAGES - 1 ahead
        gl.thread_barrier()
        ahead = kt + STAGES - 1
        _issue_parts(x_desc, x_desc2, x_smem, x_smem2, bars, (j + STAGES - 1) % STAGES, m0, ahead, ahead < kt1,
                     BLOCK_M)
        acc, acc2, zz, s2 = _wgmma_slices(acc, acc2, w0, w1, x_smem, x_smem2, stage, zz, s2, kt, rows, rows_ok, s_ptr,
                                          z_ptr, N, K, GS, SYM, BF16, BLOCK_M, NUM_WARPS, INFLIGHT, INFLIGHT, 8)
        w0, w1 = n0, n1
        if TILE_GROUP:
            zz, s2 = nzz, ns2
    acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    _store_acc(acc, pid_n, M, N, bias_ptr, out_ptr, ws_ptr, count_ptr, HAS_BIAS, ATOMIC, BLOCK_M, NUM_WARPS, GLU)
    if B2 > 0:
        acc2 = warpgroup_mma_wait(num_outstanding=0, deps=[acc2])
        _store_acc(acc2, pid_n, M, N, bias_ptr, out_ptr, ws_ptr, count_ptr, HAS_BIAS, False, BLOCK_M, NUM_WARPS, GLU,
                   B1)


@triton.constexpr_function
def _wgmma_layout(num_warps, n):
    """The accumulator layout of wgmma m64nNk16 with num_warps / 4 warpgroups along the weight rows."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@gluon.jit
def _ws_load_x(x_desc, x_smem, xready, xempty, m0, kt0, kt1):
    """The warp-specialized kernel's X loader (one warp): tile kt's X, (BLOCK_M, 128) as two TMA boxes, into
    stage (kt - kt0) % STAGES of its ring once the consumers have released that stage."""
    STAGES: gl.constexpr = xready.shape[0]
    for kt in range(kt0, kt1):
        j = kt - kt0
        mbarrier.wait(xempty.index(j % STAGES), ((j // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
        _issue_x(x_desc, x_smem, xready, j % STAGES, m0, kt, True, x_desc.block_type.shape[0])


@gluon.jit
def _ws_load_w(w_desc, w_smem, s_ring, z_ring, wready, wempty, s_ptr, z_ptr, N, K, rb0, kt0, kt1,
               GS: gl.constexpr, SYM: gl.constexpr):
    """The weight loader (one warp): this CTA's packed words of tile kt (RB rows of 256 words, one TMA box) into
    stage (kt - kt0) % STAGES of its ring, and the tile's group parameters (cp.async; per-channel: group 0 each
    time, from L2) into the parameter rings' slots of that stage. The stage's ready barrier completes when both
    have landed."""
    STAGES: gl.constexpr = wready.shape[0]
    p_off = rb0 * 16 + gl.arange(0, s_ring.shape[1], layout=gl.BlockedLayout([8], [32], [1], [0]))
    for kt in range(kt0, kt1):
        j = kt - kt0
        stage = j % STAGES
        mbarrier.wait(wempty.index(stage), ((j // STAGES) & 1) ^ 1)
        _copy_params(stage, kt, K, N, s_ptr, z_ptr, p_off, p_off < N, s_ring, z_ring, GS, SYM)
        bar = wready.index(stage)
        async_copy.mbarrier_arrive(bar)  # counted before the arrival below: the phase waits for the copies
        mbarrier.expect(bar, w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w_desc, [rb0, kt * 256], bar, w_smem.index(stage))


@gluon.jit
def _ws_words(w_smem, wready, j, live, RB: gl.constexpr, NUM_WARPS: gl.constexpr):
    """Wait for tile j's words in the weight ring and read each lane's own (two 128-bit loads) -> _tile_halves."""
    STAGES: gl.constexpr = wready.shape[0]
    mbarrier.wait(wready.index(j % STAGES), (j // STAGES) & 1, pred=live)
    words = w_smem.index(j % STAGES).load(gl.BlockedLayout([1, 8], [1, 32], [NUM_WARPS, 1], [1, 0]))
    return _tile_halves(gl.convert_layout(gl.reshape(words, (RB, 32, 8)), _words_layout(NUM_WARPS),
                                          assert_trivial=True), RB)


@gluon.jit
def _ws_mma(x_smem, w_smem, s_ring, z_ring, xready, xempty, wready, wempty, N, K, kt0, kt1, pid_n,
            GS: gl.constexpr, SYM: gl.constexpr, BF16: gl.constexpr, BLOCK_M: gl.constexpr, R: gl.constexpr,
            NUM_WARPS: gl.constexpr):
    """The warp-specialized kernel's consumers (the default partition): the wgmma kernel's K loop, with X and the
    words read from the loaders' rings; a tile's stages go back to the loaders once every consumer warp's wgmmas
    of it are done. Returns (acc, )."""
    STAGES: gl.constexpr = xready.shape[0]
    RB: gl.constexpr = R * NUM_WARPS
    BN: gl.constexpr = 16 * RB
    INFLIGHT: gl.constexpr = _inflight(BLOCK_M)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    GPT: gl.constexpr = _groups_per_tile(GS)
    w0, w1 = _ws_words(w_smem, wready, 0, True, RB, NUM_WARPS)
    rows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, w0.type.layout))
    rows_ok = rows < N
    acc = gl.zeros((BN, BLOCK_M), gl.float32, layout=mma)
    zz, s2 = _ring_params(s_ring, z_ring, 0, rows, SYM, BF16)
    for kt in range(kt0, kt1):
        j = kt - kt0
        stage = j % STAGES
        mbarrier.wait(xready.index(stage), (j // STAGES) & 1)
        acc, _, zz, s2 = _wgmma_slices(acc, acc, w0, w1, x_smem, x_smem, stage, zz, s2, kt, rows, rows_ok, s_ring,
                                       z_ring, N, K, GS, SYM, BF16, BLOCK_M, NUM_WARPS, INFLIGHT, 0, INFLIGHT, True)
        # every consumer warp's wgmmas of the previous tile are done: its stages go back to the loaders (the
        # fence orders the generic-proxy reads of its words before the TMA that refills them)
        gl.thread_barrier()
        fence_async_shared()
        mbarrier.arrive(xempty.index((j + STAGES - 1) % STAGES), pred=j > 0)
        mbarrier.arrive(wempty.index((j + STAGES - 1) % STAGES), pred=j > 0)
        acc, _, zz, s2 = _wgmma_slices(acc, acc, w0, w1, x_smem, x_smem, stage, zz, s2, kt, rows, rows_ok, s_ring,
                                       z_ring, N, K, GS, SYM, BF16, BLOCK_M, NUM_WARPS, INFLIGHT, INFLIGHT, 4, True)
        # the next tile's words and first group while the last slices run
        n0, n1 = _ws_words(w_smem, wready, j + 1, kt + 1 < kt1, RB, NUM_WARPS)
        nzz, ns2 = _ring_params(s_ring, z_ring, ((j + 1) % STAGES) * GPT, rows, SYM, BF16)
        acc, _, zz, s2 = _wgmma_slices(acc, acc, w0, w1, x_smem, x_smem, stage, zz, s2, kt, rows, rows_ok, s_ring,
                                       z_ring, N, K, GS, SYM, BF16, BLOCK_M, NUM_WARPS, INFLIGHT, 4, 8, True)
        w0, w1 = n0, n1
        zz, s2 = nzz, ns2
    return (warpgroup_mma_wait(num_outstanding=0, deps=[acc]), )


@gluon.jit
def _w4a16_ws_kernel(x_desc, w_desc, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, KT, TILES_PER_SPLIT,
                     ws_ptr, count_ptr, GS: gl.constexpr, SYM: gl.constexpr, HAS_BIAS: gl.constexpr,
                     ATOMIC: gl.constexpr, BLOCK_M: gl.constexpr, R: gl.constexpr, NUM_WARPS: gl.constexpr,
                     STAGES: gl.constexpr, GLU: gl.constexpr = False):
    """Hopper, 16 < M <= 64 and short-K layers up to M = 256 (_config): the wgmma kernel's math, warp-specialized.
    Two one-warp loaders stream X and the packed weights (with the tile's group parameters) by TMA and cp.async,
    each into its own ring of STAGES stages (ready / empty mbarriers), while the NUM_WARPS consumer warps only wait
    on shared memory, dequantize and issue wgmma: no global load in their loop, and the weights run up to STAGES
    tiles ahead."""
    RB: gl.constexpr = R * NUM_WARPS
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    kt0, kt1 = _k_range(KT, TILES_PER_SPLIT)
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [2 * STAGES, BLOCK_M, 64], x_desc.layout)
    w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, RB, 256], w_desc.layout)
    GPT: gl.constexpr = _groups_per_tile(GS)
    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    s_ring = gl.allocate_shared_memory(s_ptr.dtype.element_ty, [STAGES * GPT, 16 * RB], flat)
    z_ring = gl.allocate_shared_memory(gl.uint8, [STAGES * GPT, 16 * RB], flat)
    xready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    xempty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    wready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    wempty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(xready.index(i), count=1)
        mbarrier.init(xempty.index(i), count=1)
        mbarrier.init(wready.index(i), count=1)
        mbarrier.init(wempty.index(i), count=1)
    fence_async_shared()
    acc, = gl.warp_specialize([
        (_ws_mma, (x_smem, w_smem, s_ring, z_ring, xready, xempty, wready, wempty, N, K, kt0, kt1, pid_n, GS, SYM,
                   x_desc.dtype == gl.bfloat16, BLOCK_M, R, NUM_WARPS)),
        (_ws_load_x, (x_desc, x_smem, xready, xempty, pid_m * BLOCK_M, kt0, kt1)),
        (_ws_load_w, (w_desc, w_smem, s_ring, z_ring, wready, wempty, s_ptr, z_ptr, N, K, pid_n * RB, kt0, kt1, GS,
                      SYM)),
    ], [1, 1], [24, 24])
    _store_acc(acc, pid_n, M, N, bias_ptr, out_ptr, ws_ptr, count_ptr, HAS_BIAS, ATOMIC, BLOCK_M, NUM_WARPS, GLU)


@triton.jit
def _w4a16_dot_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, KT, TILES_PER_SPLIT,
                      GS, SYM: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The same product with tl.dot: each tile unpacked to (BLOCK_N, 128) in k order, dequantized in fp32."""
    RB: tl.constexpr = BLOCK_N // 16
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = pid_n * RB + tl.arange(0, RB)
    kt0 = pid_k * TILES_PER_SPLIT
    kt1 = tl.minimum(kt0 + TILES_PER_SPLIT, KT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(kt0, kt1):
        words = tl.load(qw_ptr + rb[:, None] * (KT * 256) + kt * 256 + tl.arange(0, 256)[None, :],
                        mask=(rb < (N + 15) // 16)[:, None], other=0)  # (RB, lane·8 + r)
        codes = (words[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 0xF  # nibble p = 4e + a
        codes = tl.reshape(codes, (RB, 8, 4, 2, 2, 2, 2, 4))  # (rb, g, t, h, ch, rh, e, a)
        codes = tl.permute(codes, (0, 5, 1, 3, 7, 4, 2, 6))  # (rb, rh, g, h, a, ch, t, e)
        codes = tl.reshape(codes, (BLOCK_N, 128)).to(tl.float32)  # (n, k - 128 kt)
        k = kt * 128 + tl.arange(0, 128)
        g_off = (k // GS)[None, :] * N + offs_n[:, None]
        g_ok = (offs_n < N)[:, None] & (k < K)[None, :]
        s = tl.load(s_ptr + g_off, mask=g_ok, other=0).to(tl.float32)
        if SYM:
            w = (codes - 8.0) * s
        else:
            w = (codes - tl.load(z_ptr + g_off, mask=g_ok, other=0).to(tl.float32)) * s
        x_mask = (offs_m < M)[:, None] & (k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * K + k[None, :], mask=x_mask, other=0.0)
        acc += tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)))
    n_ok = offs_n < N
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]  # once, by the first K split
    out_off = offs_m[:, None] * N + offs_n[None, :]
    out_mask = (offs_m < M)[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptr + out_off, acc, mask=out_mask, sem="relaxed")
    else:
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@functools.cache  # on every call's launch path: a pure function of a few ints
def _config(m: int, n: int, k_tiles: int, sms: int, hopper: bool = True, aligned: bool = True):
    """(kind, BLOCK_M, R, num_warps, split_k, post_scale, x_smem, stages); kind "ring" (mma_v2, every load
    through a cp.async ring of `stages` tiles; N and K multiples of 16: `aligned`), "mma" (mma_v2), "ws" (sm_90,
    warp-specialized: X and the weights through TMA rings of `stages` tiles) or "wgmma" (sm_90, X through a TMA
    ring of `stages` tiles)."""
    # Picked from sweeps on an H100 (benchmarks/tune_w4a16.py, benchmarks/NOTES-w4a16.md). Outside the
    # warp-specialized kernel, small rings and one warpgroup leave room for several CTAs per SM: that is what
    # hides latency there.
    kind, r, post, smem, stages = "wgmma", 1, False, True, 2
    if m <= 16 and aligned:  # 3 stages, ~4 CTAs per SM: deeper rings and more CTAs measured no better
        kind, block_m, warps, post, stages, per_sm = "ring", 8 if m <= 8 else 16, 4, True, 3, 4
    elif m <= 8:  # X through shared memory unless M = 1 (one 128-bit load per lane instead of 16 per tile)
        kind, block_m, warps, post, smem, stages, per_sm = "mma", 8, 4, True, m > 1, 0, 8
    elif not hopper:
        kind, block_m, warps, stages, per_sm = "mma", min(64, triton.next_power_of_2(m)), 8, 0, 4
    elif m <= 16:
        block_m, warps, per_sm = 16, 4, 6
    elif m <= 64 and aligned:  # (the loader's 16-byte copies of the group parameters)
        return _ws_pick(m, n, k_tiles, sms)
    elif m > 128 and _fill256(m, n, sms) >= 0.8:  # 256-row tiles (one CTA per SM) in near-whole waves
        block_m, warps, per_sm = 256, 8, 1
    elif m <= 256:  # one warpgroup, 2 stages: tile rows, BN and split by the cost model
        block_m, r, split = _wgmma_pick(m, n, k_tiles, sms)
        if split > 1 and k_tiles <= 32 and m > 80 and aligned:
            # K <= 4096 with too few tiles to fill the SMs unsplit (N <= ~6144): the warp-specialized kernel's 64-row
            # (128 from M = 193) BN 64 tiles, unsplit, beat the wgmma kernel's split (its atomic epilogue is as
            # long as the short K loop). H100, 6 short-K shapes (benchmarks/NOTES-w4a16.md): 1.03-1.44x from M = 96;
            # at M = 65-72, the second row tile mostly padding, 0.92-1.17x
            block_m = 64 if m <= 192 else 128
            return "ws", block_m, 1, 4, 1, False, True, 4 if block_m == 64 else 3
        return kind, block_m, r, 4, split, post, smem, stages
    elif hopper and (parts := _parts_pick(m, n, sms)):  # all of M in one tile of two parts (256 + 8 .. 128 rows)
        block_m, warps = parts
        return kind, block_m, r, warps, 1, post, smem, stages
    elif m < 512:  # 2-4 tiles of rows: whichever of three configs costs the fewest CTA waves
        block_m, warps, stages = _wide_pick(m, n, sms)
        return kind, block_m, r, warps, 1, post, smem, stages
    else:  # the grid is large: split K only where it is under one CTA per SM (its atomic epilogue costs)
        block_m, warps, per_sm, stages = 128, 8, 1, 3
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, 16 * r * warps)
    # small grids leave SMs idle: split K (wgmma: at least 4 of its 128-wide tiles per split, to fill the ring)
    split = max(1, min(per_sm * sms // max(tiles, 1), k_tiles if kind != "wgmma" else k_tiles // 4))
    return kind, block_m, r, warps, split, post, smem, stages


def _ws_pick(m: int, n: int, k_tiles: int, sms: int) -> tuple:
    """The warp-specialized kernel's config for 16 < M <= 64: tiles of 32 or 64 rows; where 128-row tiles alone
    would fill the SMs, BN 256 (two consumer warpgroups of R 2; 3 stages at 64 rows, 4 at 32); else where K is long
    enough to split cheaply (>= 128 tiles) BN 128 (one warpgroup, R 2, 3 stages), else BN 64 (R 1, 4 stages); K
    split as far as the CTAs that fit at once allow (_ws_ctas_per_sm). From H100 sweeps over 8-10 Llama layer
    shapes at M = 32 and 64 (benchmarks/NOTES-w4a16.md, sessions 11 and 27): BN 256 reads X from L2 once per 256
    weight rows; at odd M from 20 to 64 on five wide layers it ran at 0.99-1.08x the speed of BN 128 (geomean
    1.024x), and was mixed on the long-K split layer (70B down, 0.92-1.10x), which keeps BN 128."""
    block_m = 32 if m <= 32 else 64
    rows = triton.cdiv(m, block_m)
    if rows * triton.cdiv(n, 128) >= sms:
        r, warps, stages = 2, 8, 3 if block_m == 64 else 4
    else:
        r, warps, stages = (2, 4, 3) if k_tiles >= 128 else (1, 4, 4)
    tiles = rows * triton.cdiv(n, 16 * r * warps)
    fit = _ws_ctas_per_sm(block_m, r, warps, stages) * sms
    split = max(s for s in (1, 2, 4, 8) if s == 1 or (k_tiles // s >= 4 and tiles * s <= fit))
    return "ws", block_m, r, warps, split, False, True, stages


def _ws_maxnreg(block_m: int, r: int, warps: int) -> int:
    """Registers per thread the warp-specialized kernel is compiled for. Its loaders take a warpgroup's worth of
    registers (allocation is per warpgroup; they keep 24 each and give the rest to the consumers), so a CTA counts
    warps + 4 warps: 80 leaves registers for three 4-warp CTAs of BN 64 per SM; a larger tile needs 128, a
    128-row one with two warpgroups 168."""
    if warps == 8 and block_m > 64:
        return 168
    return 80 if r == 1 and block_m <= 64 else 128


def _ws_ctas_per_sm(block_m: int, r: int, warps: int, stages: int) -> int:
    """CTAs of the warp-specialized kernel that fit an SM: registers (_ws_maxnreg, for warps + the loaders' 4)
    and shared memory (X and weight rings)."""
    smem = stages * (block_m * 128 * 2 + 16 * r * warps * 128 // 2) + 2048
    return min(65536 // (_ws_maxnreg(block_m, r, warps) * (warps + 4) * 32), 228 * 1024 // (smem + 1024))


# CTAs of the wgmma kernel with 4 warps and 2 stages that fit on an SM, by (BLOCK_M, R): registers of the sm_90
# compile (tests/test_w4a16_kernel.py recomputes this from it), then 2 stages of X in shared memory
WGMMA_CTAS_PER_SM = {(32, 1): 7, (32, 2): 4, (64, 1): 5, (64, 2): 3, (128, 1): 3, (128, 2): 2}


def _wgmma_pick(m: int, n: int, k_tiles: int, sms: int) -> tuple[int, int, int]:
    """(BLOCK_M, R, split) of the wgmma kernel with 4 warps and 2 stages for 16 < M <= 256: the lowest
    _wgmma_cost among tiles of 32 rows up to M = 32, 64 up to 64, 128 up to 128, then 64 or 128; BN 64 or 128;
    splits that leave each at least 4 tiles and the grid at most 8 CTAs per SM."""
    rows = (max(32, triton.next_power_of_2(m)),) if m <= 128 else (64, 128)
    options = [(bm, r, s) for bm in rows for r in (1, 2) for s in (1, 2, 3, 4, 6, 8, 12, 16)
               if s == 1 or (k_tiles // s >= 4 and triton.cdiv(m, bm) * triton.cdiv(n, 64 * r) * s <= 8 * sms)]
    return min(options, key=lambda c: _wgmma_cost(m, n, k_tiles, sms, *c))


def _wgmma_cost(m: int, n: int, k_tiles: int, sms: int, block_m: int, r: int, split: int) -> float:
    """Modelled time (arbitrary units) of the wgmma kernel with 4 warps and 2 stages. The CTAs run in waves;
    within a wave `co` of them share an SM, and each 128-wide K tile of a CTA costs a fixed latency or, when
    sharing, what the SM spends on its co-residents' tiles: wgmma work (BLOCK_M x BN), dequant (BN) and X
    staging (BLOCK_M). A split adds an atomic epilogue. Constants fitted to an H100 sweep of 11 Llama layer
    shapes at M = 32-256 (benchmarks/NOTES-w4a16.md): the picks are within 1% of the best swept config on
    average, 10% at worst."""
    per_sm = WGMMA_CTAS_PER_SM[block_m, r]
    ctas = triton.cdiv(m, block_m) * triton.cdiv(n, 64 * r) * split
    waves = triton.cdiv(ctas, per_sm * sms)
    co = min(per_sm, triton.cdiv(ctas, sms * waves))
    tile = max(240, co * (0.08 * block_m * r + 36 * r + 0.11 * block_m))
    epilogue = 0.21 * co * block_m * 64 * r if split > 1 else 0
    return waves * (triton.cdiv(k_tiles, split) * tile + epilogue)


# (BLOCK_M, warps, stages) of the wgmma kernel for 256 < M < 512 (BN 16 x warps, no split), each with its time
# per wave of CTAs relative to the first: fitted to an H100 sweep of 11 Llama layer shapes at M = 272-496
# (benchmarks/NOTES-w4a16.md); the 4-warp one gets X padded to whole tiles (_pad_rows)
WIDE_CONFIGS = {(128, 8, 3): 1.0, (256, 8, 2): 1.8, (128, 4, 2): 0.57}


def _wide_pick(m: int, n: int, sms: int) -> tuple[int, int, int]:
    """The WIDE_CONFIGS entry with the lowest relative cost x waves of CTAs (a wave: one CTA per SM)."""
    def cost(c):
        (block_m, warps, _), per_wave = c
        return per_wave * triton.cdiv(triton.cdiv(m, block_m) * triton.cdiv(n, 16 * warps), sms)
    return min(WIDE_CONFIGS.items(), key=cost)[0]


def _parts_pick(m: int, n: int, sms: int):
    """(BLOCK_M, warps) of a wgmma tile in two parts (tile_parts: 256 rows and the next power of two up from
    M - 256) holding all of 256 < M <= 384, or None: where the grid (one row of CTAs, one CTA per SM at 2 stages)
    fills >= 70% of its waves, with BN 128 (8 warps) if that does, else BN 64. H100, 11 Llama-2/3 layer shapes at
    M = 264-384 (benchmarks/NOTES-w4a16.md): 1.01-1.30x the previous pick where this fires, but 7B gate_up at
    M = 321-384 (0.89-0.97x) and 70B down at M = 264 (0.94x); the shapes it leaves out (N = 4096, and 70B qkv with
    N = 10240 in 80 CTAs) measured 0.6-0.98x with parts. Three parts (e.g. 336 = 256 + 64 + 16) won on some
    shapes and lost on others: not picked."""
    if not 256 < m <= 384:
        return None
    block_m = 256 + max(8, triton.next_power_of_2(m - 256))
    for warps in (8, 4):
        ctas = triton.cdiv(n, 16 * warps)
        if ctas >= 0.7 * triton.cdiv(ctas, sms) * sms:
            return block_m, warps
    return None


def _pad_rows(m: int, block_m: int, warps: int) -> int:
    """Zero rows the wgmma launch adds to X so that its TMA boxes stay inside it. With one warpgroup, TMA's fill
    of rows past M measured up to 1.9x slower than reading zeros from memory once 24 or more of a tile's rows
    were missing (H100: BN 64 worst, BN 128 up to 13%); with 8 warps the copy cost more than it saved."""
    missing = -m % block_m
    return missing if warps == 4 and missing >= 24 else 0


def _fill256(m: int, n: int, sms: int) -> float:
    """How fully the wgmma kernel's 256-row tiles (BN 128, one CTA per SM) would use the GPU: the share of the
    last wave's SMs that have a tile, times the share of the padded rows that are M's."""
    tiles = triton.cdiv(m, 256) * triton.cdiv(n, 128)
    return tiles / (triton.cdiv(tiles, sms) * sms) * m / (triton.cdiv(m, 256) * 256)


# X's shared-memory tiles in the wgmma kernels: 128-byte swizzle, 64 16-bit columns per row (the TMA boxes)
X_SMEM_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
# the packed words of a weight tile in the warp-specialized kernel: RB rows of 256 words, unswizzled (row-major)
W_SMEM_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)


_WORKSPACES: dict = {}
_RETIRED: list = []  # outgrown workspaces: CUDA graphs captured earlier still point at them, so they stay allocated
# Gluon is experimental and its API moves between Triton releases: the kernels are written for Triton 3.6.
GLUON_TRITON = "3.6"
GLUON_OK = triton.__version__.startswith(GLUON_TRITON + ".")


def _split_workspace(device, numel: int, tiles: int):
    """The fp32 split-K workspace and per-tile arrival counters of `device`, all zeros between calls (the
    kernel re-zeroes what it used). Grown, never shrunk, never freed (a captured CUDA graph keeps the address it
    saw); shared by every call on the device, so two W4A16 GEMMs must not run concurrently on different streams of
    one device."""
    ws, count = _WORKSPACES.get(device, (None, None))
    if ws is None or ws.numel() < numel or count.numel() < tiles:
        if ws is not None:
            _RETIRED.append((ws, count))
        ws = torch.zeros(max(numel, 0 if ws is None else ws.numel()), device=device, dtype=torch.float32)
        count = torch.zeros(max(tiles, 0 if count is None else count.numel()), device=device, dtype=torch.int32)
        _WORKSPACES[device] = ws, count
    return ws, count


def _aligned(n: int, k: int) -> bool:
    """Whether the ring and warp-specialized kernels take these sizes (16-byte copies of the group parameters,
    and of X rows in the ring kernel)."""
    return n % 16 == 0 and k % 16 == 0


def kernel_for(device: torch.device, m: int, n: int, k: int) -> str:
    """The kernel w4a16_gemm runs for an (m, n, k) product on a CUDA device ("a + b" where it takes two launches)."""
    cap = capability(device.index)
    if cap < (8, 0) or not GLUON_OK:
        return "_w4a16_dot_kernel"
    plan = _plan(m, n, -(-k // K_TILE), sm_count(device.index), cap[0] == 9, _aligned(n, k))
    return " + ".join(f"_w4a16_{config[0]}_kernel" for _, _, config in plan)


def w4a16_gemm(x, qweight, scales, zeros, group_size: int, n: int, k: int, bias=None, config=None, glu=False):
    """Y (M, n) = X (M, k) · dequant(W)ᵀ (+ bias) on the GPU (or under TRITON_INTERPRET=1). See the module doc.

    config: a tuple as _config returns, to override the choice by M (for tuning); it then covers all of M.
    glu: W is a gated layer's (nn/fuse.py: gate and up channels in alternate 8-row blocks, n a multiple of 16);
    returns silu(gate) · up (M, n / 2), made in the Gluon kernels' epilogue (the portable kernel's caller applies
    it to the full Y).
    """
    if glu and n % 16:
        raise FourbitError(f"a gated W4A16 GEMM pairs 8-row blocks of gate and up channels: n must be a multiple of "
                           f"16, got {n}")
    m = x.shape[0]
    x = x.contiguous()
    k_tiles = qweight.shape[1] // WORDS_PER_TILE
    cap = capability(x.device.index) if x.is_cuda else (0, 0)
    sms = sm_count(x.device.index) if x.is_cuda else 4
    aligned = _aligned(n, k)
    if config is not None and config[0] in ("ring", "ws") and not aligned:
        raise FourbitError(f"the {config[0]} kernel needs N and K in multiples of 16 (got {n}, {k}): "
                           "choose another config")
    gluon = cap >= (8, 0) and GLUON_OK
    if cap >= (8, 0) and not gluon:
        _warn_no_gluon()
    plan = ((0, m, config), ) if config else _plan(m, n, k_tiles, sms, cap[0] == 9, aligned, gluon)
    # the Gluon kernels reduce K splits themselves (Y in x's dtype); the portable one (one launch) adds them in fp32
    fp32 = not gluon and _k_split(k_tiles, plan[0][2][4])[1] > 1
    out = (torch.zeros((m, n), device=x.device, dtype=torch.float32) if fp32
           else x.new_empty((m, n // 2 if glu and gluon else n)))
    # row slices only where the plan has several launches (a view costs ~1-3 us of host time per call)
    parts = ((x, out, plan[0][2]), ) if len(plan) == 1 else ((x[a:b], out[a:b], cfg) for a, b, cfg in plan)
    for xs, outs, cfg in parts:
        _launch(xs, qweight, scales, zeros, bias, outs, group_size, n, k, k_tiles, cfg, gluon, glu and gluon)
    out = out.to(x.dtype) if fp32 else out
    if glu and not gluon:
        out = silu_mul(*gated_halves(out)).view(m, n // 2)
    return out


@functools.cache  # on every call's launch path
def _plan(m: int, n: int, k_tiles: int, sms: int, hopper: bool, aligned: bool, split_rows: bool = True) -> tuple:
    """The launches of an (m, n) product: ((first row, end row, _config's tuple), ...), the rows split by
    _row_parts when split_rows (the Gluon kernels), else all of M in one."""
    one = not split_rows or hopper and _parts_pick(m, n, sms)  # (a tile in parts: no second launch)
    parts = ((0, m), ) if one else _row_parts(m, n, k_tiles, hopper)
    return tuple((a, b, _config(b - a, n, k_tiles, sms, hopper, aligned)) for a, b in parts)


def _k_split(k_tiles: int, split: int) -> tuple[int, int]:
    """(K tiles per split, splits) for a requested split: no split left empty."""
    per_split = triton.cdiv(k_tiles, split)
    return per_split, triton.cdiv(k_tiles, per_split)


def _row_parts(m: int, n: int, k_tiles: int, hopper: bool) -> tuple:
    """The row ranges of X that w4a16_gemm computes as separate launches, on Hopper: the first 256 rows and the
    rest for 256 < M <= 288 on layers with N·K >= 2^25 (and up to M = 320 where also N >= 12288), the first 128 and
    the rest for 128 < M <= 144 where N·K >= 80·2^20; else all of M at once. The rest runs on the ring or
    warp-specialized kernel; one launch would take tiles mostly of padding or dequantize every weight tile once more.
    The second launch reads the weights again: it pays where the product is compute-bound and the layer large.
    Fitted to H100 probes on 19 Llama/Qwen/Mistral layer shapes, checked on 8 more (benchmarks/NOTES-w4a16.md):
    1.01-1.67x the single launch at 137 of the 140 measured points where it applies, 0.85-0.91x at 3 (Phi-3-medium
    qkv, 7680 x 5120); outside it two launches measured 0.75-1.29x (the second launch's fixed cost on small
    layers, the rest's split K where N is small)."""
    size = n * k_tiles * K_TILE
    if hopper and size >= 1 << 25 and (256 < m <= 288 or 288 < m <= 320 and n >= 12288):
        return ((0, 256), (256, m))
    if hopper and 128 < m <= 144 and size >= 80 << 20:
        return ((0, 128), (128, m))
    return ((0, m), )


def _launch(x, qweight, scales, zeros, bias, out, group_size: int, n: int, k: int, k_tiles: int, config: tuple,
            gluon: bool, glu: bool = False):
    """One launch of the kernel `config` names (without `gluon`: the portable _w4a16_dot_kernel, for the
    interpreter, a pre-Ampere GPU or another Triton): out (x's rows, n) = x · dequant(W)ᵀ (+ bias), or with `glu`
    (a Gluon kernel) its gated form (x's rows, n / 2)."""
    m = x.shape[0]
    kind, block_m, r, warps, split, post, smem, stages = config
    per_split, split = _k_split(k_tiles, split)
    args = (x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales)
    sizes = (m, n, k, k_tiles, per_split)
    flags = dict(SYM=zeros is None, HAS_BIAS=bias is not None, ATOMIC=split > 1)
    if not gluon:
        gs = k_tiles * K_TILE if group_size == -1 else group_size  # per-channel: every k is in group 0
        block_m, block_n = max(16, min(64, block_m)), 16 * r * warps
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
        _w4a16_dot_kernel[grid](*args, out, *sizes, gs, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, **flags)
        return
    flags["GLU"] = glu
    grid = (triton.cdiv(n, N_TILE * r * warps), triton.cdiv(m, block_m), split)
    ws, count = _split_workspace(x.device, m * n, grid[0] * grid[1]) if split > 1 else (out, out)
    if kind != "mma" and x.data_ptr() % 16:  # TMA and cp.async copy 16-byte aligned rows of X
        x = x.clone()
    if kind in ("wgmma", "ws"):
        # zero columns pad K to a multiple of 8 (rows in whole 16 bytes; the ring needs no pad); rows: _pad_rows
        pad_m = _pad_rows(m, block_m, warps)
        if k % 8 or pad_m:
            x = torch.nn.functional.pad(x, (0, -k % 8, 0, pad_m))
        # (tile_parts.fn: the plain function, without the constexpr wrapper's ~2 us per launch)
        x_desc, *more = [TensorDescriptor.from_tensor(x, [rows, 64], X_SMEM_LAYOUT) for rows in tile_parts.fn(block_m)]
        consts = dict(GS=group_size, BLOCK_M=block_m, R=r, NUM_WARPS=warps, STAGES=stages, num_warps=warps)
        if kind == "wgmma":
            if more and split > 1:
                raise FourbitError(f"a wgmma tile of {block_m} rows (in parts) takes no split K, got {split}")
            more = more or [x_desc]  # (no second part: unused)
            _w4a16_wgmma_kernel[grid](x_desc, *args[1:], out, *sizes, ws, count, *more, **consts, **flags)
        else:
            w_desc = TensorDescriptor.from_tensor(qweight, [r * warps, 256], W_SMEM_LAYOUT)
            _w4a16_ws_kernel[grid](x_desc, w_desc, *args[2:], out, *sizes, ws, count, **consts, **flags,
                                   maxnreg=_ws_maxnreg(block_m, r, warps))
    elif kind == "ring":
        _w4a16_ring_kernel[grid](x, *args[1:], out, *sizes, ws, count, GS=group_size, BLOCK_M=block_m, R=r,
                                 NUM_WARPS=warps, STAGES=stages, num_warps=warps, **flags, **pdl_args(x))
    else:
        _w4a16_mma_kernel[grid](*args, out, *sizes, ws, count, GS=group_size, POST_SCALE=post, X_SMEM=smem,
                                EVEN_K=k % K_TILE == 0, BLOCK_M=block_m, R=r, NUM_WARPS=warps,
                                num_warps=warps, **flags)


@functools.cache
def _warn_no_gluon():
    warnings.warn(f"fourbit's W4A16 GPU kernels are written for Triton {GLUON_TRITON} (Gluon's API changes between "
                  f"releases); with Triton {triton.__version__} W4A16 layers run the slower portable Triton kernel. "
                  f"Install triton=={GLUON_TRITON}.* for full speed.", stacklevel=3)
