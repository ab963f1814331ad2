"""Group-wise uint4 quantization of a weight W (N, K) = (out_features, in_features).

Each row is cut into G groups of `group_size` consecutive input channels; each group gets a float32 scale s
and, when asymmetric, a uint4 zero z; each weight gets a uint4 code q in 0..15 with W ≈ (q - z) * s.

    asymmetric: lo = min(min(g), 0), hi = max(max(g), 0), s = (hi - lo) / 15, z = round(-lo / s)
    symmetric:  s = max|g| / 7, z = 8 (implicit, not stored)
    both:       q = clamp(round(w / s) + z, 0, 15)

The asymmetric range is widened to include 0 so that z always fits in 0..15: then nothing is clipped and
|W - (q - z) * s| <= s / 2 in both modes, and zero weights come back as exactly zero. (With the group's bare
min/max, a group of all-positive weights would need z < 0, and clamping it would clip the whole group.)
A group whose scale would be 0 (all zeros) gets s = 1 (the smallest normal value when scales are stored in
fp16), so codes are finite and dequantize to exact zeros.

group_size = -1 means one group per row (G = 1). When K is not a multiple of group_size it is padded to
Kp = G * group_size by repeating each row's last real column, so the last group's range is that of its real
values only. The padding is not recorded: callers keep the true K and slice it off (see dequantize_groups).
"""
from __future__ import annotations

import torch

from ..config import SUPPORTED_GROUP_SIZES
from ..errors import FourbitError

def group_length(k: int, group_size: int) -> int:
    """The number of input channels per group for a row of k channels (k itself for group_size -1)."""
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise FourbitError(f"group size {group_size} is not supported: use one of 32, 64, 128 or -1 (per-channel)")
    if group_size == -1:
        return k
    if group_size > k:
        raise FourbitError(f"group size {group_size} does not apply to in_features={k}: "
                           f"use a group size <= {k} or -1 (per-channel)")
    return group_size


def pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """Zero-pad x along dim up to the next multiple of `multiple` (x itself when already a multiple)."""
    extra = -x.shape[dim] % multiple
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim)


def quantize_groups(w: torch.Tensor, group_size: int, sym: bool, scale_dtype: torch.dtype = torch.float32):
    """W (N, K) -> codes uint8 (N, Kp), scales (N, G) in scale_dtype, zeros uint8 (N, G) or None when sym.

    Scales are rounded to scale_dtype (e.g. fp16 for storage) before the codes are chosen, so the codes are
    the nearest ones for the scales actually stored.
    """
    if w.dim() != 2:
        raise FourbitError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(w.shape)}")
    n, k = w.shape
    gs = group_length(k, group_size)
    w = w.float()  # fp16/bf16 inputs: round(w / s) must not be computed in half precision
    if not torch.isfinite(w).all():
        raise FourbitError("weight contains NaN or inf: check the checkpoint before quantizing it")
    kp = -(-k // gs) * gs
    if kp > k:  # repeat the last real column so padding cannot widen the last group's range
        w = torch.cat([w, w[:, -1:].expand(n, kp - k)], dim=1)
    g = w.reshape(n, kp // gs, gs)  # (N, G, gs)
    s, z = group_params(g, sym, scale_dtype)  # (N, G) each, float32
    q = quantize_with(g, s[..., None], z[..., None])  # (N, G, gs)
    zeros = None if sym else z.to(torch.uint8)
    return q.to(torch.uint8).reshape(n, kp), s.to(scale_dtype), zeros


def group_params(g: torch.Tensor, sym: bool, scale_dtype: torch.dtype = torch.float32):
    """The scale and zero of each group: g (..., gs) float32 -> s, z (...) float32 (s already rounded to
    scale_dtype, z = 8 when sym). The one place the convention in the module docstring is computed; GPTQ and
    AWQ call it directly for groups they build themselves.
    """
    if sym:
        s = g.abs().amax(-1) / 7  # (...)
    else:
        lo = g.amin(-1).clamp(max=0)  # (...)
        s = (g.amax(-1).clamp(min=0) - lo) / 15
    if torch.finfo(scale_dtype).bits < 32:
        # Round the scale up, never to nearest, and keep it out of the subnormal range: a scale rounded down
        # would push the group's extremes past code 15 and clip them.
        fi = torch.finfo(scale_dtype)
        s = (s * (1 + fi.eps)).clamp(min=fi.tiny)
    s = s.to(scale_dtype).float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # all-zero group: any s works, 1 keeps codes finite
    if sym:
        z = torch.full_like(s, 8.0)
    else:
        z = torch.round(-lo / s).clamp(0, 15)  # in 0..15 already up to float rounding
    return s, z


def quantize_with(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Codes clamp(round(w / s) + z, 0, 15) as float (broadcasting s and z against w)."""
    return (torch.round(w / s) + z).clamp(0, 15)


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                      k: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q - z) * s in float32 (scales as given, e.g. fp16 upcast exactly), padding sliced to k -> (N, k)."""
    n, kp = codes.shape
    gs = kp if group_size == -1 else group_size
    if kp % gs or tuple(scales.shape) != (n, kp // gs):
        raise FourbitError(f"codes {tuple(codes.shape)} and scales {tuple(scales.shape)} do not match group "
                           f"size {group_size}: pass the group size the weight was quantized with")
    q = codes.float().reshape(n, kp // gs, gs)  # (N, G, gs)
    z = 8.0 if zeros is None else zeros.float()[..., None]  # (N, G, 1)
    w = (q - z) * scales.float()[..., None]
    return w.reshape(n, kp)[:, :k].to(dtype)


def pack_nibbles(vals: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """(..., 8) uint4 values -> (...) int32 words; nibble i (bits 4i..4i+3) holds vals[..., order[i]]."""
    if vals.numel() and int(vals.max()) > 15:
        raise FourbitError("codes must be uint4 values 0..15: quantize the weight before packing it")
    # in int32 (the shift into bit 31 wraps: nibble 7 >= 8 makes a negative word, the bits a kernel reads as
    # uint32), one nibble at a time: no (..., 8) temporary of wider integers
    words = torch.zeros(vals.shape[:-1], dtype=torch.int32, device=vals.device)
    for i, src in enumerate(order):
        words |= vals[..., src].to(torch.int32) << (4 * i)
    return words


def unpack_nibbles(words: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """Inverse of pack_nibbles: (...) int32 words -> (..., 8) uint8 values."""
    # arange, not torch.tensor(list): no host-to-device copy, so this also runs inside CUDA-graph capture
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=words.dtype)
    nib = (words[..., None] >> shifts) & 0xF  # (..., 8) int32, nib[..., i] = nibble i (the mask drops sign fill)
    inverse = sorted(range(8), key=lambda i: order[i])  # inverse[e] = the i with order[i] = e
    # stacked slices, not nib[..., list]: list indexing copies the list to the device, which CUDA graphs forbid
    return torch.stack([nib[..., i] for i in inverse], dim=-1).to(torch.uint8)
