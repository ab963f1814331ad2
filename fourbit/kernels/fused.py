"""Fused elementwise kernels of a decoder layer (Triton): each replaces several small torch kernels, which is what
a batch-1 decode step spends half its time on (launches, not bytes).

Math (fp32 inside, one rounding to the output dtype at the end; torch twins in kernels/ref.py):
    rms_norm        y = x · rsqrt(mean(x²) + eps) · w                           x (M, N) -> y (M, N)
    add_rms_norm    s = round(x + r), y = rms_norm(s)                             -> (y, s): residual add + norm
    rope            (a, b) -> (a·cos − b·sin, a·sin + b·cos) on the pairs (2i, 2i+1) (interleaved, Meta) or
                    (i, i + D/2) (rotate-half, HF), q (T, Hq, D) and k (T, Hkv, D) in one launch; cos, sin (T, D/2)
    silu_mul        y = g / (1 + exp(−g)) · u                                   g, u (M, H) -> y (M, H)
    paged_kv_write  cache[slot // bs, h, slot % bs] = (k[t, h], zeros up to the cache's head dim), k and v alike
    rope_paged_kv_write  rope of q and k, the rotated k and v stored as paged_kv_write does -> rotated q: one launch
                    where a paged decoder layer had two

Inputs may be strided (views of a fused qkv / gate_up output) as long as the last dim is contiguous; outputs are
new contiguous tensors. Launch grids depend only on shapes, and nothing reads the device: CUDA-graph safe.
One program per row (token); the row's columns in one power-of-two tile, the tail masked, except silu_mul, whose
rows (an MLP's hidden size) are tiled by SILU_BLOCK.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import FourbitError
from .pdl import pdl_args, pdl_start

SILU_BLOCK = 1024


def _warps(elements: int) -> int:
    """4 warps up to 2K elements per program, up to 16 for the largest rows."""
    return min(16, max(4, elements // 512))


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, n, eps, stride_x, stride_r, stride_y, stride_s,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # the sum rounded to the activation dtype, as a torch add, then normalised from that
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (xf * inv * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate(x_ptr, o_ptr, heads, half, stride_h, stride_oh, cos, sin,
            INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate the pairs of `heads` heads of one token; cos, sin (1, BLOCK_D) fp32."""
    h = tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < heads) & (i < half)
    if INTERLEAVED:
        c1 = 2 * i
        c2 = 2 * i + 1
    else:
        c1 = i
        c2 = i + half
    a = tl.load(x_ptr + h * stride_h + c1, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + h * stride_h + c2, mask=mask, other=0.0).to(tl.float32)
    ty = o_ptr.dtype.element_ty
    tl.store(o_ptr + h * stride_oh + c1, (a * cos - b * sin).to(ty), mask=mask)
    tl.store(o_ptr + h * stride_oh + c2, (a * sin + b * cos).to(ty), mask=mask)


@triton.jit
def _angles(cos_ptr, sin_ptr, half, BLOCK_D: tl.constexpr):
    """One token's cos and sin rows (1, BLOCK_D) in fp32, zero past D/2."""
    i = tl.arange(0, BLOCK_D)[None, :]
    cos = tl.load(cos_ptr + i, mask=i < half, other=0.0).to(tl.float32)
    return cos, tl.load(sin_ptr + i, mask=i < half, other=0.0).to(tl.float32)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, hq, hkv, half,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st,
                 stride_qot, stride_qoh, stride_kot, stride_koh,
                 INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _angles(cos_ptr + t * stride_ct, sin_ptr + t * stride_st, half, BLOCK_D)
    _rotate(q_ptr + t * stride_qt, qo_ptr + t * stride_qot, hq, half, stride_qh, stride_qoh, cos, sin,
            INTERLEAVED, BLOCK_H, BLOCK_D)
    _rotate(k_ptr + t * stride_kt, ko_ptr + t * stride_kot, hkv, half, stride_kh, stride_koh, cos, sin,
            INTERLEAVED, BLOCK_H, BLOCK_D)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, n, stride_g, stride_u, stride_y, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u  # torch's silu formula
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kv_write_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, slots_ptr, hq, hkv, d, d_stored,
                     block_size, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
                     stride_st, stride_qot, stride_qoh, stride_cb, stride_ch, stride_cs,
                     ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DS: tl.constexpr, PDL: tl.constexpr):
    """Token t's k and v into its cache slot, columns d .. d_stored - 1 zero. With ROPE, q (into qo) and k are
    rotated first (_rope_kernel's math; BLOCK_D covers d / 2), and the rotated k is what is stored.
    The slot and the angles are step inputs that no PDL kernel writes: read before the wait (kernels/pdl.py)."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if ROPE:
        cos, sin = _angles(cos_ptr + t * stride_ct, sin_ptr + t * stride_st, d // 2, BLOCK_D)
    pdl_start(PDL)
    dst = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs
    h = tl.arange(0, BLOCK_H)[:, None]
    c = tl.arange(0, BLOCK_DS)[None, :]
    stored = (h < hkv) & (c < d_stored)
    given = stored & (c < d)
    if ROPE:
        _rotate(q_ptr + t * stride_qt, qo_ptr + t * stride_qot, hq, d // 2, stride_qh, stride_qoh, cos, sin,
                INTERLEAVED, BLOCK_H, BLOCK_D)
        _rotate(k_ptr + t * stride_kt, kc_ptr + dst, hkv, d // 2, stride_kh, stride_ch, cos, sin,
                INTERLEAVED, BLOCK_H, BLOCK_D)
        k = tl.zeros((BLOCK_H, BLOCK_DS), kc_ptr.dtype.element_ty)  # for the zero columns only
        k_mask = stored & (c >= d)
    else:
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + c, mask=given, other=0.0)
        k_mask = stored
    tl.store(kc_ptr + dst + h * stride_ch + c, k.to(kc_ptr.dtype.element_ty), mask=k_mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + c, mask=given, other=0.0)
    tl.store(vc_ptr + dst + h * stride_ch + c, v.to(vc_ptr.dtype.element_ty), mask=stored)


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous (any other strides are passed to the kernel), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., N) as (M, N), a view where the leading dims allow it."""
    return _last_contiguous(x).reshape(-1, x.shape[-1])


def _norm(x, residual, weight, eps: float):
    n = x.shape[-1]
    if weight.shape != (n,):
        raise FourbitError(f"rms_norm weight has shape {tuple(weight.shape)}; x's hidden size is {n}")
    x2 = _rows(x)
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    s = torch.empty_like(y) if residual is not None else y
    r2 = _rows(residual) if residual is not None else x2
    if x2.shape[0]:
        block = triton.next_power_of_2(n)
        y2, s2 = y.view(-1, n), s.view(-1, n)
        _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, y2, s2, n, eps, x2.stride(0), r2.stride(0), y2.stride(0),
                                         s2.stride(0), HAS_RESIDUAL=residual is not None, BLOCK=block,
                                         num_warps=_warps(block), **pdl_args(x2))
    return y, s


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., N) fp16/bf16 -> x · rsqrt(mean(x²) + eps) · weight in x's dtype."""
    return _norm(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """-> (rms_norm(s), s) with s = x + residual rounded to x's dtype: a residual add and the next norm."""
    if residual.shape != x.shape:
        raise FourbitError(f"add_rms_norm wants x and residual of one shape; got {tuple(x.shape)}, "
                           f"{tuple(residual.shape)}")
    return _norm(x, residual, weight, eps)


def _check_rope(q, k, cos, sin):
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or q.shape[2] % 2:
        raise FourbitError(f"rope wants q (T, Hq, D), k (T, Hkv, D) with one even D; got {tuple(q.shape)}, "
                           f"{tuple(k.shape)}")
    t, half = q.shape[0], q.shape[2] // 2
    if cos.shape != (t, half) or sin.shape != (t, half):
        raise FourbitError(f"rope wants cos and sin of shape ({t}, {half}); got {tuple(cos.shape)}, "
                           f"{tuple(sin.shape)}")


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool):
    """q (T, Hq, D), k (T, Hkv, D); cos, sin (T, D/2) -> rotated (q, k), new contiguous tensors in their dtypes."""
    _check_rope(q, k, cos, sin)
    t, hq, d = q.shape
    half = d // 2
    q, k, cos, sin = (_last_contiguous(x) for x in (q, k, cos, sin))
    hkv = k.shape[1]
    qo, ko = torch.empty(q.shape, device=q.device, dtype=q.dtype), torch.empty(k.shape, device=k.device, dtype=k.dtype)
    if t:
        block_h, block_d = triton.next_power_of_2(max(hq, hkv)), triton.next_power_of_2(half)
        _rope_kernel[(t,)](q, k, cos, sin, qo, ko, hq, hkv, half, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                           cos.stride(0), sin.stride(0), qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1),
                           INTERLEAVED=interleaved, BLOCK_H=block_h, BLOCK_D=block_d,
                           num_warps=_warps(block_h * block_d), **pdl_args(q))
    return qo, ko


def rope_paged_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        interleaved: bool, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slots: torch.Tensor) -> torch.Tensor:
    """rope(q, k, cos, sin) and paged_kv_write(rotated k, v, k_cache, v_cache, slots) in one launch -> rotated q."""
    _check_rope(q, k, cos, sin)
    qo = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    _kv_write(q, k, v, cos, sin, qo, k_cache, v_cache, slots, interleaved)
    return qo


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., H), e.g. the two halves of a fused gate_up output (strided rows) -> silu(gate) · up."""
    if gate.shape != up.shape:
        raise FourbitError(f"silu_mul wants gate and up of one shape; got {tuple(gate.shape)}, {tuple(up.shape)}")
    g2, u2 = _rows(gate), _rows(up)
    m, n = g2.shape
    y = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    if m and n:
        y2 = y.view(m, n)
        _silu_mul_kernel[(m, triton.cdiv(n, SILU_BLOCK))](g2, u2, y2, n, g2.stride(0), u2.stride(0), y2.stride(0),
                                                          BLOCK=SILU_BLOCK, num_warps=4, **pdl_args(g2))
    return y


def _check_kv(k, v, k_cache, v_cache, slots):
    t, hkv, d = k.shape
    if (v.shape != k.shape or k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[1] != hkv
            or k_cache.shape[3] < d or slots.shape != (t,)):
        raise FourbitError(f"paged_kv_write wants k, v (T, Hkv, D), caches (num_blocks, Hkv, block_size, >= D) and "
                           f"slots (T,); got k {tuple(k.shape)}, v {tuple(v.shape)}, caches {tuple(k_cache.shape)}, "
                           f"{tuple(v_cache.shape)}, slots {tuple(slots.shape)}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise FourbitError("paged_kv_write wants k_cache and v_cache with the same strides, last dim contiguous")


def paged_kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slots: torch.Tensor) -> None:
    """Store k, v (T, Hkv, D) at `slots` (T,) of the caches (num_blocks, Hkv, block_size, Dstored >= D), cast to
    the cache dtype, columns D.. zero; slot = block · block_size + offset (models/attention.PagedKVCache)."""
    _kv_write(None, k, v, None, None, None, k_cache, v_cache, slots, False)


def _kv_write(q, k, v, cos, sin, qo, k_cache, v_cache, slots, interleaved: bool):
    """Launch _kv_write_kernel; with q given (ROPE), q rotated into qo and k rotated before it is stored."""
    _check_kv(k, v, k_cache, v_cache, slots)
    rope = q is not None
    k, v = _last_contiguous(k), _last_contiguous(v)
    q, cos, sin = (_last_contiguous(x) for x in (q, cos, sin)) if rope else (k, k, k)  # unused without ROPE
    qo = qo if rope else k
    (t, hkv, d), hq = k.shape, q.shape[1]
    if t:
        block_h = triton.next_power_of_2(max(hq, hkv) if rope else hkv)
        block_d, block_ds = triton.next_power_of_2(d // 2 if rope else 1), triton.next_power_of_2(k_cache.shape[3])
        _kv_write_kernel[(t,)](q, k, v, cos, sin, qo, k_cache, v_cache, slots, hq, hkv, d, k_cache.shape[3],
                               k_cache.shape[2], q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                               v.stride(1), cos.stride(0), sin.stride(0), qo.stride(0), qo.stride(1),
                               k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), ROPE=rope,
                               INTERLEAVED=interleaved, BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_DS=block_ds,
                               num_warps=_warps(block_h * block_ds), **pdl_args(k))
