"""Kernels exposed as torch custom ops (with fake implementations, so torch.compile and CUDA graphs work).

Each op runs its GPU kernel when there is one for the inputs and its torch reference (kernels/ref.py) otherwise.
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch

from .kernels import ref


def _impl(module: str, name: str, x: torch.Tensor):
    """The function that computes op `name` for x: the Triton kernel kernels/<module>.py `name` for a CUDA tensor
    in a 16-bit float dtype, the torch twin ref.<name>_ref otherwise (triton is imported only where a GPU runs)."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        return _kernel(module, name)
    return getattr(ref, f"{name}_ref")


@functools.cache  # on every eager call's path
def _kernel(module: str, name: str):
    return getattr(importlib.import_module(f".kernels.{module}", __package__), name)


@torch.library.custom_op("fourbit::w4a16_gemm", mutates_args=())
def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
               group_size: int, n: int, k: int, bias: Optional[torch.Tensor] = None, glu: bool = False) -> torch.Tensor:
    """Y (M, n) = X (M, k) · dequant(W)ᵀ (+ bias); see kernels/ref.py for the math and formats/quick.py for W.
    glu: W is a gated layer's (nn/fuse.py) and the result silu(gate) · up (M, n / 2)."""
    return _impl("w4a16_gemm", "w4a16_gemm", x)(x, qweight, scales, zeros, group_size, n, k, bias, glu=glu)


@w4a16_gemm.register_fake
def _(x, qweight, scales, zeros, group_size, n, k, bias=None, glu=False):
    return x.new_empty((x.shape[0], n // 2 if glu else n))


@torch.library.custom_op("fourbit::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start: torch.Tensor, max_query_len: int, scale: float,
                    sliding_window: Optional[int] = None) -> torch.Tensor:
    """Causal attention of new tokens q (T, Hq, D) over a paged KV cache; see kernels/paged_attention.py."""
    return _impl("paged_attention", "paged_attention", q)(q, k_cache, v_cache, block_tables, seq_lens, query_start,
                                                          max_query_len, scale, sliding_window)


@paged_attention.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, query_start, max_query_len, scale, sliding_window=None):
    return q.new_empty(q.shape)


# ---- fused elementwise ops of a decoder layer (kernels/fused.py) ------------------------------------------------

@torch.library.custom_op("fourbit::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., N) -> x · rsqrt(mean(x²) + eps) · weight in x's dtype, computed in float32."""
    return _impl("fused", "rms_norm", x)(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("fourbit::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (rms_norm(s), s), s = x + residual in x's dtype: a residual add and the norm after it in one pass."""
    return _impl("fused", "add_rms_norm", x)(x, residual, weight, eps)


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("fourbit::rope", mutates_args=())
def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q (T, Hq, D), k (T, Hkv, D) rotated by cos, sin (T, D/2): interleaved pairs or rotate-half."""
    return _impl("fused", "rope", q)(q, k, cos, sin, interleaved)


@rope.register_fake
def _(q, k, cos, sin, interleaved):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("fourbit::silu_mul", mutates_args=())
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up (..., H) in gate's dtype; gate and up may be strided halves of a fused gate_up output."""
    return _impl("fused", "silu_mul", gate)(gate, up)


@silu_mul.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("fourbit::paged_kv_write", mutates_args=("k_cache", "v_cache"))
def paged_kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slots: torch.Tensor) -> None:
    """Store k, v (T, Hkv, D) at slots (T,) of the paged caches (num_blocks, Hkv, block_size, >= D)."""
    return _impl("fused", "paged_kv_write", k_cache)(k, v, k_cache, v_cache, slots)


@paged_kv_write.register_fake
def _(k, v, k_cache, v_cache, slots):
    return None


@torch.library.custom_op("fourbit::rope_paged_kv_write", mutates_args=("k_cache", "v_cache"))
def rope_paged_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        interleaved: bool, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slots: torch.Tensor) -> torch.Tensor:
    """rope of q and k, the rotated k and v stored at slots of the paged caches (one launch) -> the rotated q."""
    return _impl("fused", "rope_paged_kv_write", q)(q, k, v, cos, sin, interleaved, k_cache, v_cache, slots)


@rope_paged_kv_write.register_fake
def _(q, k, v, cos, sin, interleaved, k_cache, v_cache, slots):
    return q.new_empty(q.shape)
