"""Kernels exposed as torch custom ops (with fake implementations, so torch.compile and CUDA graphs work).

Each op runs its GPU kernel when there is one for the inputs and its torch reference (kernels/ref.py) otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch

from .kernels.ref import w4a16_gemm_ref


@torch.library.custom_op("fourbit::w4a16_gemm", mutates_args=())
def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
               group_size: int, n: int, k: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Y (M, n) = X (M, k) · dequant(W)ᵀ (+ bias); see kernels/ref.py for the math and formats/quick.py for W."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        from .kernels.w4a16_gemm import w4a16_gemm as kernel  # triton imports only where a GPU runs it

        return kernel(x, qweight, scales, zeros, group_size, n, k, bias)
    return w4a16_gemm_ref(x, qweight, scales, zeros, group_size, n, k, bias)


@w4a16_gemm.register_fake
def _(x, qweight, scales, zeros, group_size, n, k, bias=None):
    return x.new_empty((x.shape[0], n))


@torch.library.custom_op("fourbit::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start: torch.Tensor, max_query_len: int, scale: float,
                    sliding_window: Optional[int] = None) -> torch.Tensor:
    """Causal attention of new tokens q (T, Hq, D) over a paged KV cache; see kernels/paged_attention.py."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from .kernels.paged_attention import paged_attention as kernel

        return kernel(q, k_cache, v_cache, block_tables, seq_lens, query_start, max_query_len, scale, sliding_window)
    from .kernels.ref import paged_attention_ref

    return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start, max_query_len, scale,
                               sliding_window)


@paged_attention.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, query_start, max_query_len, scale, sliding_window=None):
    return q.new_empty(q.shape)
