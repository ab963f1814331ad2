"""Tiny random Hugging Face checkpoints (Llama / Mistral / Qwen2) for loader tests.

write_hf_checkpoint(dir, arch, seed=..., shards=..., **overrides) writes config.json plus model.safetensors (or
model-0000k-of-0000n.safetensors shards + model.safetensors.index.json) with exactly the tensor names and
config keys that transformers uses, and returns the config dict it wrote.

Weights are drawn so that the model is numerically "interesting": norms are random (not all ones), projection
weights have std ~0.15 so attention is far from uniform, and logits have O(1) spread.
"""
from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import save_file

ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}

LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_config(arch: str) -> dict:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}: use one of {sorted(ARCHITECTURES)}")
    architecture, model_type = ARCHITECTURES[arch]
    cfg = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "vocab_size": 101,
        "tie_word_embeddings": False,
        "max_position_embeddings": 128,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        "initializer_range": 0.02,
        "use_cache": True,
        "transformers_version": "4.44.0",
    }
    if arch == "llama":
        cfg.update({"attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1})
    elif arch == "mistral":
        cfg.update({"sliding_window": None, "attention_dropout": 0.0})
    elif arch == "qwen2":
        # As in real Qwen2 configs: a sliding_window value is present but disabled by use_sliding_window=false.
        cfg.update({"use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 2,
                    "attention_dropout": 0.0, "bos_token_id": 100, "eos_token_id": 100})
    return cfg


def head_dim_of(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def make_tensors(cfg: dict, arch: str, seed: int, std: float = 0.15) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=std):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    def norm_w(n):
        return 1.0 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)

    d, hd = cfg["hidden_size"], head_dim_of(cfg)
    nh, nkv, ffn, V = (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"],
                       cfg["vocab_size"])
    t = {"model.embed_tokens.weight": randn(V, d, scale=0.5)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm_w(d)
        t[p + "self_attn.q_proj.weight"] = randn(nh * hd, d)
        t[p + "self_attn.k_proj.weight"] = randn(nkv * hd, d)
        t[p + "self_attn.v_proj.weight"] = randn(nkv * hd, d)
        if arch == "qwen2":
            t[p + "self_attn.q_proj.bias"] = randn(nh * hd, scale=0.5)
            t[p + "self_attn.k_proj.bias"] = randn(nkv * hd, scale=0.5)
            t[p + "self_attn.v_proj.bias"] = randn(nkv * hd, scale=0.5)
        t[p + "self_attn.o_proj.weight"] = randn(d, nh * hd)
        t[p + "post_attention_layernorm.weight"] = norm_w(d)
        t[p + "mlp.gate_proj.weight"] = randn(ffn, d)
        t[p + "mlp.up_proj.weight"] = randn(ffn, d)
        t[p + "mlp.down_proj.weight"] = randn(d, ffn)
    t["model.norm.weight"] = norm_w(d)
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = randn(V, d)
    dtype = _DTYPES[cfg.get("torch_dtype", "float32")]
    return {k: v.to(dtype).contiguous() for k, v in t.items()}


def write_tensors(dir, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
    """Save tensors as model.safetensors, or as `shards` files + model.safetensors.index.json."""
    dir = os.fspath(dir)
    if shards <= 1:
        save_file(tensors, os.path.join(dir, "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
        save_file(chunk, os.path.join(dir, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_hf_checkpoint(dir, arch: str, *, seed: int, shards: int = 1, **overrides) -> dict:
    """Write a small random HF checkpoint of `arch` into `dir`; config keys in `overrides` replace defaults."""
    os.makedirs(dir, exist_ok=True)
    cfg = default_config(arch)
    cfg.update(overrides)
    tensors = make_tensors(cfg, arch, seed)
    with open(os.path.join(os.fspath(dir), "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_tensors(dir, tensors, shards)
    return cfg
