"""An independent, deliberately literal float64 implementation of the Hugging Face Llama / Mistral / Qwen2
forward pass, used as ground truth for the fourbit loader tests. Imports nothing from fourbit.

It follows transformers' modeling_llama / modeling_mistral / modeling_qwen2 math:
  * embeddings -> [RMSNorm -> attention -> residual -> RMSNorm -> SwiGLU MLP -> residual] x L -> RMSNorm -> lm_head
  * RMSNorm: x * rsqrt(mean(x^2) + eps) * w
  * RoPE in the rotate_half (non-interleaved) layout: x * cos + rotate_half(x) * sin, with
    cos/sin = cos/sin(cat(freqs, freqs)), freqs[t, i] = t * inv_freq[i], inv_freq[i] = theta^(-2i/head_dim)
  * rope_scaling: llama3 (as transformers' _compute_llama3_parameters) and linear (inv_freq / factor)
  * GQA: query head h uses kv head h // (n_heads / n_kv_heads)
  * scores = q.k / sqrt(head_dim), causal; Mistral sliding_window: key j visible to query i iff
    j <= i and i - j < window
  * Qwen2: q/k/v projections have biases
  * tie_word_embeddings: lm_head = embed_tokens
The one deliberate difference from transformers: RoPE angles are computed in float64 (transformers computes
them in float32 even for a float64 model).
"""
from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import load_file


def load_hf_config(dir) -> dict:
    with open(os.path.join(os.fspath(dir), "config.json")) as f:
        return json.load(f)


def load_hf_tensors(dir) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint as float64, from model.safetensors or the sharded index."""
    dir = os.fspath(dir)
    index = os.path.join(dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for fn in files:
        for k, v in load_file(os.path.join(dir, fn)).items():
            out[k] = v.to(torch.float64)
    return out


def rope_inv_freq(cfg: dict) -> torch.Tensor:
    """inv_freq (head_dim / 2,) in float64, including rope_scaling."""
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    theta = float(cfg.get("rope_theta", 10000.0))
    inv_freq = torch.tensor([1.0 / theta ** (2 * i / hd) for i in range(hd // 2)], dtype=torch.float64)
    rs = cfg.get("rope_scaling")
    if rs is None:
        return inv_freq
    rope_type = rs.get("rope_type", rs.get("type"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(rs["factor"])
    if rope_type == "llama3":
        factor = float(rs["factor"])
        low_freq_factor = float(rs["low_freq_factor"])
        high_freq_factor = float(rs["high_freq_factor"])
        old_context_len = float(rs["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        out = []
        for f in inv_freq.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < high_freq_wavelen:  # high frequency: unchanged
                out.append(f)
            elif wavelen > low_freq_wavelen:  # low frequency: divided by factor
                out.append(f / factor)
            else:  # medium band: smooth interpolation
                smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
                out.append((1 - smooth) * f / factor + smooth * f)
        return torch.tensor(out, dtype=torch.float64)
    raise NotImplementedError(f"reference does not implement rope_scaling {rs}")


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + torch.exp(-x))


def _sliding_window(cfg: dict) -> int | None:
    mt = cfg.get("model_type")
    if mt == "mistral":
        return cfg.get("sliding_window")
    if mt == "qwen2" and cfg.get("use_sliding_window"):
        raise NotImplementedError("reference does not implement Qwen2 use_sliding_window=true")
    return None


def reference_logits(dir, tokens) -> torch.Tensor:
    """float64 logits (B, T, vocab) for LongTensor tokens (B, T), full causal attention from position 0."""
    cfg = load_hf_config(dir)
    W = load_hf_tensors(dir)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() == 1:
        tokens = tokens[None]
    B, T = tokens.shape

    d = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or d // nh
    eps = float(cfg["rms_norm_eps"])
    group = nh // nkv
    window = _sliding_window(cfg)

    # RoPE tables (T, hd), float64.
    inv_freq = rope_inv_freq(cfg)
    pos = torch.arange(T, dtype=torch.float64)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()

    # Additive attention mask (T, T).
    mask = torch.zeros(T, T, dtype=torch.float64)
    for i in range(T):
        for j in range(T):
            if j > i or (window is not None and i - j >= window):
                mask[i, j] = float("-inf")

    lm_head = W["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else W["lm_head.weight"]

    out = []
    for b in range(B):
        x = W["model.embed_tokens.weight"][tokens[b]]  # (T, d)
        for layer in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            h = _rms_norm(x, W[p + "input_layernorm.weight"], eps)
            q = h @ W[p + "self_attn.q_proj.weight"].T
            k = h @ W[p + "self_attn.k_proj.weight"].T
            v = h @ W[p + "self_attn.v_proj.weight"].T
            if p + "self_attn.q_proj.bias" in W:
                q = q + W[p + "self_attn.q_proj.bias"]
                k = k + W[p + "self_attn.k_proj.bias"]
                v = v + W[p + "self_attn.v_proj.bias"]
            heads = []
            for qh_i in range(nh):
                kh_i = qh_i // group
                qh = q[:, qh_i * hd:(qh_i + 1) * hd]
                kh = k[:, kh_i * hd:(kh_i + 1) * hd]
                vh = v[:, kh_i * hd:(kh_i + 1) * hd]
                qh = qh * cos + _rotate_half(qh) * sin
                kh = kh * cos + _rotate_half(kh) * sin
                scores = qh @ kh.T / math.sqrt(hd) + mask
                probs = torch.softmax(scores, dim=-1)
                heads.append(probs @ vh)
            attn = torch.cat(heads, dim=-1) @ W[p + "self_attn.o_proj.weight"].T
            x = x + attn
            h = _rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
            gate = h @ W[p + "mlp.gate_proj.weight"].T
            up = h @ W[p + "mlp.up_proj.weight"].T
            x = x + (_silu(gate) * up) @ W[p + "mlp.down_proj.weight"].T
        x = _rms_norm(x, W["model.norm.weight"], eps)
        out.append(x @ lm_head.T)
    return torch.stack(out)
