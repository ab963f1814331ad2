"""Fused projections, for inference only: a Llama block's q/k/v become one `self_attn.qkv_proj` and gate/up one
`mlp.gate_up_proj`: two GEMMs (launches, input reads) where there were five, per layer.

The fused layer's weight is its parts' rows stacked, so its output is theirs side by side, and the model splits it
with views (models/llama.py). A fusion the module marks as gated (GATED: its output only feeds silu(first part) ·
second part, SwiGLU's activation) becomes, for W4A16 parts, a W4A16GatedLinear, whose GEMM returns that product:
no gate / up output is stored and no separate kernel reads it back.

The quantizers, checkpoints and the exporter (fourbit/interop) know only the separate names: fuse after loading
and quantizing, as the serving engine does, never before saving or quantizing.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import FourbitError
from ..formats.quick import N_TILE
from .linear import W4A16Linear


class W4A16GatedLinear(W4A16Linear):
    """gate and up projections as one W4A16 layer returning silu(gate) · up (..., out_features / 2), made in the
    GEMM's epilogue. Its rows alternate in blocks of 8: in each 16-row tile of the quick layout the first 8 rows
    are gate channels 8b .. 8b + 7 and the next 8 their up channels, rows that one thread of the mma and wgmma
    accumulators holds together (kernels/w4a16_gemm.py: _glu)."""
    gated = True

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gated: returns silu(gate) · up, {self.out_features // 2} features"


@torch.inference_mode(False)  # new weights are normal tensors even when fused under inference_mode: usable anywhere
def fuse_projections_(model: nn.Module) -> nn.Module:
    """In place: in every module that declares fusable projections (a class attribute FUSED = {fused name: part
    names}, as models/llama.Attention and MLP do), replace the parts by one layer of their rows stacked. Parts that
    cannot be stacked exactly (types, dtypes, devices, group sizes or bias presence differ; different input
    permutations; a W4A16 part other than the last whose rows do not fill its 16-row tiles; any other layer
    type) stay separate. Gated fusions (a class attribute GATED, a set of fused names) of two W4A16 parts with one
    size, a multiple of 8, become a W4A16GatedLinear.
    The separate layers are dropped (no doubled memory); fusing again changes nothing. Returns the model."""
    for module in list(model.modules()):
        for fused_name, names in getattr(type(module), "FUSED", {}).items():
            parts = [module._modules.get(n) for n in names]
            gated = fused_name in getattr(type(module), "GATED", ())
            fused = _stack(parts, gated) if all(p is not None for p in parts) else None
            if fused is not None:
                for n in names:
                    delattr(module, n)
                module.add_module(fused_name, fused)
    return model


def check_unfused(model: nn.Module, action: str) -> None:
    """FourbitError if fuse_projections_ changed the model: `action` (saving, exporting, quantizing) needs the
    separate projections that checkpoints and quantizers name."""
    if any(f in m._modules for m in model.modules() for f in getattr(type(m), "FUSED", {})):
        raise FourbitError(f"{action} needs the separate q/k/v and gate/up projections, but this model's were fused "
                           f"for serving (fourbit.LLM fuses the model it is given, in place): {action} before "
                           f"building an LLM, or load the model again")


def _stack(parts: list[nn.Module], gated: bool) -> nn.Module | None:
    """One layer computing all parts' outputs side by side (gated and W4A16: W4A16GatedLinear where it can), or
    None where that would not be exact."""
    kind = type(parts[0])
    if any(type(p) is not kind for p in parts):
        return None
    if kind is nn.Linear:
        return _stack_linear(parts)
    if kind is W4A16Linear:
        return (gated and _gate_w4a16(parts)) or _stack_w4a16(parts)
    return None  # another (e.g. quantized) Linear: left as it is


def _alike(parts, tensor) -> bool:
    """tensor(p) has one dtype and device across the parts (None for all or none of them)."""
    ts = [tensor(p) for p in parts]
    if any(t is None for t in ts):
        return all(t is None for t in ts)
    return all(t.dtype == ts[0].dtype and t.device == ts[0].device for t in ts)


def _cat_bias(parts) -> nn.Parameter | None:
    if parts[0].bias is None:
        return None
    return nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=parts[0].bias.requires_grad)


def _stack_linear(parts: list[nn.Linear]) -> nn.Linear | None:
    k = parts[0].in_features
    if any(p.in_features != k for p in parts) or not _alike(parts, lambda p: p.weight) or not _alike(
            parts, lambda p: p.bias):
        return None
    fused = nn.Linear(k, sum(p.out_features for p in parts), bias=parts[0].bias is not None, device="meta")
    fused.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]),
                                requires_grad=parts[0].weight.requires_grad)
    fused.bias = _cat_bias(parts)
    return fused


def _same_perm(parts: list[W4A16Linear]) -> bool:
    """All parts gather their input alike: none permuted, or one permutation (act-order checkpoints quantize
    q/k/v, and gate/up, from one input's statistics, so theirs normally agree)."""
    a = parts[0].perm
    return all(p.perm is None for p in parts) if a is None else all(
        p.perm is not None and torch.equal(p.perm, a) for p in parts)


def _compatible_w4a16(parts: list[W4A16Linear]) -> bool:
    """One input size, group size, symmetry, input permutation, and tensors of one dtype and device."""
    a = parts[0]
    return (all(p.in_features == a.in_features and p.group_size == a.group_size and p.sym == a.sym for p in parts)
            and _same_perm(parts)
            and all(_alike(parts, lambda p, b=b: getattr(p, b)) for b in ("qweight", "scales", "zeros", "bias")))


def _stack_w4a16(parts: list[W4A16Linear]) -> W4A16Linear | None:
    """qweight rows are tiles of 16 output channels (formats/quick.py), so stacking them is exact when every part
    but the last fills its tiles; scales and zeros (G, N) stack along N; a shared input permutation carries over."""
    a = parts[0]
    if not _compatible_w4a16(parts) or any(p.out_features % N_TILE for p in parts[:-1]):
        return None
    with torch.device("meta"):
        fused = W4A16Linear(a.in_features, sum(p.out_features for p in parts), a.bias is not None, a.group_size,
                            a.sym)
    fused.perm = a.perm
    fused.qweight = torch.cat([p.qweight for p in parts])
    fused.scales = torch.cat([p.scales for p in parts], dim=1)
    fused.zeros = None if a.sym else torch.cat([p.zeros for p in parts], dim=1)
    fused.bias = _cat_bias(parts)
    return fused


def _gate_w4a16(parts: list[W4A16Linear]) -> W4A16GatedLinear | None:
    """gate and up as a W4A16GatedLinear: their codes, scales, zeros and bias in alternate blocks of 8 channels."""
    if len(parts) != 2 or not _compatible_w4a16(parts):
        return None
    gate, up = parts
    n, k = gate.out_features, gate.in_features
    if up.out_features != n or n % 8:
        return None
    with torch.device("meta"):
        fused = W4A16GatedLinear(k, 2 * n, gate.bias is not None, gate.group_size, gate.sym)
    fused.perm = gate.perm
    fused.qweight = _gate_words(gate.qweight, up.qweight, n)
    fused.scales = _alternate8(gate.scales, up.scales, 1)
    fused.zeros = None if gate.sym else _alternate8(gate.zeros, up.zeros, 1)
    if gate.bias is not None:
        fused.bias = nn.Parameter(_alternate8(gate.bias.detach(), up.bias.detach(), 0),
                                  requires_grad=gate.bias.requires_grad)
    return fused


def _gate_words(gate: torch.Tensor, up: torch.Tensor, n: int) -> torch.Tensor:
    """The quick-layout words of gate's and up's n rows each, alternating in 8-row blocks, regrouped without
    unpacking: a word holds codes of one 8-row half of its tile, the half rh = word index % 2 (formats/quick.py),
    so gated tile b takes the rh = b % 2 words of gate's and of up's tile b // 2, in that order."""
    nb, width = gate.shape
    halves = torch.stack((gate.view(nb, width // 2, 2), up.view(nb, width // 2, 2)), -1)  # (tile, word, rh, part)
    return halves.permute(0, 2, 1, 3).reshape(2 * nb, width)[:n // 8].contiguous()


def _alternate8(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """a and b (one shape) merged along dim: a's first 8 entries, b's first 8, a's next 8, and so on."""
    blocks = a.shape[:dim] + (a.shape[dim] // 8, 1, 8) + a.shape[dim + 1:]
    merged = torch.cat((a.reshape(blocks), b.reshape(blocks)), dim + 1)
    return merged.reshape(a.shape[:dim] + (2 * a.shape[dim],) + a.shape[dim + 1:])
