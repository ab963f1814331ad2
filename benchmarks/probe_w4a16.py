"""Diagnostics for the W4A16 tensor-core kernel on a GPU: registers, spills, shared memory and layout
conversions of the compiled kernel per config (TTGIR written to OUT_DIR). For bandwidth and stalls use ncu.

python benchmarks/probe_w4a16.py OUT_DIR
"""
import re
import sys
from pathlib import Path

import torch
import triton

from fourbit.formats.quick import interleave_k
from fourbit.formats.uint4 import quantize_groups
from fourbit.kernels import w4a16_gemm as mod
from fourbit.nn.linear import SCALE_DTYPE, W4A16Linear


def main(out_dir):
    out = Path(out_dir)
    n, k = 12288, 4096
    codes, scales, zeros = quantize_groups(torch.randn(n, k, device="cuda"), 128, False, SCALE_DTYPE)
    layer = W4A16Linear.from_codes(codes, scales, zeros, 128, k)
    for m, cfg in ((16, (16, 128, 1, 4, 4, 3)), (256, (128, 128, 1, 1, 8, 3))):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        bm, bn, t, split, warps, stages = cfg
        y = torch.zeros(m, n, device="cuda")
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
        compiled = mod._w4a16_kernel[grid](interleave_k(x), layer.qweight, layer.scales, layer.zeros, layer.scales,
                                           y, m, n, k, layer.qweight.shape[1], 128, triton.cdiv(k // 128, split), SYM=False,
                                           HAS_BIAS=False, ATOMIC=True, BLOCK_M=bm, BLOCK_N=bn, T=t,
                                           num_warps=warps, num_stages=stages)
        ttgir = compiled.asm["ttgir"]
        (out / f"m{m}.ttgir").write_text(ttgir)
        counts = {op: len(re.findall(op, ttgir)) for op in ("convert_layout", "local_alloc", "local_load",
                                                              "tt.dot", "tt.reshape", "tt.trans")}
        print(f"M={m} cfg={cfg} regs={compiled.n_regs} spills={compiled.n_spills} "
              f"shared={compiled.metadata.shared} {counts}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
