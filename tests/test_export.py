"""fourbit.export: W4A16 models written as AutoAWQ GEMM / GPTQ v1 checkpoints, read back with independent unpackers
(tests/quant_fixtures.py) and with fourbit's importer."""
from __future__ import annotations

import json

import pytest
import torch

import fourbit as fb
from fourbit.config import ModelConfig, W4A16Config
from fourbit.errors import FourbitError
from fourbit.models.llama import LlamaModel
from fourbit.nn.linear import W4A16Linear
from hf_fixtures import write_hf_checkpoint
from quant_fixtures import dequant_checkpoint_layer, read_checkpoint, write_quantized_checkpoint, write_word_tokenizer

SMALL = dict(hidden_size=128, intermediate_size=256)


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, W4A16Linear)}


def _round_floats_to_fp16(model):
    """Exported float tensors are fp16: round the model's own so that logits can be compared tightly."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(p.half().float())
    return model


def _logits(model, vocab, seed=0):
    tok = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tok)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _rtn_model(tmp_path, arch="llama", group_size=64, sym=False, **overrides):
    write_hf_checkpoint(tmp_path / "hf", arch, seed=21, **{**SMALL, **overrides})
    write_word_tokenizer(tmp_path / "hf", 101)
    model = fb.load(tmp_path / "hf", dtype=torch.float32)
    return _round_floats_to_fp16(fb.quantize(model, W4A16Config(group_size=group_size, sym=sym), progress=False))


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
@pytest.mark.parametrize("arch,group_size,sym", [("llama", 64, False), ("qwen2", 128, True), ("mistral", -1, False)])
def test_export_round_trip(tmp_path, fmt, arch, group_size, sym):
    model = _rtn_model(tmp_path, arch, group_size, sym, **({"sliding_window": 5} if arch == "mistral" else {}))
    out = fb.export(model, tmp_path / "out", format=fmt, tokenizer=fb.Tokenizer(tmp_path / "hf"))
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == fmt and qc["bits"] == 4 and qc["group_size"] == group_size
    if fmt == "awq":
        assert qc["zero_point"] is True and qc["version"] == "gemm"  # symmetric too: zeros of 8
    else:
        assert qc["sym"] is sym and qc["desc_act"] is False and qc["checkpoint_format"] == "gptq"
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rope_theta", "tie_word_embeddings"):
        assert cfg[key] == hf[key], key
    assert cfg["torch_dtype"] == "float16"
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()

    # every layer, read back with the independent unpacker: the fp16 dequantization of fourbit's own weights
    tensors = read_checkpoint(out)
    for name, layer in _layers(model).items():
        assert torch.equal(dequant_checkpoint_layer(tensors, "model." + name, fmt), layer.dequantize().half()), name
        if sym and fmt == "awq":
            assert (tensors[f"model.{name}.qzeros"] == 0x88888888 - 2**32).all()
        if layer.bias is not None:
            assert tensors[f"model.{name}.bias"].dtype == torch.float16
    floats = [t for n, t in tensors.items() if n.endswith(("norm.weight", "embed_tokens.weight"))]
    assert floats and all(t.dtype == torch.float16 for t in floats)

    # and fourbit's importer gives back the same layers, bit for bit
    again = fb.load(out, dtype=torch.float32)
    assert again.quant_config == W4A16Config(group_size=group_size, sym=sym, algo=fmt)
    for name, layer in _layers(model).items():
        assert torch.equal(again.get_submodule(name).dequantize(), layer.dequantize()), name
    assert _rel(_logits(again, 101), _logits(model, 101)) < 1e-6


def test_act_order_exports_to_gptq_not_awq(tmp_path):
    write_quantized_checkpoint(tmp_path / "src", "gptq", seed=22, group_size=32, act_order=True, **SMALL)
    model = fb.load(tmp_path / "src", dtype=torch.float32)
    with pytest.raises(FourbitError, match="act-order.*export --format gptq"):
        fb.export(model, tmp_path / "awq", format="awq")
    assert not (tmp_path / "awq").exists(), "a failed export leaves nothing behind"
    out = fb.export(model, tmp_path / "gptq", format="gptq")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is True
    src, exported = read_checkpoint(tmp_path / "src"), read_checkpoint(out)
    for name in _layers(model):
        hf = "model." + name
        assert torch.equal(dequant_checkpoint_layer(exported, hf, "gptq"), dequant_checkpoint_layer(src, hf, "gptq"))
        # the same grouping of input channels (group numbers may be renamed, not regrouped)
        a, b = src[hf + ".g_idx"].long(), exported[hf + ".g_idx"].long()
        assert torch.equal(a[:, None] == a[None, :], b[:, None] == b[None, :])
    again = fb.load(out, dtype=torch.float32)
    assert again.quant_config.permuted
    assert _rel(_logits(again, 101), _logits(model, 101)) < 1e-6


def test_interleaved_rope_model_exports_as_hf_rotate_half(tmp_path):
    """llama2.c / Meta models pair (2i, 2i+1) in RoPE; the export permutes q/k rows so HF's rotate_half matches."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=101, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256,
                         rope_interleaved=True)
    model = LlamaModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    model = _round_floats_to_fp16(fb.quantize(model, W4A16Config(group_size=32), progress=False))
    fb.export(model, tmp_path / "awq", format="awq")
    again = fb.load(tmp_path / "awq", dtype=torch.float32)
    assert again.config.rope_interleaved is False
    assert _rel(_logits(again, 101), _logits(model, 101)) < 1e-5


def test_export_errors(tmp_path):
    write_hf_checkpoint(tmp_path / "hf", "llama", seed=23, **SMALL)
    model = fb.load(tmp_path / "hf", dtype=torch.float32)
    with pytest.raises(FourbitError, match="not quantized"):
        fb.export(model, tmp_path / "o1")
    fb.quantize(model, W4A16Config(group_size=64), progress=False)
    with pytest.raises(FourbitError, match="format 'exl2' is not supported"):
        fb.export(model, tmp_path / "o2", format="exl2")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FourbitError, match="not a directory"):
        fb.export(model, tmp_path / "afile")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "model.safetensors").write_text("x")
    with pytest.raises(FourbitError, match="not empty"):
        fb.export(model, tmp_path / "full")
    # GPTQ v1 stores zero - 1: a zero point of 0 cannot be written
    layer = model.layers[0].mlp.up_proj
    layer.zeros[0, 0] = 0
    with pytest.raises(FourbitError, match="model.layers.0.mlp.up_proj: .*1..16"):
        fb.export(model, tmp_path / "o3", format="gptq")
    fb.export(model, tmp_path / "o4", format="awq")  # AWQ stores raw zeros: fine
    layer.zeros[0, 0] = 16  # only GPTQ v1 imports make these
    with pytest.raises(FourbitError, match="zero point of 16.*export --format gptq"):
        fb.export(model, tmp_path / "o5", format="awq")


def test_shapes_the_formats_cannot_hold(tmp_path):
    """stories260K-like shapes: a hidden size of 172 is not a multiple of 8 (both formats pack 8 per int32)."""
    model = _rtn_model(tmp_path, group_size=-1, intermediate_size=172)
    with pytest.raises(FourbitError, match="model.layers.0.mlp.gate_proj: AutoAWQ .* out_features=172"):
        fb.export(model, tmp_path / "awq", format="awq")
    with pytest.raises(FourbitError, match="model.layers.0.mlp.gate_proj: .*out_features=172 must both be multiples"):
        fb.export(model, tmp_path / "gptq", format="gptq")
