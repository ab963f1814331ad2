"""Write a W4A16 model as an AutoAWQ "GEMM" or a GPTQ v1 Hugging Face checkpoint directory.

The directory holds config.json (the HF architecture fields, models/loader.hf_config_dict, plus a
quantization_config), model.safetensors with HF tensor names (`model.layers.0.self_attn.q_proj.qweight`, ...)
and the tokenizer files. Float tensors are written in fp16 (torch_dtype "float16"): AutoAWQ's and GPTQ's
kernels run fp16 activations. Quantized tensors are exact: the exported checkpoint dequantizes to the same
weights, bit for bit.

    awq:  {quant_method "awq", bits 4, group_size, zero_point true, version "gemm", modules_to_not_convert}
          Symmetric models are written with zero_point true and every zero 8 (AutoAWQ has no symmetric GEMM layout;
          the weights are the same). Not exportable: act-order (permuted) models, as AWQ has no g_idx (export gptq);
          zeros of 16 (from GPTQ v1 imports); a group size that does not divide in_features (AutoAWQ asserts it).
    gptq: {quant_method "gptq", bits 4, group_size, desc_act, sym, checkpoint_format "gptq", lm_head false}
          g_idx is written for every layer (act-order from the layers' perm). Not exportable: zero points of 0
          (v1 stores zero - 1), in_features not a multiple of 8.

Interleaved-RoPE models (llama2.c, Meta) become HF rotate_half models by permuting the rows of q_proj and k_proj
(loader.hf_rope_rows); codes, scales and zeros are per output row, so the permutation is exact.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import FourbitError
from ..formats.awq import pack_awq
from ..formats.gptq import pack_gptq
from ..formats.quick import unpack_quick
from ..models.llama import LlamaModel
from ..models.loader import hf_config_dict, hf_rope_rows, to_hf_name
from ..models.tokenizer import Tokenizer
from ..nn.fuse import check_unfused
from ..nn.linear import W4A16Linear

FORMATS = ("awq", "gptq")


def check_out_dir(path: Path) -> None:
    """Refuse a file or a non-empty directory as the output (exported files would mix with others)."""
    if path.exists() and not path.is_dir():
        raise FourbitError(f"{path} exists and is not a directory: choose a new output directory")
    if path.is_dir() and any(path.iterdir()):
        raise FourbitError(f"{path} is not empty: choose a new output directory")


def _quantized_layers(model: LlamaModel) -> dict[str, W4A16Linear]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, W4A16Linear)}
    if getattr(model, "quant_config", None) is None or not layers:
        raise FourbitError("the model is not quantized: quantize it first (fourbit.quantize, or --scheme w4a16)")
    return layers


def _rope_rows(model: LlamaModel, name: str) -> torch.Tensor | None:
    """The HF row order of an interleaved-RoPE model's q_proj / k_proj (None for every other tensor)."""
    c = model.config
    if not c.rope_interleaved or not name.endswith(("self_attn.q_proj", "self_attn.k_proj")):
        return None
    return hf_rope_rows(c.n_heads if name.endswith("q_proj") else c.n_kv_heads, c.head_dim)


def _permutation(m: W4A16Linear) -> torch.Tensor | None:
    """The layer's input permutation (int64), None when it has none or it is the identity."""
    if m.perm is None or torch.equal(m.perm.long(), torch.arange(m.in_features, device=m.perm.device)):
        return None
    return m.perm.long()


def _export_layer(name: str, m: W4A16Linear, format: str, rows) -> dict[str, torch.Tensor]:
    """One W4A16Linear -> its AWQ or GPTQ tensors (HF names)."""
    n, k = m.out_features, m.in_features
    codes = unpack_quick(m.qweight, n, k)  # (N, K), columns in stored order
    scales = m.scales.t()  # (N, G)
    zeros = None if m.zeros is None else m.zeros.t()
    bias = m.bias
    if rows is not None:  # whole output rows move together: exact
        codes, scales = codes[rows], scales[rows]
        zeros = None if zeros is None else zeros[rows]
        bias = None if bias is None else bias[rows]
    perm = _permutation(m)
    hf = to_hf_name(name)
    if format == "awq":
        if perm is not None:
            raise FourbitError(f"{hf} carries an act-order input permutation (an imported GPTQ desc_act checkpoint), "
                               f"which AutoAWQ's format cannot hold: export --format gptq instead")
        if zeros is not None and int(zeros.max()) > 15:
            raise FourbitError(f"{hf} has a zero point of 16 (possible in GPTQ v1 checkpoints), which AutoAWQ's uint4 "
                               f"zeros cannot hold: export --format gptq instead")
        if m.group_size != -1 and k % m.group_size:
            raise FourbitError(f"{hf}: in_features={k} is not a multiple of the group size {m.group_size}, which "
                               f"AutoAWQ requires: quantize with a group size that divides it, or -1")
        if n % 8:
            raise FourbitError(f"{hf}: AutoAWQ packs 8 output channels per int32, so out_features={n} (not a multiple "
                               f"of 8) cannot be exported to AWQ")
        qweight, qzeros, s = pack_awq(codes, scales, zeros)
        out = {"qweight": qweight, "qzeros": qzeros, "scales": s}
    else:
        gs = k if m.group_size == -1 else m.group_size
        stored_group = torch.arange(k, device=codes.device) // gs  # group of stored column j
        g_idx = stored_group
        if perm is not None:  # stored column j is input channel perm[j]: back to input order
            codes = torch.empty_like(codes).index_copy_(1, perm, codes)
            g_idx = torch.empty_like(stored_group).index_copy_(0, perm, stored_group)
        try:
            qweight, qzeros, s, g_idx = pack_gptq(codes, scales, zeros, g_idx)
        except FourbitError as e:
            raise FourbitError(f"{hf}: {e}") from None
        out = {"qweight": qweight, "qzeros": qzeros, "scales": s, "g_idx": g_idx}
    if bias is not None:
        out["bias"] = bias.detach().half()
    return {f"{hf}.{t}": x.contiguous().cpu() for t, x in out.items()}


def _quantization_config(model: LlamaModel, layers: dict, format: str, float_layers: list[str]) -> dict:
    quant = model.quant_config
    gs = quant.group_size
    if format == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": gs, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": float_layers or None}
    desc_act = any(_permutation(m) is not None for m in layers.values())
    d = {"quant_method": "gptq", "bits": 4, "group_size": gs, "desc_act": desc_act, "sym": quant.sym,
         "checkpoint_format": "gptq", "lm_head": False, "static_groups": False, "true_sequential": True}
    if float_layers:  # GPTQModel's per-module rule: "-:" skips a module (vLLM reads it too)
        d["dynamic"] = {"-:^" + n.replace(".", r"\.") + "$": {} for n in float_layers}
    return d


def export_hf(model: LlamaModel, path: Path, format: str = "awq", tokenizer: Tokenizer | None = None) -> Path:
    if format not in FORMATS:
        raise FourbitError(f"export format {format!r} is not supported: use one of {', '.join(FORMATS)}")
    check_unfused(model, "exporting")
    check_out_dir(path)
    layers = _quantized_layers(model)
    config = hf_config_dict(model.config, dtype="float16")  # raises for what HF cannot describe, before any work
    tensors = {}
    for name, m in layers.items():
        tensors.update(_export_layer(name, m, format, _rope_rows(model, name)))
    float_layers = []
    for name, t in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module in layers:
            continue
        if module.endswith("_proj") and leaf == "weight":  # a projection the model keeps in float
            float_layers.append(to_hf_name(module))
        rows = _rope_rows(model, module)
        t = t.detach() if rows is None else t.detach()[rows]
        t16 = t.half()
        if t.is_floating_point() and not torch.isfinite(t16).all() and torch.isfinite(t).all():
            raise FourbitError(f"{to_hf_name(name)} overflows float16, which AWQ/GPTQ checkpoints store: it cannot be "
                               f"exported")
        tensors[to_hf_name(name)] = t16.contiguous().cpu()
    config["quantization_config"] = _quantization_config(model, layers, format, float_layers)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.copy_to(path)
    return path
