"""W4A16Linear: nn.Linear with 4-bit group-quantized weights in the quick layout (formats/quick.py).

Buffers (the checkpoint format "quick" v2):
    qweight  int32 (ceil(N/16), ceil(K/128)*256) uint4 codes, see formats/quick.py
    scales   fp16  (G, N)                        per group of `group_size` input channels (G = 1 per-channel)
    zeros    uint8 (G, N)                        asymmetric only; symmetric codes have an implicit zero of 8
    perm     int32 (K,)                          only when the config says permuted (see below)
W[n, k] = (q - z) * s. Scales stay fp16 (as AutoAWQ's and GPTQ's) so imported checkpoints dequantize bit-exactly.
Zeros are uint4 values, except that GPTQ v1 checkpoints can hold a zero of 16 (formats/gptq.py), which the kernel
and the reference also take (they subtract z as a number).

Input permutation. The kernel reads one scale and zero per run of `group_size` consecutive input channels, but a
GPTQ act-order (desc_act) checkpoint assigns channels to groups by g_idx, scattered over K. Permuting the weight's
columns by perm = argsort(g_idx) makes every group contiguous, and Y = X[:, perm] · W[:, perm]ᵀ = X · Wᵀ, so such a
layer stores the permuted codes and gathers its input columns by `perm` before the GEMM: one extra pass over X
(M x K), small next to the weight at decode batch sizes. The gather cannot be folded into the previous layer:
q/k/v (and gate/up) share one input but each may have its own permutation (nn/fuse.py stacks the parts whose
permutations agree, as they normally do, into one layer with one gather).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..config import W4A16Config
from ..errors import FourbitError
from ..formats.awq import unpack_awq
from ..formats.quick import pack_quick, qweight_shape
from ..formats.uint4 import group_length
from ..kernels.ref import w4a16_dequant_ref

SCALE_DTYPE = torch.float16


class W4A16Linear(nn.Module):
    gated = False  # W4A16GatedLinear (nn/fuse.py): the output is silu(gate) · up of the stored rows' halves

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, sym: bool,
                 permuted: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.sym = group_size, sym
        groups = -(-in_features // group_length(in_features, group_size))
        self.register_buffer("qweight", torch.zeros(qweight_shape(out_features, in_features), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=SCALE_DTYPE))
        self.register_buffer("zeros", None if sym else torch.zeros(groups, out_features, dtype=torch.uint8))
        # column j of the stored weight is input channel perm[j]; int32 like the checkpoints' g_idx
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32) if permuted else None)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_codes(cls, codes, scales, zeros, group_size: int, k: int, bias=None, perm=None) -> "W4A16Linear":
        """codes uint8 (N, Kp >= k), scales (N, G), zeros (N, G) or None, as formats/uint4.py makes them.

        perm (k,), if given: column j of codes/scales/zeros belongs to input channel perm[j] (see the module doc).
        """
        n = codes.shape[0]
        with torch.device(codes.device):
            layer = cls(k, n, bias is not None, group_size, zeros is None, perm is not None)
        if perm is not None:
            if not torch.equal(torch.sort(perm.long()).values, torch.arange(k, device=perm.device)):
                raise FourbitError(f"perm must be a permutation of the {k} input channels")
            layer.perm.copy_(perm)
        layer.qweight.copy_(pack_quick(codes[:, :k]))
        layer.scales.copy_(scales.t())
        if zeros is not None:
            layer.zeros.copy_(zeros.t())
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    @classmethod
    def from_awq(cls, qweight, qzeros, scales, group_size: int, bias=None) -> "W4A16Linear":
        """Exact conversion of AutoAWQ "GEMM" tensors (formats/awq.py): the dequantized weights are bit-equal.

        qweight int32 [K, N/8], qzeros int32 [K/g, N/8], scales fp16 [K/g, N]; group_size g (-1: one group).
        """
        codes, s, z = unpack_awq(qweight, qzeros, scales)  # (N, K), (N, G), (N, G)
        k, groups = codes.shape[1], s.shape[1]
        if (group_size == -1 and groups != 1) or (group_size != -1 and groups * group_size != k):
            raise FourbitError(f"AWQ tensors hold {groups} groups for in_features={k}, which does not match "
                               f"group_size={group_size}: pass the checkpoint's q_group_size")
        return cls.from_codes(codes, s, z, group_size, k, bias)

    def dequantize(self) -> torch.Tensor:
        """The weight these codes stand for, float32 (N, K), columns in input-channel order (perm undone)."""
        w = w4a16_dequant_ref(self.qweight, self.scales, self.zeros, self.group_size, self.out_features,
                              self.in_features)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm.long()] = w
        return out

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)  # (M, K): column j = input channel perm[j]
        y = ops.w4a16_gemm(x2, self.qweight, self.scales, self.zeros, self.group_size, self.out_features,
                           self.in_features, self.bias, self.gated)
        return y.view(*x.shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, sym={self.sym}" + (", permuted" if self.perm is not None else ""))


def linear_factory(config: W4A16Config):
    """The Linear factory LlamaModel takes, building empty W4A16Linear layers (filled from a checkpoint)."""
    return lambda in_features, out_features, bias: W4A16Linear(in_features, out_features, bias,
                                                               config.group_size, config.sym, config.permuted)
