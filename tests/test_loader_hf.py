"""fourbit.models.loader.load_model on tiny random Hugging Face checkpoints vs. an independent float64 reference.

The reference (tests/hf_reference.py) was cross-checked against transformers' LlamaForCausalLM /
MistralForCausalLM / Qwen2ForCausalLM (eager attention, with their internal float32 casts raised to float64):
agreement ~1e-15 on every case below.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))

from hf_fixtures import LLAMA3_ROPE_SCALING, write_hf_checkpoint  # noqa: E402
from hf_reference import reference_logits  # noqa: E402

from fourbit.config import ModelConfig  # noqa: E402
from fourbit.errors import FourbitError  # noqa: E402
from fourbit.models.loader import load_model  # noqa: E402

# (id, arch, config overrides, shards, sequence length)
CASES = [
    ("llama", "llama", {}, 1, 12),
    ("llama3-rope", "llama", {"rope_theta": 500000.0, "rope_scaling": dict(LLAMA3_ROPE_SCALING),
                              "eos_token_id": [2, 3]}, 1, 12),
    ("llama-tied-3shards", "llama", {"tie_word_embeddings": True}, 3, 12),
    ("mistral-window5", "mistral", {"sliding_window": 5}, 1, 12),
    ("qwen2-bias", "qwen2", {"rope_theta": 1e6}, 1, 12),
    ("head-dim-32", "llama", {"head_dim": 32}, 1, 12),
]
CASE_IDS = [c[0] for c in CASES]


def _tokens(vocab: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def _run(path, tokens, dtype):
    model = load_model(str(path), dtype=dtype, device="cpu")
    with torch.no_grad():
        logits = model(tokens)
    return model, logits


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: intra-op threads only add spin-up cost (and oversubscribe a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each case's checkpoint, tokens and reference logits, built once per module."""
    out = {}
    for i, (cid, arch, ov, shards, T) in enumerate(CASES):
        d = tmp_path_factory.mktemp(cid)
        cfg = write_hf_checkpoint(d, arch, seed=100 + i, shards=shards, **ov)
        tok = _tokens(cfg["vocab_size"], T, seed=i)
        out[cid] = (d, cfg, tok, reference_logits(d, tok))
    return out


@pytest.mark.parametrize("cid", CASE_IDS)
def test_float64_matches_reference(checkpoints, cid):
    d, cfg, tok, ref = checkpoints[cid]
    _, logits = _run(d, tok, torch.float64)
    assert logits.shape == (2, tok.shape[1], cfg["vocab_size"])
    assert logits.dtype == torch.float64
    err = _rel_err(logits, ref)
    assert err < 1e-9, f"{cid}: max|diff|/max|ref| = {err:.3e}"


@pytest.mark.parametrize("cid", CASE_IDS)
def test_float32_matches_reference(checkpoints, cid):
    d, cfg, tok, ref = checkpoints[cid]
    _, logits = _run(d, tok, torch.float32)
    assert logits.shape == (2, tok.shape[1], cfg["vocab_size"])
    assert logits.is_floating_point()
    err = _rel_err(logits, ref)
    assert err < 1e-4, f"{cid}: max|diff|/max|ref| = {err:.3e}"


@pytest.mark.parametrize("cid", CASE_IDS)
def test_model_config(checkpoints, cid):
    d, cfg, _, _ = checkpoints[cid]
    model = load_model(str(d), dtype=torch.float64, device="cpu")
    mc = model.config
    assert isinstance(mc, ModelConfig)
    assert mc.vocab_size == cfg["vocab_size"]
    assert mc.dim == cfg["hidden_size"]
    assert mc.n_layers == cfg["num_hidden_layers"]
    assert mc.n_heads == cfg["num_attention_heads"]
    assert mc.n_kv_heads == cfg["num_key_value_heads"]
    assert mc.hidden_dim == cfg["intermediate_size"]
    assert mc.head_dim == (cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    assert mc.norm_eps == pytest.approx(cfg["rms_norm_eps"])
    assert mc.rope_theta == pytest.approx(cfg["rope_theta"])
    assert mc.rope_interleaved is False
    assert mc.qkv_bias == (cfg["model_type"] == "qwen2")
    assert mc.tie_embeddings == cfg["tie_word_embeddings"]
    expected_window = cfg.get("sliding_window") if cfg["model_type"] == "mistral" else None
    assert mc.sliding_window == expected_window
    eos = cfg["eos_token_id"]
    assert tuple(mc.eos_ids) == tuple(eos if isinstance(eos, list) else [eos])


def test_bfloat16_checkpoint_upcasts_exactly(tmp_path):
    """torch_dtype bfloat16 with bf16 tensors on disk: a float64 load must upcast them exactly."""
    cfg = write_hf_checkpoint(tmp_path, "llama", seed=7, shards=2, torch_dtype="bfloat16")
    tok = _tokens(cfg["vocab_size"], 10, seed=7)
    ref = reference_logits(tmp_path, tok)
    _, logits = _run(tmp_path, tok, torch.float64)
    assert _rel_err(logits, ref) < 1e-9


def test_mistral_window_larger_than_sequence_is_plain_causal(tmp_path):
    """sliding_window >= T changes nothing; sliding_window=5 must differ from it (the window is applied)."""
    tok = _tokens(101, 12, seed=3)
    a, b = tmp_path / "w5", tmp_path / "w64"
    write_hf_checkpoint(a, "mistral", seed=9, sliding_window=5)
    write_hf_checkpoint(b, "mistral", seed=9, sliding_window=64)
    _, la = _run(a, tok, torch.float64)
    _, lb = _run(b, tok, torch.float64)
    ref_b = reference_logits(b, tok)
    assert _rel_err(lb, ref_b) < 1e-9
    # positions 0..4 see at most 5 keys either way; later positions must differ
    assert torch.allclose(la[:, :5], lb[:, :5], rtol=0, atol=1e-12)
    assert (la[:, 5:] - lb[:, 5:]).abs().max() > 1e-3


def test_linear_rope_scaling(tmp_path):
    """rope_scaling {"rope_type": "linear"} (ModelConfig says it is supported): inv_freq / factor."""
    cfg = write_hf_checkpoint(tmp_path, "llama", seed=11, rope_scaling={"rope_type": "linear", "factor": 2.0})
    tok = _tokens(cfg["vocab_size"], 12, seed=11)
    _, logits = _run(tmp_path, tok, torch.float64)
    assert _rel_err(logits, reference_logits(tmp_path, tok)) < 1e-9


def test_causal_prefix_consistency(checkpoints):
    """Logits at position t depend only on tokens[: t + 1] (no KV cache, full causal attention)."""
    d, _, tok, _ = checkpoints["llama"]
    model = load_model(str(d), dtype=torch.float64, device="cpu")
    with torch.no_grad():
        full = model(tok)
        short = model(tok[:, :7])
    assert (full[:, :7] - short).abs().max().item() < 1e-12


# ---------------------------------------------------------------- errors


def _edit_config(path, **changes):
    p = os.path.join(path, "config.json")
    with open(p) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(p, "w") as f:
        json.dump(cfg, f)


def test_unsupported_architecture_raises(tmp_path):
    write_hf_checkpoint(tmp_path, "llama", seed=0)
    _edit_config(tmp_path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(FourbitError):
        load_model(str(tmp_path), dtype=torch.float64, device="cpu")


@pytest.mark.parametrize("shards", [1, 2])
def test_missing_tensor_raises_naming_it(tmp_path, shards):
    write_hf_checkpoint(tmp_path, "llama", seed=0, shards=shards)
    victim = "model.layers.1.mlp.up_proj.weight"
    if shards == 1:
        files = ["model.safetensors"]
    else:
        with open(tmp_path / "model.safetensors.index.json") as f:
            index = json.load(f)
        files = [index["weight_map"].pop(victim)]
        with open(tmp_path / "model.safetensors.index.json", "w") as f:
            json.dump(index, f)
    fn = str(tmp_path / files[0])
    tensors = load_file(fn)
    del tensors[victim]
    save_file(tensors, fn, metadata={"format": "pt"})
    with pytest.raises(FourbitError, match=victim.replace(".", r"\.")):
        load_model(str(tmp_path), dtype=torch.float64, device="cpu")


def test_missing_qwen2_bias_raises_naming_it(tmp_path):
    write_hf_checkpoint(tmp_path, "qwen2", seed=0)
    victim = "model.layers.0.self_attn.k_proj.bias"
    fn = str(tmp_path / "model.safetensors")
    tensors = load_file(fn)
    del tensors[victim]
    save_file(tensors, fn, metadata={"format": "pt"})
    with pytest.raises(FourbitError, match=victim.replace(".", r"\.")):
        load_model(str(tmp_path), dtype=torch.float64, device="cpu")


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"type": "dynamic", "factor": 2.0},
])
def test_unsupported_rope_scaling_raises(tmp_path, rope_scaling):
    write_hf_checkpoint(tmp_path, "llama", seed=0, rope_scaling=rope_scaling)
    with pytest.raises(FourbitError):
        load_model(str(tmp_path), dtype=torch.float64, device="cpu")


def test_wrong_shape_raises(tmp_path):
    write_hf_checkpoint(tmp_path, "llama", seed=0)
    victim = "model.layers.0.self_attn.o_proj.weight"
    fn = str(tmp_path / "model.safetensors")
    tensors = load_file(fn)
    tensors[victim] = tensors[victim][:, :-2].contiguous()
    save_file(tensors, fn, metadata={"format": "pt"})
    # loose on the prefix: the missing-tensor test above already pins the full checkpoint name
    with pytest.raises(FourbitError, match=r"layers\.0\.self_attn\.o_proj\.weight"):
        load_model(str(tmp_path), dtype=torch.float64, device="cpu")


def test_legacy_rotary_inv_freq_tensors_are_ignored(tmp_path):
    """Older Llama-2 checkpoints carry model.layers.{i}.self_attn.rotary_emb.inv_freq; they must not break loading."""
    cfg = write_hf_checkpoint(tmp_path, "llama", seed=5)
    fn = str(tmp_path / "model.safetensors")
    tensors = load_file(fn)
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    for i in range(cfg["num_hidden_layers"]):
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.full((hd // 2,), 123.0)
    save_file(tensors, fn, metadata={"format": "pt"})
    tok = _tokens(cfg["vocab_size"], 8, seed=5)
    _, logits = _run(tmp_path, tok, torch.float64)
    assert _rel_err(logits, reference_logits(tmp_path, tok)) < 1e-9
