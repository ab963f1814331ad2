"""Build a LlamaModel from a Hugging Face directory, a llama2.c checkpoint, a fourbit checkpoint or a dummy preset.

Hugging Face directories holding AutoAWQ / GPTQ weights (a quantization_config) go to fourbit/interop/importer.py.

Weights come only from safetensors or llama2.c's raw float32 format: nothing is unpickled.
Models are built on the meta device and their tensors assigned, so memory holds one copy of the weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import FourbitError
from .llama import LinearFactory, LlamaModel, default_linear, rope_inv_freq

HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

PRESETS = {
    # Shapes of the public models; weights are seeded random numbers (nothing is downloaded).
    "tiny": ModelConfig(vocab_size=512, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, hidden_dim=688),
    "llama-2-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                              hidden_dim=11008, max_seq_len=4096),
    "llama-2-13b": ModelConfig(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40,
                               hidden_dim=13824, max_seq_len=4096),
    "llama-2-70b": ModelConfig(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                               hidden_dim=28672, max_seq_len=4096),
    "llama-3-8b": ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                              hidden_dim=14336, rope_theta=500000.0, max_seq_len=8192, bos_id=128000,
                              eos_ids=(128001, 128009)),
    "mistral-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                              hidden_dim=14336, rope_theta=1000000.0, max_seq_len=32768),
}


def load_model(path: str, dtype: torch.dtype | None = None, device="cpu", seed: int = 0) -> LlamaModel:
    """Load any supported model source. dtype None keeps the checkpoint's own (float32 for llama2.c)."""
    path = str(path)
    if path.startswith("dummy:"):
        return dummy_model(path[len("dummy:"):], dtype or torch.float32, device, seed)
    p = Path(path)
    if p.is_file() and p.suffix == ".bin":
        return load_llama2c(p, dtype or torch.float32, device)
    if p.is_dir() and (p / "config.json").is_file():
        cfg = json.loads((p / "config.json").read_text())
        if "fourbit" in cfg:
            from ..api import load_fourbit  # the quantized layers live above the models package

            return load_fourbit(p, dtype, device)
        if hf_quantization_config(p, cfg) is not None:
            from ..interop.importer import load_quantized_hf

            return load_quantized_hf(p, dtype, device)
        return load_hf(p, dtype, device)
    if not p.exists():
        raise FourbitError(f"model not found: {path} (expected a Hugging Face directory, a llama2.c .bin, "
                           f"a fourbit checkpoint directory or dummy:<preset>)")
    raise FourbitError(f"don't know how to load {path}: expected a directory with config.json, a llama2.c .bin "
                       f"or dummy:<preset>")


def build(config: ModelConfig, tensors: dict, dtype, device, make_linear: LinearFactory = default_linear,
          source_name=lambda name: name, float_linears=()):
    """Instantiate on the meta device, then assign `tensors` (names as in LlamaModel.state_dict()).

    source_name maps our tensor names back to the checkpoint's, for error messages. float_linears names projections
    (e.g. "layers.0.mlp.down_proj") that are plain nn.Linear whatever make_linear builds: a quantized checkpoint
    may leave some layers in float.
    """
    with torch.device("meta"):
        model = LlamaModel(config, make_linear)
        modules = dict(model.named_modules())
        for name in float_linears:
            old = modules.get(name)
            if old is None or isinstance(old, nn.Linear):
                continue  # not a projection of this model: reported below as unexpected tensors
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    nn.Linear(old.in_features, old.out_features, bias=old.bias is not None))
    expected = model.state_dict()
    missing = [source_name(n) for n in expected if n not in tensors]
    unexpected = [source_name(n) for n in tensors if n not in expected]
    if missing or unexpected:
        what = (f"missing tensors {missing[:4]}" if missing else "") + \
               (f"{'; ' if missing else ''}unexpected tensors {unexpected[:4]}" if unexpected else "")
        raise FourbitError(f"checkpoint does not match a {config.n_layers}-layer Llama model: {what}")
    state = {}
    for name, ref in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise FourbitError(f"tensor {source_name(name)} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        # Floating tensors take the model dtype, except those the quantized layers keep in their own dtype.
        keep = not t.is_floating_point() or ref.dtype != torch.float32
        state[name] = t.to(device=device, dtype=ref.dtype if keep else dtype)
    model.load_state_dict(state, assign=True)
    model.inv_freq = rope_inv_freq(config).to(device)  # a non-persistent buffer, still on the meta device
    return model.eval()


# ---------------------------------------------------------------- Hugging Face

def hf_config(d: dict) -> ModelConfig:
    arch = (d.get("architectures") or ["?"])[0]
    if arch not in HF_ARCHITECTURES:
        raise FourbitError(f"architecture {arch} is not supported: fourbit loads {', '.join(HF_ARCHITECTURES)}")
    if arch == "LlamaForCausalLM" and (d.get("attention_bias") or d.get("mlp_bias")):
        raise FourbitError("Llama checkpoints with attention_bias or mlp_bias are not supported")
    window = d.get("sliding_window") if arch == "MistralForCausalLM" else None
    if arch == "Qwen2ForCausalLM" and d.get("use_sliding_window"):
        raise FourbitError("Qwen2 with use_sliding_window=true is not supported")
    eos = d.get("eos_token_id", 2)
    config = ModelConfig(
        vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"],
        n_heads=d["num_attention_heads"], n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        hidden_dim=d["intermediate_size"], head_dim=d.get("head_dim") or 0, norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(d.get("rope_theta", 10000.0)), rope_interleaved=False, rope_scaling=d.get("rope_scaling"),
        qkv_bias=arch == "Qwen2ForCausalLM", tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_seq_len=d.get("max_position_embeddings", 2048), sliding_window=window,
        bos_id=d.get("bos_token_id"), eos_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)))
    rope_inv_freq(config)  # fail early on an unsupported rope_scaling
    return config


def hf_config_dict(config: ModelConfig, dtype: str = "float16") -> dict:
    """The Hugging Face config.json fields of a model (the inverse of hf_config), for exported checkpoints.

    Interleaved-RoPE models (llama2.c, Meta) are described as HF rotate_half models: the exporter permutes their
    q/k rows (hf_rope_rows).
    """
    c = config
    if c.qkv_bias and c.sliding_window:
        raise FourbitError("a model with qkv bias and a sliding window has no Hugging Face architecture fourbit writes")
    arch = "Qwen2ForCausalLM" if c.qkv_bias else "MistralForCausalLM" if c.sliding_window else "LlamaForCausalLM"
    d = {"architectures": [arch], "model_type": arch.removesuffix("ForCausalLM").lower(),
         "vocab_size": c.vocab_size, "hidden_size": c.dim, "intermediate_size": c.hidden_dim,
         "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
         "head_dim": c.head_dim, "hidden_act": "silu", "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
         "rope_scaling": c.rope_scaling, "tie_word_embeddings": c.tie_embeddings,
         "max_position_embeddings": c.max_seq_len, "bos_token_id": c.bos_id,
         "eos_token_id": c.eos_ids[0] if len(c.eos_ids) == 1 else (list(c.eos_ids) or None),
         "torch_dtype": dtype, "use_cache": True}
    if arch == "LlamaForCausalLM":
        d.update(attention_bias=False, mlp_bias=False)
    elif arch == "MistralForCausalLM":
        d["sliding_window"] = c.sliding_window
    else:
        d.update(use_sliding_window=False, sliding_window=None)
    return d


def hf_rope_rows(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order turning an interleaved-RoPE q/k projection (pairs 2i, 2i+1) into HF's rotate_half one (pairs
    i, i + D/2): HF row h*D + j*D/2 + i is our row h*D + 2i + j -> index (n_heads * head_dim,)."""
    within = torch.arange(head_dim).view(head_dim // 2, 2).t().reshape(head_dim)
    return (torch.arange(n_heads)[:, None] * head_dim + within).reshape(-1)


def to_hf_name(name: str) -> str:
    """Our tensor name -> the Hugging Face one (the decoder lives under "model.", the classifier does not)."""
    return name if name.startswith("lm_head") else "model." + name


def from_hf_names(tensors: dict, config: ModelConfig) -> dict:
    """Hugging Face tensor names -> ours, dropping what we recompute (rotary inv_freq) or share (tied lm_head)."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from the config
        out[name.removeprefix("model.")] = t
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")  # AutoGPTQ's and AutoAWQ's older side files


def hf_quantization_config(folder: Path, cfg: dict) -> dict | None:
    """A Hugging Face directory's quantization_config: from config.json, else from an older side file."""
    if cfg.get("quantization_config"):
        return cfg["quantization_config"]
    for name in QUANT_CONFIG_FILES:
        if (folder / name).is_file():
            d = json.loads((folder / name).read_text())
            return {"quant_method": "gptq" if name == "quantize_config.json" else "awq", **d}
    return None


def read_safetensors(folder: Path) -> dict:
    """All tensors of a (possibly sharded) safetensors checkpoint, by name."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(f.name for f in folder.glob("*.safetensors"))
    if not files:
        raise FourbitError(f"no *.safetensors files in {folder} (pickled .bin checkpoints are not loaded: "
                           f"convert them to safetensors)")
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise FourbitError(f"shard {missing[0]} listed in {index.name} is missing from {folder}")
    tensors = {}
    total = sum((folder / name).stat().st_size for name in files)
    with tqdm(total=total, desc=f"loading {folder.name}", unit="B", unit_scale=True, disable=total < 2**28) as bar:
        for name in files:
            with safe_open(folder / name, framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
                    bar.update(tensors[key].numel() * tensors[key].element_size())
    return tensors


def load_hf(folder: Path, dtype=None, device="cpu") -> LlamaModel:
    d = json.loads((folder / "config.json").read_text())
    config = hf_config(d)
    if dtype is None:
        dtype = getattr(torch, d.get("torch_dtype") or "float32")
    tensors = from_hf_names(read_safetensors(folder), config)
    return build(config, tensors, dtype, device, source_name=to_hf_name)


# ---------------------------------------------------------------- llama2.c

def load_llama2c(path: Path, dtype=torch.float32, device="cpu") -> LlamaModel:
    """llama2.c legacy (version 0) checkpoint: 7 int32 header fields, then float32 arrays (run.c order)."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size < 28:
        raise FourbitError(f"{path}: truncated llama2.c checkpoint (only {raw.size} bytes)")
    header = raw[:28].view(np.int32)
    if int(header[0]) == 0x616B3432:  # "ak42": the newer versioned export
        raise FourbitError(f"{path}: llama2.c export version {int(header[1])} is not supported; "
                           f"export with --version 0 (legacy)")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = (int(v) for v in header)
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads or n_heads % n_kv:
        raise FourbitError(f"{path}: not a llama2.c checkpoint (header {header.tolist()})")
    hd = dim // n_heads
    kv = n_kv * hd
    shapes = [("embed_tokens.weight", (vocab, dim)), ("rms_att", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
              ("wk", (n_layers, kv, dim)), ("wv", (n_layers, kv, dim)), ("wo", (n_layers, dim, dim)),
              ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
              ("w3", (n_layers, hidden, dim)), ("norm.weight", (dim,)),
              ("freq_cis_real", (seq_len, hd // 2)), ("freq_cis_imag", (seq_len, hd // 2))]
    if not shared:
        shapes.append(("lm_head.weight", (vocab, dim)))
    expected = 28 + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if raw.size != expected:
        kind = "truncated" if raw.size < expected else "has trailing bytes, so it is not a legacy"
        raise FourbitError(f"{path}: {kind} llama2.c checkpoint: expected {expected} bytes for its header, "
                           f"found {raw.size}")
    floats = torch.from_numpy(raw[28:].view(np.float32).copy())
    arrays, offset = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        arrays[name] = floats[offset:offset + n].view(shape)
        offset += n
    config = ModelConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                         hidden_dim=hidden, norm_eps=1e-5, rope_interleaved=True, tie_embeddings=shared,
                         max_seq_len=seq_len, bos_id=1, eos_ids=(1, 2))  # llama2.c stops at BOS: stories are BOS-separated
    tensors = {k: arrays[k] for k in ("embed_tokens.weight", "norm.weight", "lm_head.weight") if k in arrays}
    per_layer = {"input_layernorm.weight": "rms_att", "self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk",
                 "self_attn.v_proj.weight": "wv", "self_attn.o_proj.weight": "wo",
                 "post_attention_layernorm.weight": "rms_ffn", "mlp.gate_proj.weight": "w1",
                 "mlp.down_proj.weight": "w2", "mlp.up_proj.weight": "w3"}
    for i in range(n_layers):
        for ours, theirs in per_layer.items():
            tensors[f"layers.{i}.{ours}"] = arrays[theirs][i]
    return build(config, tensors, dtype, device)


# ---------------------------------------------------------------- dummy presets

def dummy_model(preset: str, dtype=torch.float32, device="cpu", seed: int = 0,
                make_linear: LinearFactory = default_linear) -> LlamaModel:
    """Seeded random weights (std 0.02, norms 1) in the shapes of a named model, generated on `device`."""
    if preset not in PRESETS:
        raise FourbitError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    config = PRESETS[preset]
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in LlamaModel(config).state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            tensors[name] = torch.ones(shape, dtype=dtype, device=device)
        else:
            tensors[name] = torch.empty(shape, dtype=dtype, device=device).normal_(0, 0.02, generator=gen)
    return build(config, tensors, dtype, device, make_linear)
