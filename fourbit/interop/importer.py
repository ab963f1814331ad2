"""Load an AutoAWQ "GEMM" or GPTQ v1 Hugging Face directory as a W4A16 model, repacked into the quick layout.

Detected from config.json's quantization_config (or the older quantize_config.json / quant_config.json):

    quant_method "awq":  bits (w_bit) 4, group_size (q_group_size), version "gemm"        -> formats/awq.py
    quant_method "gptq": bits 4, group_size, checkpoint_format "gptq" (v1), any desc_act / sym -> formats/gptq.py

Every layer with a `<name>.qweight` is unpacked to codes, fp16 scales and zeros in our (N, K) orientation and
repacked (nn/linear.py), so its dequantized weight (q - z) * s is bit-equal to the source's. Layers stored as
`<name>.weight` (lm_head, modules_to_not_convert, GPTQModel's dynamic skips) stay float; a quantized lm_head is
dequantized to float (fourbit keeps the classifier in float).

Groups. The kernel reads one scale per run of 32, 64 or 128 input channels (or one per row). A source group of any
multiple of those (256, 512, ...) is the same scale repeated over several runs, so it is split exactly; act-order
(GPTQ desc_act: g_idx not monotone) is undone by the input permutation perm = argsort(g_idx) that W4A16Linear
carries. The group size chosen is the largest of 128, 64, 32 that splits every layer's (sorted) groups, or -1 when
every layer has a single group.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import W4A16Config
from ..errors import FourbitError
from ..formats.awq import unpack_awq
from ..formats.gptq import default_g_idx, unpack_gptq
from ..formats.quick import pack_quick
from ..models.llama import LlamaModel
from ..models.loader import build, from_hf_names, hf_config, hf_quantization_config, read_safetensors, to_hf_name
from ..nn.linear import linear_factory

SUPPORTED = ("4-bit AutoAWQ checkpoints (quant_method 'awq', version 'gemm') and 4-bit GPTQ v1 checkpoints "
             "(quant_method 'gptq', checkpoint_format 'gptq'), with group size -1 or a multiple of 32")
GPTQ_FORMATS = ("gptq", "gptq_v2", "marlin", "bitblas", "ipex", "qqq")  # values GPTQ tools write


@dataclass(frozen=True)
class QuantSpec:
    """What a checkpoint's quantization_config says, once validated."""
    method: str  # "awq" | "gptq"
    group_size: int  # as declared; -1 = one group per output channel


@dataclass
class Unpacked:
    """One quantized layer in our orientation: W[n, k] = (codes[n, k] - zeros[n, g]) * scales[n, g], g = g_idx[k]."""
    codes: torch.Tensor  # uint8 (N, K)
    scales: torch.Tensor  # fp16 (N, G)
    zeros: torch.Tensor  # uint8 (N, G); GPTQ v1 zeros lie in 1..16
    g_idx: torch.Tensor  # int64 (K,)


def parse_quantization_config(qc: dict) -> QuantSpec:
    """Validate a quantization_config; raise a FourbitError naming what is supported otherwise."""
    method = str(qc.get("quant_method", "")).lower()
    if method not in ("awq", "gptq"):
        raise FourbitError(f"quantization method {qc.get('quant_method')!r} is not supported: "
                           f"fourbit imports {SUPPORTED}")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise FourbitError(f"{bits}-bit {method.upper()} checkpoints are not supported: fourbit imports {SUPPORTED}")
    gs = qc.get("group_size", qc.get("q_group_size"))
    if not isinstance(gs, int) or isinstance(gs, bool) or not (gs == -1 or (gs > 0 and gs % 32 == 0)):
        raise FourbitError(f"group size {gs!r} is not supported: fourbit's kernel reads groups of 32, 64 or 128 input "
                           f"channels or one per row (-1); a checkpoint group of any multiple of 32 (256, ...) is "
                           f"split exactly into those")
    if method == "awq":
        version = str(qc.get("version") or qc.get("checkpoint_format") or "gemm").lower()
        if version != "gemm":
            raise FourbitError(f"AutoAWQ version {version!r} is not supported: fourbit imports version 'gemm' "
                               f"(quantize or save the model with AutoAWQ's GEMM version)")
    else:
        fmt = qc.get("checkpoint_format")
        if fmt is None and str(qc.get("format", "")).lower() in GPTQ_FORMATS:
            fmt = qc["format"]  # older GPTQModel releases
        fmt = "marlin" if qc.get("is_marlin_format") else str(fmt or "gptq").lower()
        if fmt != "gptq":
            raise FourbitError(f"GPTQ checkpoint_format {fmt!r} is not supported: fourbit imports checkpoint_format "
                               f"'gptq' (v1, as AutoGPTQ writes it and vLLM/transformers read it)")
        if str(qc.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
            raise FourbitError(f"GPTQ pack_dtype {qc['pack_dtype']!r} is not supported: fourbit reads int32 packing")
        for pattern, override in (qc.get("dynamic") or {}).items():
            if isinstance(override, dict) and override.get("bits", 4) != 4:
                raise FourbitError(f"GPTQ dynamic override {pattern!r} asks for {override['bits']}-bit layers: fourbit "
                                   f"imports 4-bit weights only")
    return QuantSpec(method, gs)


def unpack_layer(spec: QuantSpec, tensors: dict, name: str) -> Unpacked:
    """Pop `name`.qweight/.qzeros/.scales(/.g_idx) (HF names) from tensors and unpack them."""
    missing = [f"{name}.{t}" for t in ("qweight", "qzeros", "scales") if f"{name}.{t}" not in tensors]
    if missing:
        raise FourbitError(f"{spec.method.upper()} checkpoint is missing {missing[0]}: the file is incomplete")
    qweight, qzeros, scales = (tensors.pop(f"{name}.{t}") for t in ("qweight", "qzeros", "scales"))
    g_idx = tensors.pop(f"{name}.g_idx", None)
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise FourbitError(f"{name}.qweight/.qzeros are {qweight.dtype}/{qzeros.dtype}, not int32: fourbit reads int32 "
                           f"packing")
    if spec.method == "awq":
        codes, s, z = unpack_awq(qweight, qzeros, scales)  # (N, K), (N, G), (N, G)
        k, groups = codes.shape[1], s.shape[1]
        gs = spec.group_size
        if groups != (1 if gs == -1 else k // gs) or (gs != -1 and k % gs):
            raise FourbitError(f"{name}: {groups} scale groups for in_features={k} do not match the checkpoint's "
                               f"group_size {spec.group_size}: the config and the weights disagree")
        return Unpacked(codes, s, z, default_g_idx(k, k // groups).long())
    codes, s, z, g = unpack_gptq(qweight, qzeros, scales, g_idx, spec.group_size)
    return Unpacked(codes, s, z, g)


def _fits(sorted_g: torch.Tensor, t: int) -> bool:
    """Does every run of t consecutive channels (of the sorted g_idx) lie in one source group?"""
    k = sorted_g.numel()
    return t <= k and torch.equal(sorted_g[::t].repeat_interleave(t)[:k], sorted_g)


def target_group_size(sorted_gs: dict[str, torch.Tensor]) -> int:
    """The largest kernel group size (128, 64, 32) that splits every layer's sorted groups; -1 if all are single."""
    if all(int(g[0]) == int(g[-1]) for g in sorted_gs.values()):
        return -1
    for t in (128, 64, 32):
        if all(_fits(g, t) for g in sorted_gs.values()):
            return t
    bad = next(n for n, g in sorted_gs.items() if not _fits(g, 32))
    sizes = torch.unique_consecutive(sorted_gs[bad], return_counts=True)[1]
    raise FourbitError(f"{bad}: its g_idx groups hold {sorted(set(sizes.tolist()))} input channels, which do not split "
                       f"into runs of 32, 64 or 128 (what fourbit's kernel reads): supported are groups of -1 or a "
                       f"multiple of 32 channels")


def dequantize_unpacked(u: Unpacked) -> torch.Tensor:
    """(q - z) * s in fp16, as the source's kernels compute it -> (N, K); for a quantized lm_head."""
    return (u.codes.long() - u.zeros.long()[:, u.g_idx]).half() * u.scales[:, u.g_idx]


def repack_codes(u: Unpacked) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes in the quick layout with each group's channels contiguous -> (qweight, perm (K,) int64).

    Stored column j is input channel perm[j]; perm = argsort(g_idx) (stable: the identity without act-order).
    """
    perm = torch.sort(u.g_idx, stable=True).indices
    return pack_quick(u.codes[:, perm]), perm


def group_buffers(u: Unpacked, perm: torch.Tensor, t: int, sym: bool) -> dict[str, torch.Tensor]:
    """scales (and zeros) for kernel group size t: target group j takes its source group's values."""
    sorted_g = u.g_idx[perm]
    source = sorted_g[::sorted_g.numel() if t == -1 else t]  # (Gt,)
    out = {"scales": u.scales[:, source].t().contiguous()}  # (Gt, N)
    if not sym:
        out["zeros"] = u.zeros[:, source].t().contiguous()  # (Gt, N)
    return out


def load_quantized_hf(folder: Path, dtype=None, device="cpu") -> LlamaModel:
    """An AutoAWQ GEMM or GPTQ v1 directory (config.json + safetensors, sharded or not) -> W4A16 LlamaModel."""
    folder = Path(folder)
    d = json.loads((folder / "config.json").read_text())
    spec = parse_quantization_config(hf_quantization_config(folder, d))
    config = hf_config(d)
    tensors = read_safetensors(folder)
    names = sorted(n.removesuffix(".qweight") for n in tensors if n.endswith(".qweight"))
    if not any(n.startswith("model.") for n in names):
        raise FourbitError(f"{folder}: its config says {spec.method.upper()} but no decoder layer has a .qweight "
                           f"tensor: the weights are not quantized, or not in the AutoAWQ/GPTQ layout")
    # Codes are repacked layer by layer (memory holds one layer's unpacked codes); scales and zeros wait for the
    # group size, which depends on every layer.
    layers = {}  # name -> (Unpacked without its codes, perm)
    for name in tqdm(names, desc=f"repacking {spec.method.upper()}", unit="layer", disable=len(names) < 64):
        u = unpack_layer(spec, tensors, name)
        if name == "lm_head":  # GPTQModel lm_head=True: fourbit keeps the classifier in float
            tensors["lm_head.weight"] = dequantize_unpacked(u)
            continue
        tensors[f"{name}.qweight"], perm = repack_codes(u)
        u.codes = None
        layers[name] = (u, perm)
    t = target_group_size({n: u.g_idx[perm] for n, (u, perm) in layers.items()})
    sym = all(bool((u.zeros == 8).all()) for u, _ in layers.values())
    permuted = any(not torch.equal(perm, torch.arange(perm.numel())) for _, perm in layers.values())
    for name, (u, perm) in layers.items():
        for buf, x in group_buffers(u, perm, t, sym).items():
            tensors[f"{name}.{buf}"] = x
        if permuted:
            tensors[f"{name}.perm"] = perm.to(torch.int32)
    tensors = from_hf_names(tensors, config)
    quant = W4A16Config(group_size=t, sym=sym, algo=spec.method, permuted=permuted)
    float_linears = {n.removesuffix(".weight") for n in tensors if n.endswith("_proj.weight")}
    if dtype is None:
        dtype = getattr(torch, d.get("torch_dtype") or "float16")
    model = build(config, tensors, dtype, device, linear_factory(quant), source_name=to_hf_name,
                  float_linears=float_linears)
    model.quant_config = quant
    return model
