"""Where attention reads and writes its keys and values: the two contexts a decoder layer can run in.

Attention modules compute q, k, v and hand them to a context's `attend(layer, q, k, v)`:
- DenseContext: a batch of left-padded rows over the static KVCache (or no cache), torch SDPA. Used by
  models/generate.py, perplexity and calibration.
- PagedContext: the serving engine's flat batch of sequences over a PagedKVCache (fixed-size blocks of
  tokens, a block table per sequence), the paged-attention kernel. Its BatchMeta is built once per step
  by engine/runner.py and passed explicitly.
The storage dtype of either cache is the cache's own property, so a quantized cache slots in here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from ..config import ModelConfig
from ..errors import FourbitError
from ..kernels import HEAD_DIMS


class KVCache:
    """Static per-layer key/value buffers (B, Hkv, S, D). The storage dtype is the cache's own property."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.max_len = max_len
        self.dtype = dtype

    def update(self, layer: int, start: int, k, v):
        """Store k, v (B, Hkv, T, D) at slots [start, start+T); return all keys and values so far."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise FourbitError(f"KV cache holds {self.max_len} tokens; {end} needed: allocate a longer cache")
        self.k[layer][:, :, start:end] = k.to(self.dtype)
        self.v[layer][:, :, start:end] = v.to(self.dtype)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


@dataclass
class DenseContext:
    """Rows of a (B, T) batch in cache slots [start, start+T). mask (B, 1, T, S) boolean, or None for plain
    causal attention over all keys."""
    mask: torch.Tensor | None
    cache: KVCache | None
    start: int

    def attend(self, layer: int, q, k, v, cos, sin, interleaved: bool):
        """q (B, T, Hq, D), k and v (B, T, Hkv, D) -> (B, T, Hq, D); q and k rotated first by cos, sin (B·T, D/2)
        (interleaved pairs or rotate-half)."""
        B, T, H, D = q.shape
        q, k = ops.rope(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), cos, sin, interleaved)
        q, k, v = q.view(B, T, H, D).transpose(1, 2), k.view(B, T, -1, D).transpose(1, 2), v.transpose(1, 2)
        if self.cache is not None:
            k, v = self.cache.update(layer, self.start, k, v)  # (B, Hkv, S, D)
            k, v = k.to(q.dtype), v.to(q.dtype)
        group = q.shape[1] // k.shape[1]
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        T = q.shape[2]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.mask is None and T > 1)
        return out.transpose(1, 2)


class PagedKVCache:
    """Keys and values in blocks of `block_size` tokens: per layer (num_blocks, Hkv, block_size, D) each.

    Token t of a sequence lives in block block_table[t // block_size] at offset t % block_size; its slot is
    block * block_size + offset. The last block (id num_blocks - 1) is scratch: padded batch entries of a
    captured CUDA graph write there, and no sequence owns it.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        shape = (num_blocks, config.n_kv_heads, block_size, self.stored_head_dim(config))
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.scratch_block = num_blocks - 1

    @staticmethod
    def stored_head_dim(config: ModelConfig) -> int:
        """The kernel takes head dims of 32, 64, 128, 256 (kernels.HEAD_DIMS); a smaller or odd
        one is stored zero-padded to the next, which changes no score (q·k) and adds only zero output columns."""
        for d in HEAD_DIMS:
            if config.head_dim <= d:
                return d
        raise FourbitError(f"the paged KV cache supports head_dim up to {HEAD_DIMS[-1]}, this model has "
                           f"{config.head_dim}")

    @classmethod
    def bytes_per_block(cls, config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return 2 * config.n_layers * config.n_kv_heads * block_size * cls.stored_head_dim(config) * dtype.itemsize


@dataclass
class BatchMeta:
    """One engine step: S sequences, T new tokens in all, concatenated sequence by sequence."""
    positions: torch.Tensor  # (T,) int64: RoPE position of each new token
    slots: torch.Tensor  # (T,) int64: cache slot its key and value go to
    block_tables: torch.Tensor  # (S, max_blocks) int32
    seq_lens: torch.Tensor  # (S,) int32: tokens in the cache per sequence, the new ones included
    query_start: torch.Tensor  # (S + 1,) int32: offsets of each sequence's new tokens in T
    last: torch.Tensor  # (S,) int64: index in T of each sequence's last new token (its logits row)
    max_query_len: int


@dataclass
class PagedContext:
    meta: BatchMeta
    cache: PagedKVCache
    sliding_window: int | None

    def attend(self, layer: int, q, k, v, cos, sin, interleaved: bool):
        """q (1, T, Hq, D), k and v (1, T, Hkv, D) -> (1, T, Hq, D): rotate q and k by cos, sin (T, D/2), store k
        and v (one kernel), then attend over the blocks."""
        m, c = self.meta, self.cache
        q = ops.rope_paged_kv_write(q[0], k[0], v[0], cos, sin, interleaved, c.k[layer], c.v[layer],
                                    m.slots)[None]  # the cache's columns past D written as zeros
        d = q.shape[-1]
        pad = c.k[layer].shape[-1] - d
        if pad:  # a head dim the kernel lacks: zero columns up to the stored one (see stored_head_dim)
            q = F.pad(q, (0, pad))
        out = ops.paged_attention(q[0], c.k[layer], c.v[layer], m.block_tables, m.seq_lens, m.query_start,
                                  m.max_query_len, d ** -0.5, self.sliding_window)
        return out[None, ..., :d]
