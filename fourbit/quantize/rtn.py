"""RTN: round-to-nearest group quantization, the baseline every other algorithm is measured against."""
from __future__ import annotations

from torch import nn

from ..config import W4A16Config
from ..formats.uint4 import quantize_groups
from ..nn.linear import SCALE_DTYPE, W4A16Linear


def rtn_linear(linear: nn.Linear, config: W4A16Config) -> W4A16Linear:
    w = linear.weight.detach()  # (N, K)
    codes, scales, zeros = quantize_groups(w, config.group_size, config.sym, SCALE_DTYPE)
    return W4A16Linear.from_codes(codes, scales, zeros, config.group_size, w.shape[1], linear.bias)
