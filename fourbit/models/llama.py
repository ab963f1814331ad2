"""Llama-family decoder (Llama 1/2/3, Mistral, Qwen2): RMSNorm, RoPE, GQA attention, SwiGLU.

The model knows nothing about quantization: every projection is built by `make_linear(in, out, bias)`, a
factory the caller picks (nn.Linear by default; fourbit.nn.linear_factory for a quantized scheme).

Batches may hold prompts of different lengths, left-padded: `pad[b]` leading slots of row b are padding. A
token in slot a of row b sits at RoPE position a - pad[b]; keys in padding slots are never attended.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import ModelConfig
from ..errors import FourbitError
from .attention import BatchMeta, DenseContext, KVCache, PagedContext, PagedKVCache

LinearFactory = Callable[[int, int, bool], nn.Module]


def default_linear(in_features: int, out_features: int, bias: bool) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None):
        """Normalises x in float32 (float64 for float64 x) whatever the activation dtype, as the reference
        implementations do. With a residual: (norm(x + residual), x + residual), the add fused into the norm."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in float64, with the config's rope scaling applied."""
    d = config.head_dim
    inv_freq = config.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        orig = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((orig / wavelen - low) / (high - low)).clamp(0, 1)
        # long wavelengths (> orig/low) fully scaled, short (< orig/high) untouched, linear blend between
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq
    if kind == "default":
        return inv_freq
    raise FourbitError(f"rope_scaling type {kind!r} is not supported (supported: llama3, linear)")


class Attention(nn.Module):
    FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}  # what nn.fuse_projections_ may fuse (outputs in order)

    def __init__(self, config: ModelConfig, make_linear: LinearFactory):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = make_linear(c.dim, c.n_heads * c.head_dim, c.qkv_bias)
        self.k_proj = make_linear(c.dim, c.n_kv_heads * c.head_dim, c.qkv_bias)
        self.v_proj = make_linear(c.dim, c.n_kv_heads * c.head_dim, c.qkv_bias)
        self.o_proj = make_linear(c.n_heads * c.head_dim, c.dim, False)

    def forward(self, x, cos, sin, interleaved: bool, ctx, layer: int):
        """x (B, T, dim); cos, sin (B, T, D/2) rotate pairs (x[2i], x[2i+1]) if interleaved, else (x[i], x[i+D/2]);
        ctx holds the keys and values (models/attention.py: DenseContext or PagedContext)."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if "qkv_proj" in self._modules:  # fused (nn/fuse.py): one GEMM, q, k, v are views of its output
            q, k, v = self.qkv_proj(x).split((H * D, Hkv * D, Hkv * D), dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        out = ctx.attend(layer, q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D),
                         cos.reshape(B * T, -1), sin.reshape(B * T, -1), interleaved)  # (B, T, H, D)
        return self.o_proj(out.reshape(B, T, -1))


class MLP(nn.Module):
    FUSED = {"gate_up_proj": ("gate_proj", "up_proj")}
    GATED = {"gate_up_proj"}  # its output only feeds silu(gate) · up: nn.fuse_projections_ may fold that in

    def __init__(self, config: ModelConfig, make_linear: LinearFactory):
        super().__init__()
        self.gate_proj = make_linear(config.dim, config.hidden_dim, False)
        self.up_proj = make_linear(config.dim, config.hidden_dim, False)
        self.down_proj = make_linear(config.hidden_dim, config.dim, False)

    def forward(self, x):
        if "gate_up_proj" in self._modules:  # fused (nn/fuse.py): gate and up are the halves of one output
            if getattr(self.gate_up_proj, "gated", False):  # ... or the layer returns silu(gate) · up itself
                return self.down_proj(self.gate_up_proj(x))
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(ops.silu_mul(gate, up))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, make_linear: LinearFactory):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, make_linear)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config, make_linear)

    def forward(self, x, cos, sin, interleaved, ctx, layer, delta=None):
        """The block on the residual stream x + delta (x alone when delta is None) -> (x', delta'): the stream
        before the MLP's residual add and the MLP's output. Their sum is the block's output; the next block's
        input norm (or the final norm) adds them in its own pass, so no decode step spends a kernel on the add."""
        h, x = (self.input_layernorm(x), x) if delta is None else self.input_layernorm(delta, residual=x)
        a = self.self_attn(h, cos, sin, interleaved, ctx, layer)
        h, x = self.post_attention_layernorm(a, residual=x)  # x + a and its norm in one pass
        return x, self.mlp(h)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, make_linear: LinearFactory = default_linear):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, make_linear) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # The classifier stays in full precision (common practice: it is sensitive and small next to the body).
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        return KVCache(self.config, batch, max_len, dtype or self.dtype, self.device)

    def forward(self, tokens, cache: KVCache | None = None, start: int = 0, pad=None):
        """tokens (B, T) in cache slots [start, start+T); pad (B,) left-padding per row or None.

        Returns float32 (or float64) logits (B, T, V). Without a cache, attention covers only these tokens.
        """
        B, T = tokens.shape
        dev = tokens.device
        slots = torch.arange(start, start + T, device=dev)  # (T,)
        # Plain causal attention needs no explicit mask, which lets SDPA take its fast kernels.
        plain = pad is None and not self.config.sliding_window and (cache is None or start == 0 or T == 1)
        pad = torch.zeros(B, dtype=torch.long, device=dev) if pad is None else pad.to(dev)
        positions = (slots[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
        angles = positions[..., None].to(torch.float64) * self.inv_freq.to(dev)  # (B, T, D/2)
        h = self.embed_tokens(tokens)
        cos, sin = angles.cos().to(h.dtype), angles.sin().to(h.dtype)
        mask = None if plain else self._mask(slots, pad, start if cache is None else 0, start + T)  # (B, 1, T, S)
        return self._layers(h, cos, sin, DenseContext(mask, cache, start))

    def forward_paged(self, tokens, meta: BatchMeta, cache: PagedKVCache, out=None):
        """The serving engine's step: tokens (T,) of S sequences (models/attention.py: BatchMeta says where
        each sits). Returns float32 logits (S, V) of each sequence's last new token, in `out` when given."""
        angles = meta.positions[:, None].to(torch.float64) * self.inv_freq  # (T, D/2)
        h = self.embed_tokens(tokens)[None]  # (1, T, dim)
        cos, sin = angles.cos().to(h.dtype)[None], angles.sin().to(h.dtype)[None]
        return self._layers(h, cos, sin, PagedContext(meta, cache, self.config.sliding_window), meta.last, out)

    def _layers(self, h, cos, sin, ctx, rows=None, out=None):
        """The decoder blocks, final norm and classifier; logits of all positions, or of h[0, rows] (S,)."""
        delta = None  # the last block's MLP output, not yet added to h (Block.forward)
        for i, layer in enumerate(self.layers):
            h, delta = layer(h, cos, sin, self.config.rope_interleaved, ctx, i, delta=delta)
        if rows is not None:  # (S, dim): the classifier runs only where a token is sampled
            h, delta = h[0, rows], delta[0, rows]
        h = self.norm(h) if delta is None else self.norm(delta, residual=h)[0]
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, head)
        return logits.to(torch.promote_types(h.dtype, torch.float32)) if out is None else out.copy_(logits)

    def _mask(self, slots, pad, first_key: int, end: int):
        """Boolean (B, 1, T, S) mask over key slots [first_key, end): causal, no padding, sliding window."""
        keys = torch.arange(first_key, end, device=slots.device)  # (S,)
        q, k = slots[None, :, None], keys[None, None, :]
        allowed = (k <= q) & (k >= pad[:, None, None])
        if self.config.sliding_window:
            allowed &= q - k < self.config.sliding_window
        # A padding query sees only itself, so no softmax row is empty (its output is never used).
        allowed |= k == q
        return allowed[:, None]
