"""Diagnostics for the W4A16 kernel on a GPU: registers, spills, shared memory and layout conversions of the
compiled kernel per config, and a bandwidth probe that only streams the packed weights (the floor for M=1).

python benchmarks/probe_w4a16.py OUT_DIR
"""
import re
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from fourbit.formats.uint4 import quantize_groups
from fourbit.kernels import w4a16_gemm as mod
from fourbit.nn.linear import SCALE_DTYPE, W4A16Linear


@triton.jit
def _stream(qw_ptr, out_ptr, total, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(qw_ptr + offs, mask=offs < total, other=0)
    tl.atomic_add(out_ptr, tl.sum((w & 0xF).to(tl.int32), 0))  # keep the load alive


def main(out_dir):
    out = Path(out_dir)
    n, k = 12288, 4096
    codes, scales, zeros = quantize_groups(torch.randn(n, k, device="cuda"), 128, False, SCALE_DTYPE)
    layer = W4A16Linear.from_codes(codes, scales, zeros, 128, k)
    for m, cfg in ((1, (16, 64, 1, 8, 4, 2)), (16, (16, 128, 1, 4, 4, 3)), (256, (128, 128, 1, 1, 8, 3))):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        bm, bn, t, split, warps, stages = cfg
        y = torch.zeros(m, n, device="cuda")
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
        compiled = mod._w4a16_kernel[grid](x, layer.qweight, layer.scales, layer.zeros, layer.scales, y, m, n, k,
                                           layer.qweight.shape[1], 128, triton.cdiv(k // 128, split), SYM=False,
                                           HAS_BIAS=False, ATOMIC=True, BLOCK_M=bm, BLOCK_N=bn, T=t,
                                           num_warps=warps, num_stages=stages)
        ttgir = compiled.asm["ttgir"]
        (out / f"m{m}.ttgir").write_text(ttgir)
        counts = {op: len(re.findall(op, ttgir)) for op in ("convert_layout", "local_alloc", "local_load",
                                                              "tt.dot", "tt.reshape", "tt.trans")}
        print(f"M={m} cfg={cfg} regs={compiled.n_regs} spills={compiled.n_spills} "
              f"shared={compiled.metadata.shared} {counts}", flush=True)
    total = layer.qweight.numel()
    acc = torch.zeros(1, dtype=torch.int32, device="cuda")
    copies = [layer.qweight.clone() for _ in range(6)]
    i = [0]

    def run():
        i[0] = (i[0] + 1) % len(copies)
        _stream[(triton.cdiv(total, 4096),)](copies[i[0]], acc, total, BLOCK=4096)
    ms = do_bench(run, return_mode="median")
    print(f"stream packed weights: {total * 4 / 1e6:.1f} MB in {ms * 1e3:.1f} us = {total * 4 / ms / 1e9:.2f} TB/s")


if __name__ == "__main__":
    main(sys.argv[1])
