"""Torch reference twins of the kernels: same signatures, plain torch, any device. Tests diff kernels against these."""
from __future__ import annotations

import torch

from ..formats.quick import gated_halves, unpack_quick


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


def w4a16_gemm_ref(x, qweight, scales, zeros, group_size: int, n: int, k: int, bias=None,
                   glu: bool = False) -> torch.Tensor:
    """Y = X · dequant(W)ᵀ (+ bias). x (M, k) -> (M, n) in x's dtype.

    The dequantized weight is rounded once to x's dtype and the product accumulates as torch's matmul does
    for that dtype (float32 accumulation for fp16/bf16), which is what the GPU kernel computes.
    glu: W is a gated layer's (nn/fuse.py: in every 16 rows 8 gate channels, then their 8 up channels) ->
    silu_mul(gate, up) (M, n / 2).
    """
    w = w4a16_dequant_ref(qweight, scales, zeros, group_size, n, k).to(x.dtype)
    y = x @ w.t()
    y = y if bias is None else y + bias.to(x.dtype)
    if not glu:
        return y
    return silu_mul_ref(*gated_halves(y)).reshape(y.shape[0], n // 2)


def paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start, max_query_len: int,
                        scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of the new tokens q (T, Hq, D) over a paged KV cache (kernels/paged_attention.py has
    the math): each sequence's keys/values gathered from its blocks in float32 (float64 for float64 q), query j
    of sequence s at position p = seq_lens[s] - q_len + j attends keys 0..p (and > p - sliding_window).
    k_cache, v_cache (num_blocks, Hkv, block_size, D); block_tables (S, max_blocks); seq_lens (S,);
    query_start (S+1,). Returns (T, Hq, D) in q's dtype; rows of a sequence with
    seq_lens == 0 are zeros. Reads the metadata on the host (.tolist()): a reference, not for CUDA graphs."""
    t, hq, d = q.shape
    hkv, bs = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    res = torch.zeros((t, hq, d), device=q.device, dtype=acc_dtype)
    starts, lens = query_start.tolist(), seq_lens.tolist()
    for s, n in enumerate(lens):
        q0, q1 = starts[s], starts[s + 1]
        if q1 == q0 or n == 0:
            continue
        blocks = block_tables[s, :(n + bs - 1) // bs].long()
        k = k_cache[blocks].to(acc_dtype).transpose(0, 1).reshape(hkv, -1, d)[:, :n]  # (Hkv, n, D)
        v = v_cache[blocks].to(acc_dtype).transpose(0, 1).reshape(hkv, -1, d)[:, :n]
        k, v = k.repeat_interleave(g, dim=0), v.repeat_interleave(g, dim=0)  # (Hq, n, D): head h uses h // G
        qs = q[q0:q1].to(acc_dtype).transpose(0, 1)  # (Hq, q_len, D)
        pos = torch.arange(n - (q1 - q0), n, device=q.device)[:, None]  # (q_len, 1) absolute positions
        kpos = torch.arange(n, device=q.device)[None, :]  # (1, n)
        allowed = kpos <= pos
        if sliding_window is not None:
            allowed &= kpos > pos - sliding_window
        scores = (qs @ k.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf"))  # (Hq, q_len, n)
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no keys (bad lengths): zeros
        res[q0:q1] = (probs @ v).transpose(0, 1)
    return res.to(q.dtype)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for 16-bit activations, float64 for float64 ones: the dtype the fused ops compute in."""
    return torch.promote_types(x.dtype, torch.float32)


def rms_norm_ref(x, weight, eps: float) -> torch.Tensor:
    """x · rsqrt(mean(x²) + eps) · weight in float32 (float64 for float64 x), rounded once to x's dtype."""
    xf = x.to(_acc_dtype(x))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.to(xf.dtype)).to(x.dtype)


def add_rms_norm_ref(x, residual, weight, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(s), s) with s = x + residual rounded to x's dtype (a torch add), normalised from that rounding."""
    s = (x + residual).to(x.dtype)
    return rms_norm_ref(s, weight, eps), s


def rope_ref(q, k, cos, sin, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q (T, Hq, D), k (T, Hkv, D); cos, sin (T, D/2). Rotates the pairs (x[2i], x[2i+1]) if interleaved, else
    (x[i], x[i+D/2]), in float32 (float64 for float64 inputs), each output rounded once to its input's dtype."""
    def rotate(x):
        xf = x.to(_acc_dtype(x))
        c, s = cos.to(xf.dtype)[:, None, :], sin.to(xf.dtype)[:, None, :]  # (T, 1, D/2)
        if interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).to(x.dtype)
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def silu_mul_ref(gate, up) -> torch.Tensor:
    """silu(gate) · up in float32 (float64 for float64 inputs), rounded once to gate's dtype.

    gate is made contiguous first: torch's CPU silu rounds differently in its vectorized loop and its tail, so its
    result would otherwise depend on the layout (a fused gate_up output's strided half vs a separate output)."""
    acc = _acc_dtype(gate)
    return (torch.nn.functional.silu(gate.contiguous().to(acc)) * up.to(acc)).to(gate.dtype)


def paged_kv_write_ref(k, v, k_cache, v_cache, slots) -> None:
    """Store k, v (T, Hkv, D) at slots (T,) of the caches (num_blocks, Hkv, block_size, Dstored >= D): slot =
    block · block_size + offset; cast to the cache dtype, columns D.. written as zeros."""
    bs, pad = k_cache.shape[2], k_cache.shape[3] - k.shape[-1]
    block, offset = slots // bs, slots % bs
    k_cache[block, :, offset] = torch.nn.functional.pad(k, (0, pad)).to(k_cache.dtype)  # (T, Hkv, Dstored)
    v_cache[block, :, offset] = torch.nn.functional.pad(v, (0, pad)).to(v_cache.dtype)


def rope_paged_kv_write_ref(q, k, v, cos, sin, interleaved: bool, k_cache, v_cache, slots) -> torch.Tensor:
    """rope_ref of q and k, then paged_kv_write_ref of the rotated k and v -> the rotated q."""
    q, k = rope_ref(q, k, cos, sin, interleaved)
    paged_kv_write_ref(k, v, k_cache, v_cache, slots)
    return q
