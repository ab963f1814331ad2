"""Paged attention: causal attention of a step's new tokens over a paged KV cache, for prefill, chunked prefill
and decode in one kernel (Triton).

Math. Sequence s has q_len = query_start[s+1] - query_start[s] new tokens q (rows query_start[s] + j of q) and
seq_lens[s] tokens in the cache, the new ones included (already written). Query j sits at absolute position
p = seq_lens[s] - q_len + j and, for query head h (kv head h // G, G = Hq / Hkv), computes
    out[h] = Σ_k softmax_k(scale · q[h] · K[k]) · V[k]   over keys k in [0, p], and k > p - sliding_window if set.
Key k of sequence s lives in block block_tables[s, k // block_size] at offset k % block_size.

Shapes. q (T, Hq, D) fp16/bf16 (fp32 works, with TF32 dots on the GPU), last dim contiguous (a view of a fused qkv
output is fine); k_cache, v_cache (num_blocks, Hkv, block_size, D) in q's dtype, last dim contiguous;
block_tables (S, max_blocks), seq_lens (S,), query_start (S+1,) int32; out (T, Hq, D) in q's dtype.
D in {32, 64, 128, 256}. A sequence with seq_lens == 0 (CUDA-graph padding) writes zeros and reads no K/V.

Kernel `_paged_attention_kernel`, one program per (tile of BLOCK_Q query tokens of one sequence, kv head):
- The tile's rows are its BLOCK_Q tokens × the G query heads of the kv head (G padded to a power of two, GP):
  row r is token r // GP, head r % GP, so one K/V tile read serves every query head of the group, and a decode
  (BLOCK_Q = 1 token) fills tl.dot's 16 rows with 16 // GP tokens, of which all but the first are masked.
- Keys come in tiles of BLOCK_N tokens gathered through the block table (one block id per key token: any
  block_size works), from the sliding-window start of the tile's first query to the causal limit of its last.
  Only the tiles on the diagonal and at the window's edge apply a mask; the ones between run mask-free.
- Online softmax in fp32 with exp2 (scores times scale·log2 e); P is rounded to the cache dtype for P·V.
- Program -> (sequence, tile) without host syncs (CUDA graphs): decode (max_query_len == 1) launches (Hkv, S);
  otherwise sequence s owns the slots query_start[s] // BLOCK_Q + s ... (at least cdiv(q_len, BLOCK_Q) of them),
  the grid is (Hkv, T // BLOCK_Q + S slots) and a program finds its sequence by binary search in query_start;
  slots past the sequence's last tile exit at once. A sequence's first slot takes its last tile (the longest key
  range), so long programs start first and short ones fill the tail.
- Split KV (flash decoding) for decode when S · Hkv programs would leave SMs idle: grid (Hkv, S, splits), each
  split does an equal share (whole key tiles) of the sequence's keys and writes fp32 (acc, max, sum) to a
  workspace; `_combine_kernel` (one program per (sequence, query head)) rescales and sums the splits. The number
  of splits depends only on host-known sizes (S, Hkv, the block-table width), so a captured graph stays valid;
  the shares are computed in the kernel from seq_lens, in whole key tiles: a short context in a wide block table
  uses as many splits as it has tiles, and the splits past it only mark themselves empty for the combine.
- With PDL (kernels/pdl.py) a program reads its metadata and asks L2 for its first key tile's cached rows (those
  of earlier steps) before it waits for the previous kernel, which writes this step's rows.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..errors import FourbitError
from . import HEAD_DIMS, sm_count
from .pdl import pdl_args, pdl_start

LOG2E = 1.4426950408889634


class AttnConfig(NamedTuple):
    block_q: int  # query tokens per program (rows = block_q × padded G, at least 16)
    block_n: int  # key tokens per loop step
    num_warps: int
    num_stages: int
    splits: int  # KV splits per (sequence, kv head); > 1 only for decode


@triton.jit
def _key_rows(bt_row, kpos, ok, kv_head_off, stride_kb, stride_kt, BLOCK_SIZE: tl.constexpr, MASK: tl.constexpr):
    """Offsets in k_cache / v_cache of the keys at positions kpos, each through its block-table entry (read only
    where ok with MASK)."""
    if MASK:
        blk = tl.load(bt_row + kpos // BLOCK_SIZE, mask=ok, other=0)
    else:
        blk = tl.load(bt_row + kpos // BLOCK_SIZE)
    return blk.to(tl.int64) * stride_kb + kv_head_off + (kpos % BLOCK_SIZE) * stride_kt


@triton.jit
def _attend(acc, m_i, l_i, q, k_cache, v_cache, bt_row, kv_head_off, stride_kb, stride_kt, scale_log2e,
            n_start, n_end, q_pos, hi, window, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
            D: tl.constexpr, MASK: tl.constexpr, WINDOW: tl.constexpr):
    """Online softmax over key tiles n_start, n_start + BLOCK_N, ... < n_end. With MASK: causal (k <= q_pos),
    window (k > q_pos - window) and bounds (k < hi) masks; without, every key of every tile counts."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    for n0 in range(n_start, n_end, BLOCK_N):
        kpos = n0 + offs_n  # (BLOCK_N,) absolute key positions
        in_seq = kpos < hi  # (the masks only)
        off = _key_rows(bt_row, kpos, in_seq, kv_head_off, stride_kb, stride_kt, BLOCK_SIZE, MASK)  # (BLOCK_N,)
        ptrs = off[:, None] + offs_d[None, :]  # (BLOCK_N, D)
        if MASK:
            k = tl.load(k_cache + ptrs, mask=in_seq[:, None], other=0.0)
            v = tl.load(v_cache + ptrs, mask=in_seq[:, None], other=0.0)
        else:
            k = tl.load(k_cache + ptrs)
            v = tl.load(v_cache + ptrs)
        s = tl.dot(q, tl.trans(k)) * scale_log2e  # (BLOCK_M, BLOCK_N) fp32, log2 units
        if MASK:
            ok = (kpos[None, :] <= q_pos[:, None]) & in_seq[None, :]
            if WINDOW:
                ok = ok & (kpos[None, :] > q_pos[:, None] - window)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: m_i starts at -1e30, so no inf - inf
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefetch_kv(k_cache, v_cache, bt_row, kv_head_off, stride_kb, stride_kt, lo, end,
                 BLOCK_SIZE: tl.constexpr, N: tl.constexpr, D: tl.constexpr):
    """Ask L2 for the K and V lines of keys lo .. min(lo + N, end) - 1 (a hint: nothing comes back, no thread
    waits), so that the loads after the previous kernel's end find them there."""
    LINE: tl.constexpr = 128 // (k_cache.dtype.element_ty.primitive_bitwidth // 8)  # elements per 128-byte line
    NL: tl.constexpr = (D + LINE - 1) // LINE
    kpos = lo + tl.arange(0, N)
    ok = kpos < end
    off = _key_rows(bt_row, kpos, ok, kv_head_off, stride_kb, stride_kt, BLOCK_SIZE, True)
    off = off[:, None] + (tl.arange(0, NL) * LINE)[None, :]
    flag = tl.broadcast_to(ok[:, None], (N, NL)).to(tl.int32)
    for cache in tl.static_range(2):
        base = k_cache if cache == 0 else v_cache
        tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
                                  "=r,l,r", [base + off, flag], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _find_seq(query_start, pid, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence s whose first slot query_start[s] // BLOCK_Q + s is <= pid (binary search)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start + mid) // BLOCK_Q + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# The sequence count and the block table's width (its row stride) vary from step to step. Specialized (Triton
# compiles a variant for 1 and one for multiples of 16), a batch whose values fall in a class LLM.warmup's
# one-sequence prefills did not meet would compile (~1 s) in the middle of serving.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _paged_attention_kernel(q_ptr, k_cache, v_cache, block_tables, seq_lens, query_start, out_ptr,
                            ws_acc, ws_ml, num_seqs, scale_log2e, window,
                            stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kh, stride_kt,
                            stride_bt,
                            G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                            BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DECODE: tl.constexpr,
                            SPLIT: tl.constexpr, WINDOW: tl.constexpr, PDL: tl.constexpr):
    BLOCK_M: tl.constexpr = BLOCK_Q * GP
    kv_head = tl.program_id(0)
    # Before the previous kernel is waited for, only what no kernel of this step writes is read: the host-made
    # metadata and the cached keys and values of earlier steps (positions < ctx; L2 prefetches only).
    if DECODE:
        seq = tl.program_id(1)
        q_begin = tl.load(query_start + seq)
        q_len = tl.load(query_start + seq + 1) - q_begin
        seq_len = tl.load(seq_lens + seq)  # in flight with the two above: a decode program is a short latency chain
        j0 = 0
        idle = q_len == 0
    else:
        seq = _find_seq(query_start, tl.program_id(1), num_seqs, BLOCK_Q)
        q_begin = tl.load(query_start + seq)
        q_len = tl.load(query_start + seq + 1) - q_begin
        i = tl.program_id(1) - q_begin // BLOCK_Q - seq  # this sequence's i-th slot
        n_tiles = tl.cdiv(q_len, BLOCK_Q)
        idle = i >= n_tiles  # a slot past this sequence's tiles (or a sequence with no new tokens)
        j0 = tl.maximum(n_tiles - 1 - i, 0) * BLOCK_Q  # last tile first: the longest key ranges start early
        seq_len = tl.load(seq_lens + seq)
    ctx = seq_len - q_len  # tokens cached before this step's

    rows = tl.arange(0, BLOCK_M)
    j = j0 + rows // GP  # (BLOCK_M,) query token within the sequence
    g = rows % GP  # head within the kv head's group
    row_ok = (j < q_len) & (g < G)
    q_pos = ctx + j  # absolute positions
    offs_d = tl.arange(0, D)

    # keys the tile needs: [lo, hi) = window start of its first query .. its last query
    p_min = ctx + j0
    p_max = ctx + tl.minimum(j0 + BLOCK_Q, q_len) - 1
    hi = p_max + 1
    lo = 0
    if WINDOW:
        lo = tl.maximum(p_min - window + 1, 0)
    if SPLIT:  # this split's share of the keys actually there, in whole key tiles (a short context leaves splits empty)
        chunk = tl.cdiv(tl.cdiv(hi - lo, tl.num_programs(2)), BLOCK_N) * BLOCK_N
        lo = lo + tl.program_id(2) * chunk
        hi = tl.minimum(hi, lo + chunk)
    hi = tl.maximum(hi, lo)  # an empty range: a split past the context, or seq_len 0 (ctx = -q_len)
    bt_row = block_tables + seq.to(tl.int64) * stride_bt
    kv_head_off = kv_head.to(tl.int64) * stride_kh
    if PDL:  # the first key tile's cached rows (not this step's: the previous kernel writes those) toward L2
        _prefetch_kv(k_cache, v_cache, bt_row, kv_head_off, stride_kb, stride_kt, lo,
                     tl.where(idle, lo, tl.minimum(hi, ctx)), BLOCK_SIZE, BLOCK_N, D)
    pdl_start(PDL)
    if idle:
        return
    head = kv_head * G + g
    if SPLIT:
        part = (seq * (tl.num_programs(0) * G) + head) * tl.num_programs(2) + tl.program_id(2)  # (BLOCK_M,)
        if hi == lo:  # a split past the context: weight 0 for _combine_kernel, which then skips its acc
            tl.store(ws_ml + part * 2, tl.full((BLOCK_M,), -1.0e30, tl.float32), mask=row_ok)
            tl.store(ws_ml + part * 2 + 1, tl.zeros((BLOCK_M,), tl.float32), mask=row_ok)
            return
    # tiles lo + i·BLOCK_N: masked ones up to the last query's window start, mask-free ones while their last key
    # is <= the first query's position, masked ones to hi
    full_lo = lo
    if WINDOW:
        full_lo = tl.maximum(p_max - window + 1, lo)
    a = tl.minimum(lo + tl.cdiv(full_lo - lo, BLOCK_N) * BLOCK_N, hi)
    b = a + tl.maximum(tl.minimum(p_min + 1, hi) - a, 0) // BLOCK_N * BLOCK_N  # whole tiles only

    q_off = (q_begin + j).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_cache, v_cache, bt_row, kv_head_off, stride_kb, stride_kt,
                            scale_log2e, lo, a, q_pos, hi, window, BLOCK_SIZE, BLOCK_N, D, True, WINDOW)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_cache, v_cache, bt_row, kv_head_off, stride_kb, stride_kt,
                            scale_log2e, a, b, q_pos, hi, window, BLOCK_SIZE, BLOCK_N, D, False, WINDOW)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_cache, v_cache, bt_row, kv_head_off, stride_kb, stride_kt,
                            scale_log2e, b, hi, q_pos, hi, window, BLOCK_SIZE, BLOCK_N, D, True, WINDOW)

    if SPLIT:  # this split's unnormalized part; _combine_kernel weighs the splits
        tl.store(ws_acc + part.to(tl.int64)[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(ws_ml + part * 2, m_i, mask=row_ok)
        tl.store(ws_ml + part * 2 + 1, l_i, mask=row_ok)
    else:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no keys (seq_len 0): zeros
        o_off = (q_begin + j).to(tl.int64) * stride_ot + head * stride_oh
        tl.store(out_ptr + o_off[:, None] + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _combine_kernel(ws_acc, ws_ml, query_start, out_ptr, stride_ot, stride_oh,
                    SPLITS: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    """out = Σ_i 2^(m_i - M) acc_i / Σ_i 2^(m_i - M) l_i over the splits i of one (sequence, query head)."""
    pdl_start(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_begin = tl.load(query_start + seq)
    q_end = tl.load(query_start + seq + 1)
    part = (seq * tl.num_programs(1) + head) * SPLITS + tl.arange(0, SPLITS)  # (SPLITS,)
    m = tl.load(ws_ml + part * 2)  # in flight with query_start's (a sequence without a new token stores nothing)
    l_ = tl.load(ws_ml + part * 2 + 1)
    if q_end == q_begin:
        return
    w = tl.exp2(m - tl.max(m, axis=0))  # (SPLITS,)
    den = tl.sum(w * l_, axis=0)
    offs_d = tl.arange(0, D)
    wrote = m > -1.0e30  # a split past the context wrote only (m, l) = (-1e30, 0)
    acc = tl.load(ws_acc + part.to(tl.int64)[:, None] * D + offs_d[None, :], mask=wrote[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + q_begin.to(tl.int64) * stride_ot + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=1024)  # on every call's launch path; its keys vary with eager batches: bounded
def _config(gp: int, max_query_len: int, programs: int, max_context: int, sms: int) -> AttnConfig:
    """Tile sizes from the shapes. programs = S · Hkv (decode grid), max_context = block-table width × block_size
    (an upper bound of every sequence's length, known on the host).

    Prefill, from sweeps on an H200 (bf16, block_size 16, D 64/128/256, G 1/4/8, 2026-11-22): 64-row tiles, 64-key
    tiles, 4 warps, 2 stages were best or within 10% of the best on every shape swept (128-row tiles win by a few %
    on long prompts and lose up to 20% on short ones); that reaches 52-91% of torch SDPA (causal, dense tensors) in
    TFLOP/s.
    Decode, from sweeps on an H100 (benchmarks/NOTES-serving.md): 64-key tiles, 2 stages; with fewer than 2
    programs per SM, each context split until there are ~2 programs per SM (at most 16 splits). The kernel gives
    each split whole tiles of the actual context, and the splits past it return at once. In the engine's decode
    step (Llama-2-7B and Llama-3-8B W4A16, batch 1-16) this beat splitting to ~4 programs per SM (at most 32) by
    0.3-3.7%, and 128-key tiles with 1 stage (faster in a chain of attention layers alone) by up to 5%.
    Large batches read 2.3-3.0 TB/s of K/V."""
    if max_query_len == 1:
        # decode: one token per sequence; rows = padded G, at least 16 for tl.dot (the extra rows are masked)
        block_q = max(1, 16 // gp)
        splits = 1
        if programs < 2 * sms:
            splits = min(2 * sms // programs, max_context // 64, 16)
            splits = 1 << (max(1, splits).bit_length() - 1)  # a power of two (the combine kernel's arange)
        return AttnConfig(block_q, 64, 4, 2, splits)
    block_q = max(1, min(64 // gp, triton.next_power_of_2(max_query_len)))
    block_q = max(block_q, 16 // gp)  # >= 16 rows for tl.dot
    return AttnConfig(block_q, 64, 4, 2, 1)


def _check(q, k_cache, v_cache, block_tables, seq_lens, query_start, out):
    """Shape/dtype checks on the host (no device reads: the call must stay capturable)."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise FourbitError(f"paged_attention wants q (T, Hq, D) and k_cache, v_cache (num_blocks, Hkv, block_size, "
                           f"D) of one shape; got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache "
                           f"{tuple(v_cache.shape)}")
    t, hq, d = q.shape
    hkv = k_cache.shape[1]
    if d not in HEAD_DIMS or k_cache.shape[3] != d:
        raise FourbitError(f"paged_attention supports head_dim in {HEAD_DIMS} (q and the cache alike); got q "
                           f"head_dim {d}, cache head_dim {k_cache.shape[3]}")
    if hq % hkv:
        raise FourbitError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise FourbitError(f"paged_attention wants the KV cache in q's dtype {q.dtype}; got {k_cache.dtype}, "
                           f"{v_cache.dtype}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride() != k_cache.stride():
        raise FourbitError("paged_attention wants q's and the caches' last dim contiguous and k_cache, v_cache "
                           "with the same strides (call .contiguous())")
    s = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != s or query_start.shape != (s + 1,):
        raise FourbitError(f"paged_attention wants block_tables (S, max_blocks), seq_lens (S,), query_start (S+1,); "
                           f"got {tuple(block_tables.shape)}, {tuple(seq_lens.shape)}, {tuple(query_start.shape)}")
    for name, x in (("block_tables", block_tables), ("seq_lens", seq_lens), ("query_start", query_start)):
        if x.dtype != torch.int32:
            raise FourbitError(f"paged_attention wants {name} as int32; got {x.dtype}")
    if block_tables.stride(1) != 1 or not seq_lens.is_contiguous() or not query_start.is_contiguous():
        raise FourbitError("paged_attention wants block_tables rows, seq_lens and query_start contiguous")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1):
        raise FourbitError(f"out must be {tuple(q.shape)} {q.dtype} with its last dim contiguous; got "
                           f"{tuple(out.shape)} {out.dtype}")


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start, max_query_len: int, scale: float,
                    sliding_window: int | None = None, out=None, *, config: AttnConfig | None = None):
    """Causal attention of the new tokens q (T, Hq, D) over the paged cache -> out (T, Hq, D) in q's dtype.
    See the module doc. max_query_len >= every sequence's q_len (1 = a decode batch); config overrides _config."""
    _check(q, k_cache, v_cache, block_tables, seq_lens, query_start, out)
    t, hq, d = q.shape
    s = seq_lens.shape[0]
    hkv, block_size = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    gp = triton.next_power_of_2(g)
    if out is None:
        out = q.new_empty((t, hq, d))
    if t == 0 or s == 0:
        return out
    sms = sm_count(q.device.index) if q.is_cuda else 4
    max_context = block_tables.shape[1] * block_size
    cfg = config or _config(gp, max(1, max_query_len), s * hkv, max_context, sms)
    decode = max_query_len <= 1
    splits = cfg.splits if decode else 1
    if splits & (splits - 1):
        raise FourbitError(f"config.splits must be a power of two; got {splits}")
    slots = s if decode else t // cfg.block_q + s
    if slots > 65535:  # grid axis 1
        raise FourbitError(f"paged_attention launches at most 65535 programs per kv head ({slots} here): split the "
                           f"step into smaller batches (fewer tokens or sequences)")
    window = 0 if sliding_window is None else int(sliding_window)
    if sliding_window is not None and window < 1:
        raise FourbitError(f"sliding_window must be >= 1 or None; got {sliding_window}")
    # kv heads vary fastest: the programs running together are every head's tiles of the same (longest) ranges
    grid = (hkv, slots, splits)
    if splits > 1:
        ws_acc = torch.empty((s, hq, splits, d), device=q.device, dtype=torch.float32)
        ws_ml = torch.empty((s, hq, splits, 2), device=q.device, dtype=torch.float32)
    else:
        ws_acc = ws_ml = out
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start, out, ws_acc, ws_ml, s, scale * LOG2E, window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0),
        G=g, GP=gp, D=d, BLOCK_SIZE=block_size, BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n, DECODE=decode,
        SPLIT=splits > 1, WINDOW=sliding_window is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl_args(q))
    if splits > 1:
        _combine_kernel[(s, hq)](ws_acc, ws_ml, query_start, out, out.stride(0), out.stride(1), SPLITS=splits, D=d,
                                 num_warps=4, **pdl_args(q))
    return out
