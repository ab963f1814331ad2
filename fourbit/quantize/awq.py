"""AWQ (Lin et al., 2023): activation-aware weight quantization, following AutoAWQ's algorithm.

A few input channels carry much larger activations than the rest, and the rounding error of their weights
dominates the output error. AWQ multiplies those weight columns by s_j > 1 before rounding (so they are
rounded relatively more finely) and divides the op that produces the input by s_j, which leaves the float
model unchanged:  norm(x)·diag(1/s) · (W·diag(s))ᵀ = norm(x) · Wᵀ.

Per block of fourbit's LlamaModel (quantize/calib.py drives the blocks), with the block's float inputs:
  1. scale search, for each group of Linears sharing an input and the op the scale folds into:
        input_layernorm          -> q, k, v      judged on the attention output
        v_proj (rows)            -> o            judged on o's output; only when v's out = o's in, i.e.
                                                 n_kv_heads = n_heads (with GQA one v row feeds several
                                                 o columns, and AutoAWQ skips the pair too)
        post_attention_layernorm -> gate, up     judged on the MLP output
        up_proj (rows)           -> down         judged on down's output
     s = x̄^α / w̄^(1−α), normalised by sqrt(max(s)·min(s)), for α in {0, 1/20, …, 19/20} (AutoAWQ's
     "duo scaling"): x̄_j = mean |x_j| over the calibration tokens, w̄_j = mean over the group's output rows
     of |W_ij| / max|W_i,group|. Each candidate is judged by the MSE between the output of the module the
     group feeds (above: AutoAWQ's choice of module, not the whole block) with the float weights and with the
     weights quantized as W' = Q(W·diag(s))·diag(1/s), over all calibration tokens; the best s is folded in.
  2. clipping search (all Linears but q and k, whose errors pass through the softmax): per output row and
     group, the range max|w| shrunk by (1 − i/20), i = 0..9, choosing the one that minimises the MSE of the
     group's partial output Σ_j x_j w_j over 512 calibration tokens spread evenly over the batch; the weights
     are clamped to ±that range.
  3. RTN (formats/uint4.quantize_groups) of the scaled, clipped weights: the same codes format as RTN.
One departure from AutoAWQ: the scale search also tries s = 1 (with duo scaling no α gives the identity), so
like the clipping search (i = 0 is no clipping) it never does worse than plain RTN on what it measures.
Candidates are judged with the weights quantized exactly as they will be stored (fp16 scales).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import FourbitError
from ..formats.uint4 import dequantize_groups, group_length, group_params, quantize_groups, quantize_with
from ..nn.linear import SCALE_DTYPE
from .calib import BlockInputs, replace_module
from .rtn import rtn_linear

N_GRID = 20  # scale ratios α = i / N_GRID, i < N_GRID (AutoAWQ)
MAX_SHRINK = 0.5  # clipping tries ranges down to (1 - MAX_SHRINK) of max|w| in steps of 1 / N_GRID
CLIP_TOKENS = 512  # calibration tokens the clipping search looks at (AutoAWQ's n_sample_token)
CLIP_ELEMENTS = 1 << 26  # (groups, tokens, rows) partial outputs held at once by the clipping search
NO_CLIP = ("q_proj", "k_proj")  # their errors go through the softmax: AutoAWQ leaves them unclipped


@dataclass(frozen=True)
class ScaleGroup:
    prev: str  # the op whose output feeds the group: an RMSNorm (weight divided by s) or a Linear (rows / s)
    linears: tuple[str, ...]  # the Linears reading that output (columns multiplied by s)
    inspect: str  # the module whose output judges a candidate scale


def llama_groups(block: nn.Module) -> list[ScaleGroup]:
    """The norm -> linear / linear -> linear map of a LlamaModel Block (models/llama.py)."""
    groups = [ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                         "self_attn")]
    v, o = block.self_attn.v_proj, block.self_attn.o_proj
    if isinstance(v, nn.Linear) and v.out_features == o.in_features:
        groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
    groups.append(ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"))
    if isinstance(block.mlp.up_proj, nn.Linear):
        groups.append(ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"))
    return groups


# Where each Linear's input is captured: Linears sharing an input share its capture.
INPUT_OF = {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.q_proj",
            "self_attn.v_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj",
            "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj", "mlp.down_proj": "mlp.down_proj"}


def fake_quant(w: torch.Tensor, group_size: int, sym: bool) -> torch.Tensor:
    """The float32 weight (N, K) that W4A16 codes of w stand for (RTN, fp16 scales, as stored)."""
    codes, s, z = quantize_groups(w, group_size, sym, SCALE_DTYPE)
    return dequantize_groups(codes, s, z, group_size, w.shape[1])


def _padded_groups(w: torch.Tensor, gs: int) -> torch.Tensor:
    """w (N, K) -> (N, G, gs) float32, K padded by repeating the last column (quantize_groups' convention)."""
    n, k = w.shape
    kp = -(-k // gs) * gs
    w = w.float()
    if kp > k:
        w = torch.cat([w, w[:, -1:].expand(n, kp - k)], dim=1)
    return w.reshape(n, kp // gs, gs)


def _inspect(module: nn.Module, xs: list[torch.Tensor], inputs: BlockInputs, attention: bool):
    """Outputs of module on each mini-batch; attention takes the block's other positional arguments (RoPE, mask,
    layer index), not its keywords (the residual-stream delta is the block's own)."""
    if attention:
        return [module(x, *args) for x, (args, _) in zip(xs, inputs.rest)]
    return [module(x) for x in xs]


def search_scale(block, group: ScaleGroup, selected: list[str], xs: list[torch.Tensor], inputs: BlockInputs,
                 config) -> torch.Tensor:
    """The per-input-channel scale s (K,) float32 for the group (see the module docstring)."""
    linears = [block.get_submodule(n) for n in selected]
    inspect = block.get_submodule(group.inspect)
    attention = group.inspect == "self_attn"
    k = linears[0].in_features
    gs = group_length(k, config.group_size)
    x_mean = torch.zeros(k, dtype=torch.float32, device=xs[0].device)
    rows = 0
    for x in xs:
        x = x.reshape(-1, k)
        x_mean += x.abs().float().sum(0)
        rows += x.shape[0]
    x_mean /= rows
    wg = _padded_groups(torch.cat([lin.weight.detach() for lin in linears]), gs)  # (ΣN, G, gs)
    w_mean = (wg.abs() / (wg.abs().amax(-1, keepdim=True) + 1e-6)).flatten(1)[:, :k].mean(0)  # (K,)
    del wg
    ref = _inspect(inspect, xs, inputs, attention)  # float outputs
    originals = [lin.weight.detach().clone() for lin in linears]
    best, best_s = float("inf"), None
    try:
        for i in range(-1, N_GRID):
            if i < 0:  # the identity first: the search can then only improve on plain RTN
                s = torch.ones_like(x_mean)
            else:
                alpha = i / N_GRID
                s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
                s = s / (s.max() * s.min()).sqrt()
                s = torch.nan_to_num(s, nan=1.0, posinf=1.0)  # an overflow must not poison the weights
            for lin, w0 in zip(linears, originals):
                lin.weight.copy_(fake_quant(w0.float() * s, config.group_size, config.sym) / s)
            out = _inspect(inspect, xs, inputs, attention)
            err = sum(float((a.float() - b.float()).pow(2).sum()) for a, b in zip(out, ref))
            if err < best:
                best, best_s = err, s
    finally:
        for lin, w0 in zip(linears, originals):
            lin.weight.copy_(w0)
    if best_s is None:
        raise FourbitError("AWQ: every scale candidate gave a non-finite error: check the calibration data")
    return best_s


def apply_scale(block, group: ScaleGroup, s: torch.Tensor):
    """Fold s into the group: the previous op's output divided by s, every Linear's columns multiplied by s
    (all of the group's Linears, quantized or not, so the float model is unchanged)."""
    prev = block.get_submodule(group.prev)
    if isinstance(prev, nn.Linear):  # its output rows feed the group's input channels
        prev.weight.div_(s[:, None].to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:  # RMSNorm
        prev.weight.div_(s.to(prev.weight.dtype))
    for name in group.linears:
        lin = block.get_submodule(name)
        lin.weight.mul_(s[None, :].to(lin.weight.dtype))


def search_clip(w: torch.Tensor, x: torch.Tensor, group_size: int, sym: bool) -> torch.Tensor:
    """Per (row, group) clipping range (N, G) float32 for w (N, K), judged on inputs x (t, K)."""
    n, k = w.shape
    gs = group_length(k, group_size)
    wg = _padded_groups(w, gs)  # (N, G, gs)
    G = wg.shape[1]
    xg = torch.cat([x.float(), x.new_zeros(x.shape[0], G * gs - k, dtype=torch.float32)], 1)  # zero padding
    xg = xg.reshape(-1, G, gs).transpose(0, 1)  # (G, t, gs)
    best_max = wg.abs().amax(-1)  # (N, G): i = 0, no clipping
    chunk = max(1, min(n, CLIP_ELEMENTS // (G * xg.shape[1])))
    for r0 in range(0, n, chunk):
        wb = wg[r0:r0 + chunk]  # (b, G, gs)
        ref = torch.bmm(xg, wb.permute(1, 2, 0))  # (G, t, b): each group's partial output
        full = wb.abs().amax(-1)  # (b, G)
        best_err = torch.full_like(full, float("inf"))
        for i in range(int(MAX_SHRINK * N_GRID)):
            m = (full * (1 - i / N_GRID))[..., None]  # (b, G, 1)
            cur = wb.clamp(-m, m)
            s, z = group_params(cur, sym, SCALE_DTYPE)  # (b, G)
            dq = (quantize_with(cur, s[..., None], z[..., None]) - z[..., None]) * s[..., None]
            err = (torch.bmm(xg, dq.permute(1, 2, 0)) - ref).pow(2).mean(1).t()  # (b, G)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max[r0:r0 + chunk] = torch.where(better, m[..., 0], best_max[r0:r0 + chunk])
    return best_max


def _subsample(xs: list[torch.Tensor], count: int) -> torch.Tensor:
    """count rows spread evenly over all the calibration tokens of xs [(b, L, K)] -> (≤ count, K)."""
    flat = [x.reshape(-1, x.shape[-1]) for x in xs]
    total = sum(f.shape[0] for f in flat)
    step = max(1, total // count)
    picked, offset = [], 0
    for f in flat:
        first = (-offset) % step  # the first multiple of step inside this mini-batch
        picked.append(f[first::step])
        offset += f.shape[0]
    return torch.cat(picked)[:count]


def awq_block(prefix: str, block: nn.Module, inputs: BlockInputs, note: Callable, config,
              selected: Callable[[str], bool], report: dict | None):
    """quantize_blockwise step for a Llama block: scale search, clipping search, then RTN of the result."""
    names = [n for n in INPUT_OF if selected(f"{prefix}.{n}")]
    if not names:
        return
    note("awq inputs")
    points = sorted({INPUT_OF[n] for n in names} | {INPUT_OF[g.linears[0]] for g in llama_groups(block)})
    feats = {p: [] for p in points}  # capture point -> [(b, L, K)] float inputs of that Linear
    handles = [block.get_submodule(p).register_forward_pre_hook(lambda _m, a, p=p: feats[p].append(a[0]))
               for p in points]
    try:
        inputs.run(block)
    finally:
        for h in handles:
            h.remove()

    for group in llama_groups(block):
        chosen = [n for n in group.linears if n in names]
        if not chosen:
            continue
        note("awq scale " + ",".join(n.rpartition(".")[2].removesuffix("_proj") for n in chosen))
        xs = feats[INPUT_OF[group.linears[0]]]
        s = search_scale(block, group, chosen, xs, inputs, config)
        apply_scale(block, group, s)
        for x in xs:  # the captured inputs now reach the scaled Linears divided by s
            x.div_(s.to(x.dtype))

    clipped = {}
    for name in names:
        lin = block.get_submodule(name)
        if name.rpartition(".")[2] in NO_CLIP:
            continue
        note("awq clip " + name.rpartition(".")[2].removesuffix("_proj"))
        x = _subsample(feats[INPUT_OF[name]], CLIP_TOKENS)
        m = search_clip(lin.weight.detach(), x, config.group_size, config.sym)  # (N, G)
        gs = group_length(lin.in_features, config.group_size)
        m = m.repeat_interleave(gs, dim=1)[:, :lin.in_features].to(lin.weight.dtype)  # (N, K)
        if report is not None:
            clipped[name] = lin.weight.detach().float().clone()
        lin.weight.copy_(torch.minimum(torch.maximum(lin.weight, -m), m))
    del feats

    note("awq quantize")
    for name in names:
        lin = block.get_submodule(name)
        layer = rtn_linear(lin, config)
        if report is not None:  # against the scaled weight before clipping: the clipping error counts
            w = clipped.get(name, lin.weight.detach().float())
            report[f"{prefix}.{name}"] = float((layer.dequantize() - w).norm() / w.norm().clamp_min(1e-30))
        replace_module(block, name, layer)
