"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding error onto
the columns not yet quantized so that the layer's output on the calibration inputs changes as little as possible.

The objective for a Linear with weight W (N, K) and calibration inputs X (n, K) is ‖XWᵀ − XŴᵀ‖², whose Hessian
in each row of W is H = 2XᵀX/n (K, K), the same for every row. Rows are independent given H, so layers that read
the same input (q, k, v; gate, up) are quantized as one stacked weight with one H.

gptq_quantize(W, H) is the per-layer core, reusable by QoQ and QUIK:
  1. dead inputs (H_jj = 0: the channel was always 0) get H_jj = 1 and W[:, j] = 0;
  2. dampening: H += damp · mean(diag H) · I (1%), retried ×10 if Cholesky still fails;
  3. U = upper Cholesky factor of H⁻¹, so that quantizing column j and updating the rest is
        err = (w_j − q_j) / U_jj,   W[:, j:] −= err ⊗ U[j, j:]
     (the OBS update with the inverse Hessian of the remaining columns, all read off one triangular matrix);
  4. columns go in blocks of 128: updates inside the block are immediate, the rest of W gets one matmul per
     block (the "lazy batch" update, which makes it fast on a GPU);
  5. groups: each group's scale/zero are computed (formats/uint4.group_params, the same convention as RTN) on
     the error-updated weights when the loop reaches the group's first column; per-channel (-1): once, up front;
  6. act_order: columns in order of decreasing H_jj (the most sensitive first, while most columns remain to
     absorb their error), with "static groups": every group's scale/zero computed up front from the original
     weights in the original column order, so each stored group is still a contiguous range of input
     channels and the checkpoint needs no permutation (g_idx) and the kernel no gather.

Calibration: for fourbit's LlamaModel, block by block (quantize/calib.py), and inside each block in true
sequential order, q,k,v -> o -> gate,up -> down: each group's Hessian comes from a forward pass run after the
previous groups were quantized, so it sees their errors. Any other torch module: hooks on its Linears while
the calibration calls run through the whole module (gptq_module).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from ..errors import FourbitError
from ..formats.uint4 import group_length, group_params, quantize_groups, quantize_with
from ..nn.linear import SCALE_DTYPE, W4A16Linear
from .calib import BlockInputs, StopForward, replace_module

DAMP = 0.01  # of the mean Hessian diagonal, as in the paper
BLOCK = 128  # columns per lazy-update block; a multiple of every group size
HESSIAN_BUDGET = 2 << 30  # bytes of Hessians gptq_module accumulates per pass over the calibration data

# The order in which a Llama block's Linears are quantized; a tuple shares one input (and one Hessian).
LLAMA_SEQUENCE = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                  ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, group_size: int, sym: bool, act_order: bool = False,
                  block: int = BLOCK, damp: float = DAMP, scale_dtype: torch.dtype = SCALE_DTYPE):
    """GPTQ codes for weight (N, K) given the Hessian H (K, K) = 2XᵀX/n of its calibration inputs X (n, K).

    Returns (codes uint8 (N, Kp), scales (N, G) in scale_dtype, zeros uint8 (N, G) or None when sym): the
    contract of formats/uint4.quantize_groups, so W4A16Linear.from_codes and dequantize_groups take the result
    as they take RTN's (Kp: K padded to whole groups, padding columns repeating the last real code). Computes
    in float32, or float64 when H is float64 (for tests); neither input is modified.
    """
    if weight.dim() != 2:
        raise FourbitError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if tuple(H.shape) != (k, k):
        raise FourbitError(f"Hessian of shape {tuple(H.shape)} does not match a weight with in_features={k}")
    gs = group_length(k, group_size)
    if block % gs and group_size != -1:
        raise FourbitError(f"GPTQ block {block} must be a multiple of the group size {group_size}")
    dtype = torch.float64 if H.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).clone()  # (N, K)
    H = H.detach().to(device=W.device, dtype=dtype).clone()  # (K, K)
    if not torch.isfinite(W).all() or not torch.isfinite(H).all():
        raise FourbitError("weight or Hessian contains NaN or inf: check the checkpoint and calibration data")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static = group_size == -1 or act_order
    G = -(-k // gs)
    if static:  # (N, G) float32 each, from the original column order
        _, s_all, z_all = quantize_groups(W, group_size, sym, scale_dtype)
        S = s_all.float()
        Z = torch.full_like(S, 8.0) if z_all is None else z_all.float()
    else:  # filled in as the loop reaches each group
        S = torch.empty(n, G, dtype=torch.float32, device=W.device)
        Z = torch.empty_like(S)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if act_order:
        W, H = W[:, perm], H[perm][:, perm]
    group_of = (perm if act_order else torch.arange(k, device=W.device)) // gs  # (K,) group of each position
    group_of = group_of.tolist()
    U = _inverse_cholesky(H, damp)  # (K, K) upper triangular
    del H

    Q = torch.empty(n, k, dtype=torch.uint8, device=W.device)  # codes, in the loop's column order
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()  # (N, b): this block, updated immediately
        E1 = torch.empty_like(W1)  # (N, b): scaled errors, for the lazy update of the columns after the block
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = group_of[col]
            if not static and col % gs == 0:  # a group starts: its parameters from the updated weights
                s, z = group_params(W1[:, i:i + gs].float(), sym, scale_dtype)  # (N,) each
                S[:, g], Z[:, g] = s, z
            s, z = S[:, g].to(dtype), Z[:, g].to(dtype)
            w = W1[:, i]  # (N,)
            q = quantize_with(w, s, z)  # (N,) codes as floats
            Q[:, col] = q.to(torch.uint8)
            err = (w - (q - z) * s) / U1[i, i]  # (N,)
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
            E1[:, i] = err
        W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1)
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    kp = G * gs
    codes = torch.cat([Q, Q[:, -1:].expand(n, kp - k)], dim=1) if kp > k else Q  # (N, Kp)
    return codes, S.to(scale_dtype), None if sym else Z.to(torch.uint8)


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp · mean(diag H), raising λ ×10 (up to 3 times) while that is
    not positive definite (nearly collinear inputs with few calibration tokens, or float32 round-off)."""
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(4):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                return U
        damp *= 10
    raise FourbitError("GPTQ: the calibration Hessian is not positive definite even with dampening raised to "
                       "10 x its mean diagonal: use more calibration samples (--nsamples) or longer ones (--seqlen)")


class Hessian:
    """Accumulates H = 2XᵀX/n in float32 (K, K) over the rows of the inputs it is fed, (…, K) each."""

    def __init__(self, k: int, device):
        self.sum = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor):
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (rows, K)
        self.sum.addmm_(x.t(), x)
        self.rows += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.rows == 0:
            raise FourbitError("GPTQ: a layer received no calibration inputs")
        return self.sum * (2 / self.rows)


def quantize_linears(root: nn.Module, names: list[str], H: torch.Tensor, config, report: dict | None,
                     prefix: str = ""):
    """GPTQ the Linears root.<names> (all reading the same input, Hessian H) as one stacked weight; swap each
    for its W4A16Linear. report[prefix + name] gets ‖W − Ŵ‖/‖W‖."""
    linears = [root.get_submodule(n) for n in names]
    W = torch.cat([lin.weight.detach() for lin in linears])  # (ΣN, K)
    codes, scales, zeros = gptq_quantize(W, H, config.group_size, config.sym, config.act_order)
    row = 0
    for name, lin in zip(names, linears):
        rows = slice(row, row + lin.out_features)
        row += lin.out_features
        layer = W4A16Linear.from_codes(codes[rows], scales[rows], None if zeros is None else zeros[rows],
                                       config.group_size, lin.in_features, lin.bias)
        if report is not None:
            w = lin.weight.detach().float()
            report[prefix + name] = float((layer.dequantize() - w).norm() / w.norm().clamp_min(1e-30))
        replace_module(root, name, layer)


def gptq_block(prefix: str, block: nn.Module, inputs: BlockInputs, note: Callable, config,
               selected: Callable[[str], bool], report: dict | None):
    """quantize_blockwise step for a Llama block: true-sequential GPTQ of its selected Linears."""
    for group in LLAMA_SEQUENCE:
        names = [n for n in group if selected(f"{prefix}.{n}")]
        if not names:
            continue
        note("gptq " + ",".join(n.rpartition(".")[2].removesuffix("_proj") for n in names))
        first = block.get_submodule(names[0])
        acc = Hessian(first.in_features, first.weight.device)

        def grab(_module, args):
            acc.add(args[0])
            raise StopForward  # the rest of the block is not needed for this Hessian

        handle = first.register_forward_pre_hook(grab)
        try:
            inputs.run(block)
        finally:
            handle.remove()
        quantize_linears(block, names, acc.value(), config, report, prefix + ".")


@torch.no_grad()
def gptq_module(module: nn.Module, targets: list[str], config, calls: list[tuple[tuple, dict]],
                report: dict | None = None, progress: bool = True, budget: int = HESSIAN_BUDGET):
    """GPTQ for any module: targets are the names of its nn.Linear layers, calls the calibration calls
    module(*args, **kwargs). Layers go in the order the first call runs them, as many per pass over the
    calibration data as have Hessians within `budget` bytes; each pass runs after the previous passes'
    layers were quantized, so later layers see earlier layers' errors."""
    order = []
    handles = [module.get_submodule(n).register_forward_pre_hook(
        lambda _m, _a, name=n: order.append(name) if name not in order else None) for n in targets]
    try:
        module(*calls[0][0], **calls[0][1])
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in targets if n not in order]
    if missing:
        raise FourbitError(f"GPTQ: layers {missing[:4]} never ran on the calibration inputs, so they have no "
                           f"Hessian: exclude them with filter= or use calibration inputs that reach them")
    passes, size = [[]], 0
    for name in order:
        k = module.get_submodule(name).in_features
        if passes[-1] and size + 4 * k * k > budget:
            passes.append([])
            size = 0
        passes[-1].append(name)
        size += 4 * k * k
    with tqdm(total=len(order), desc=f"gptq w4a16 g{config.group_size}", unit="layer", disable=not progress) as bar:
        for names in passes:
            accs = {n: Hessian(module.get_submodule(n).in_features, module.get_submodule(n).weight.device)
                    for n in names}
            handles = [module.get_submodule(n).register_forward_pre_hook(lambda _m, a, acc=accs[n]: acc.add(a[0]))
                       for n in names]
            try:
                for args, kwargs in calls:
                    module(*args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
            for n in names:
                quantize_linears(module, [n], accs.pop(n).value(), config, report)
                bar.update()
