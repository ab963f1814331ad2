"""Kernels exposed as torch custom ops (with fake implementations, so torch.compile and CUDA graphs work).

Each op runs its GPU kernel when there is one for the inputs and its torch reference (kernels/ref.py) otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch

from .kernels import ref


def _on_gpu(x: torch.Tensor) -> bool:
    """Whether the Triton kernels take x: a CUDA tensor in a 16-bit float dtype (the rest runs the torch twin)."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


@torch.library.custom_op("fourbit::w4a16_gemm", mutates_args=())
def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
               group_size: int, n: int, k: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Y (M, n) = X (M, k) · dequant(W)ᵀ (+ bias); see kernels/ref.py for the math and formats/quick.py for W."""
    if _on_gpu(x):
        from .kernels.w4a16_gemm import w4a16_gemm as kernel  # triton imports only where a GPU runs it

        return kernel(x, qweight, scales, zeros, group_size, n, k, bias)
    return ref.w4a16_gemm_ref(x, qweight, scales, zeros, group_size, n, k, bias)


@w4a16_gemm.register_fake
def _(x, qweight, scales, zeros, group_size, n, k, bias=None):
    return x.new_empty((x.shape[0], n))


@torch.library.custom_op("fourbit::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start: torch.Tensor, max_query_len: int, scale: float,
                    sliding_window: Optional[int] = None) -> torch.Tensor:
    """Causal attention of new tokens q (T, Hq, D) over a paged KV cache; see kernels/paged_attention.py."""
    if _on_gpu(q):
        from .kernels.paged_attention import paged_attention as kernel

        return kernel(q, k_cache, v_cache, block_tables, seq_lens, query_start, max_query_len, scale, sliding_window)
    return ref.paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start, max_query_len, scale,
                                   sliding_window)


@paged_attention.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, query_start, max_query_len, scale, sliding_window=None):
    return q.new_empty(q.shape)


# ---- fused elementwise ops of a decoder layer (kernels/fused.py) ------------------------------------------------

@torch.library.custom_op("fourbit::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., N) -> x · rsqrt(mean(x²) + eps) · weight in x's dtype, computed in float32."""
    if _on_gpu(x):
        from .kernels.fused import rms_norm as kernel

        return kernel(x, weight, eps)
    return ref.rms_norm_ref(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("fourbit::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (rms_norm(s), s), s = x + residual in x's dtype: a residual add and the norm after it in one pass."""
    if _on_gpu(x):
        from .kernels.fused import add_rms_norm as kernel

        return kernel(x, residual, weight, eps)
    return ref.add_rms_norm_ref(x, residual, weight, eps)


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("fourbit::rope", mutates_args=())
def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q (T, Hq, D), k (T, Hkv, D) rotated by cos, sin (T, D/2): interleaved pairs or rotate-half."""
    if _on_gpu(q):
        from .kernels.fused import rope as kernel

        return kernel(q, k, cos, sin, interleaved)
    return ref.rope_ref(q, k, cos, sin, interleaved)


@rope.register_fake
def _(q, k, cos, sin, interleaved):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("fourbit::silu_mul", mutates_args=())
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up (..., H) in gate's dtype; gate and up may be strided halves of a fused gate_up output."""
    if _on_gpu(gate):
        from .kernels.fused import silu_mul as kernel

        return kernel(gate, up)
    return ref.silu_mul_ref(gate, up)


@silu_mul.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("fourbit::paged_kv_write", mutates_args=("k_cache", "v_cache"))
def paged_kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slots: torch.Tensor) -> None:
    """Store k, v (T, Hkv, D) at slots (T,) of the paged caches (num_blocks, Hkv, block_size, >= D)."""
    if _on_gpu(k_cache):
        from .kernels.fused import paged_kv_write as kernel

        return kernel(k, v, k_cache, v_cache, slots)
    return ref.paged_kv_write_ref(k, v, k_cache, v_cache, slots)


@paged_kv_write.register_fake
def _(k, v, k_cache, v_cache, slots):
    return None
