"""AutoAWQ GEMM and GPTQ v1 checkpoints made from tiny random HF models (hf_fixtures), for import/export tests.

Everything here is written from the published layouts, independently of fourbit.formats, so that a layout mistake
there shows up as a mismatch:

    AWQ GEMM: qweight int32 [K, N/8], nibble i (bits 4i..) of word [k, c] = q[8c + AWQ_ORDER[i], k];
              qzeros int32 [G, N/8] the same for the raw zeros; scales fp16 [G, N]; no g_idx (groups k // gs).
    GPTQ v1:  qweight int32 [K/8, N], nibble j of word [r, n] = q[n, 8r + j];
              qzeros int32 [G, N/8], nibble j of word [g, c] = z[8c + j, g] - 1; scales fp16 [G, N]; g_idx int32 [K].
    Both dequantize as (q - z) * s in fp16, with g = g_idx[k].

write_quantized_checkpoint(...) quantizes the decoder's projections with a plain min/max quantizer (any g_idx, so
act-order too), packs them, and returns the source's dequantized fp16 weights by HF layer name, together with the
float tensors of the equivalent float model (write it with write_float_twin to compare logits).
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

from hf_fixtures import default_config, make_tensors, write_tensors

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: nibble i of a word holds output column 8c + AWQ_ORDER[i]


def _int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> the int32 tensors checkpoints store."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def quantize_ref(w: torch.Tensor, g_idx: torch.Tensor, groups: int, sym: bool, min_zero: int = 0):
    """Min/max uint4 quantization of W (N, K) with channel k in group g_idx[k]
    -> codes int64 (N, K), scales fp16 (N, G), zeros int64 (N, G)."""
    n, k = w.shape
    w = w.double()
    scales = torch.empty(n, groups, dtype=torch.float16)
    zeros = torch.empty(n, groups, dtype=torch.int64)
    for g in range(groups):
        cols = w[:, g_idx == g]  # (N, size of group g)
        if sym:
            s = (cols.abs().amax(1) / 7).clamp(min=1e-4).half()
            z = torch.full((n,), 8, dtype=torch.int64)
        else:
            lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            s = ((hi - lo) / 15).clamp(min=1e-4).half()
            z = torch.round(-lo / s.double()).long().clamp(min_zero, 15)
        scales[:, g], zeros[:, g] = s, z
    codes = (torch.round(w / scales.double()[:, g_idx]) + zeros[:, g_idx]).clamp(0, 15).long()
    return codes, scales, zeros


def dequant_ref(codes, scales, zeros, g_idx) -> torch.Tensor:
    """(q - z) * s in fp16, as AutoAWQ's and AutoGPTQ's torch paths compute it -> (N, K) fp16."""
    return (codes - zeros[:, g_idx]).half() * scales[:, g_idx]


def dequant_exact(codes, scales, zeros, g_idx) -> torch.Tensor:
    """(q - z) * s without rounding -> (N, K) float32 (exact: |q - z| <= 16 times an fp16 scale fits 24 bits)."""
    return ((codes - zeros[:, g_idx]).double() * scales.double()[:, g_idx]).float()


def pack_awq_ref(codes, zeros):
    """AutoAWQ GEMM: -> qweight [K, N/8], qzeros [G, N/8] (int32)."""
    qweight = torch.zeros(codes.shape[1], codes.shape[0] // 8, dtype=torch.int64)
    qzeros = torch.zeros(zeros.shape[1], zeros.shape[0] // 8, dtype=torch.int64)
    for i, col in enumerate(AWQ_ORDER):  # word c of row k, nibble i: column 8c + col
        qweight |= codes.t()[:, col::8] << (4 * i)
        qzeros |= zeros.t()[:, col::8] << (4 * i)
    return _int32(qweight), _int32(qzeros)


def unpack_awq_ref(qweight, qzeros):
    """Inverse of pack_awq_ref -> codes (N, K), zeros (N, G) int64."""
    k, n8 = qweight.shape
    codes = torch.empty(k, 8 * n8, dtype=torch.int64)
    zeros = torch.empty(qzeros.shape[0], 8 * n8, dtype=torch.int64)
    for i, col in enumerate(AWQ_ORDER):
        codes[:, col::8] = (qweight.long() >> (4 * i)) & 0xF
        zeros[:, col::8] = (qzeros.long() >> (4 * i)) & 0xF
    return codes.t(), zeros.t()


def pack_gptq_ref(codes, zeros):
    """GPTQ v1: -> qweight [K/8, N], qzeros [G, N/8] (int32), zeros stored minus 1."""
    qweight = torch.zeros(codes.shape[1] // 8, codes.shape[0], dtype=torch.int64)
    qzeros = torch.zeros(zeros.shape[1], zeros.shape[0] // 8, dtype=torch.int64)
    for j in range(8):
        qweight |= codes.t()[j::8, :] << (4 * j)  # row 8r + j -> nibble j of word r
        qzeros |= ((zeros.t()[:, j::8] - 1) & 0xF) << (4 * j)
    return _int32(qweight), _int32(qzeros)


def unpack_gptq_ref(qweight, qzeros):
    """Inverse of pack_gptq_ref -> codes (N, K), zeros (N, G) int64 (stored nibble + 1, so 1..16)."""
    k8, n = qweight.shape
    codes = torch.empty(8 * k8, n, dtype=torch.int64)
    zeros = torch.empty(qzeros.shape[0], 8 * qzeros.shape[1], dtype=torch.int64)
    for j in range(8):
        codes[j::8, :] = (qweight.long() >> (4 * j)) & 0xF
        zeros[:, j::8] = ((qzeros.long() >> (4 * j)) & 0xF) + 1
    return codes.t(), zeros.t()


def dequant_checkpoint_layer(tensors: dict, name: str, method: str) -> torch.Tensor:
    """The fp16 weight a checkpoint's layer stands for, read back with the independent unpackers."""
    qweight, qzeros, scales = (tensors[f"{name}.{t}"] for t in ("qweight", "qzeros", "scales"))
    if method == "awq":
        codes, zeros = unpack_awq_ref(qweight, qzeros)
        k, g = codes.shape[1], scales.shape[0]
        g_idx = torch.arange(k) // (k // g)
    else:
        codes, zeros = unpack_gptq_ref(qweight, qzeros)
        g_idx = tensors[f"{name}.g_idx"].long()
    return dequant_ref(codes, scales.t(), zeros, g_idx)


def quantization_config(method: str, group_size: int, sym: bool, act_order: bool) -> dict:
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None}
    return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": act_order, "sym": sym,
            "checkpoint_format": "gptq", "damp_percent": 0.01, "static_groups": False, "true_sequential": True}


def write_quantized_checkpoint(dir, method: str, *, arch: str = "llama", seed: int = 0, group_size: int = 64,
                               sym: bool = False, act_order: bool = False, shards: int = 1, float_layers=(),
                               quantize_lm_head: bool = False, g_idx_fn=None, **overrides):
    """Write an AutoAWQ GEMM (method "awq") or GPTQ v1 ("gptq") checkpoint of a random `arch` model into dir.

    float_layers: HF module names left in float (listed in modules_to_not_convert / GPTQ dynamic);
    g_idx_fn(k, gen) -> (g_idx, groups) overrides the grouping (GPTQ only).
    Returns (refs, float_tensors, cfg): refs = {HF layer name: source-dequantized fp16 (N, K)}; float_tensors = the
    checkpoint as a float model: its fp16 tensors, quantized layers replaced by the exact (q - z) * s in float32
    (the source's fp16 kernels round each product to fp16 as well; fourbit's fp32 path does not).
    """
    os.makedirs(dir, exist_ok=True)
    cfg = default_config(arch)
    cfg.update(overrides)
    cfg["torch_dtype"] = "float32"  # drawn in float32, stored in fp16 as AWQ/GPTQ checkpoints are
    weights = make_tensors(cfg, arch, seed)
    cfg["torch_dtype"] = "float16"
    gen = torch.Generator().manual_seed(seed + 1)
    tensors, refs, float_tensors = {}, {}, {}
    for name, w in weights.items():
        layer = name.removesuffix(".weight")
        quantize = name.endswith("_proj.weight") or (quantize_lm_head and name == "lm_head.weight")
        if not quantize or layer in float_layers:
            tensors[name] = float_tensors[name] = w.half()
            continue
        n, k = w.shape
        if g_idx_fn is not None:
            g_idx, groups = g_idx_fn(k, gen)
        else:
            gs = k if group_size == -1 else group_size
            groups = -(-k // gs)
            g_idx = torch.arange(k) // gs
            if act_order:  # GPTQ desc_act: channels taken in a Hessian-driven order, groups cut along that order
                g_idx = torch.empty_like(g_idx).scatter_(0, torch.randperm(k, generator=gen), g_idx)
        # GPTQ v1 cannot store zero 0 (it stores zero - 1): keep zeros >= 1 as real v1 writers effectively must
        codes, scales, zeros = quantize_ref(w, g_idx, groups, sym, min_zero=1 if method == "gptq" else 0)
        if method == "awq":
            qweight, qzeros = pack_awq_ref(codes, zeros)
            tensors.update({f"{layer}.qweight": qweight, f"{layer}.qzeros": qzeros,
                            f"{layer}.scales": scales.t().contiguous()})
        else:
            qweight, qzeros = pack_gptq_ref(codes, zeros)
            tensors.update({f"{layer}.qweight": qweight, f"{layer}.qzeros": qzeros,
                            f"{layer}.scales": scales.t().contiguous(), f"{layer}.g_idx": g_idx.to(torch.int32)})
        refs[layer] = dequant_ref(codes, scales, zeros, g_idx)
        float_tensors[name] = dequant_exact(codes, scales, zeros, g_idx)
    qc = quantization_config(method, group_size, sym, act_order)
    if float_layers and method == "awq":
        qc["modules_to_not_convert"] = list(float_layers)
    elif float_layers:
        qc["dynamic"] = {"-:^" + n.replace(".", r"\.") + "$": {} for n in float_layers}
    if quantize_lm_head:
        qc["lm_head"] = True
    cfg["quantization_config"] = qc
    with open(os.path.join(os.fspath(dir), "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_tensors(dir, tensors, shards)
    return refs, float_tensors, cfg


def write_float_twin(dir, float_tensors: dict, cfg: dict) -> None:
    """The float HF checkpoint with the source's dequantized weights (what an act-order import must reproduce)."""
    os.makedirs(dir, exist_ok=True)
    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    with open(os.path.join(os.fspath(dir), "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_tensors(dir, float_tensors)


def read_checkpoint(dir) -> dict:
    """All tensors of a checkpoint directory written by write_tensors / fourbit export."""
    out = {}
    for f in sorted(os.listdir(dir)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(os.fspath(dir), f)))
    return out


def write_word_tokenizer(dir, vocab_size: int) -> None:
    """A whitespace word-level tokenizer.json (w3 .. w{V-1}, <s> = 1, </s> = 2) so the CLI finds a tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    tok.save(os.path.join(os.fspath(dir), "tokenizer.json"))
    with open(os.path.join(os.fspath(dir), "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
