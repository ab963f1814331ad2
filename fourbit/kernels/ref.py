"""Torch reference twins of the kernels: same signatures, plain torch, any device. Tests diff kernels against these."""
from __future__ import annotations

import torch

from ..formats.quick import unpack_quick


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


def w4a16_gemm_ref(x, qweight, scales, zeros, group_size: int, n: int, k: int, bias=None) -> torch.Tensor:
    """Y = X · dequant(W)ᵀ (+ bias). x (M, k) -> (M, n) in x's dtype.

    The dequantized weight is rounded once to x's dtype and the product accumulates as torch's matmul does
    for that dtype (float32 accumulation for fp16/bf16), which is what the GPU kernel computes.
    """
    w = w4a16_dequant_ref(qweight, scales, zeros, group_size, n, k).to(x.dtype)
    y = x @ w.t()
    return y if bias is None else y + bias.to(x.dtype)


def paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start, max_query_len: int,
                        scale: float, sliding_window: int | None = None, out=None) -> torch.Tensor:
    """Causal attention of the new tokens q (T, Hq, D) over a paged KV cache (kernels/paged_attention.py has
    the math): each sequence's keys/values gathered from its blocks in float32 (float64 for float64 q), query j
    of sequence s at position p = seq_lens[s] - q_len + j attends keys 0..p (and > p - sliding_window).
    k_cache, v_cache (num_blocks, Hkv, block_size, D); block_tables (S, max_blocks); seq_lens (S,);
    query_start (S+1,). Returns (T, Hq, D) in q's dtype (written into out when given); rows of a sequence with
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
    if out is None:
        return res.to(q.dtype)
    return out.copy_(res)
