"""Offline sm_90 compile of the W4A16 mma kernel (no GPU needed: Triton ships ptxas and cuobjdump).

Per config: registers, stack, shared memory, and the SASS instruction mix of the kernel; with an OUT_DIR, the
TTGIR, PTX and SASS of each config are written there. python benchmarks/probe_w4a16.py [OUT_DIR]
"""
import sys
from collections import Counter
from pathlib import Path

from fourbit.kernels.sass import compile_sm90
from fourbit.kernels.w4a16_gemm import _w4a16_mma_kernel, _w4a16_wgmma_kernel

CONFIGS = [  # (BLOCK_M, R, warps, post_scale, x_smem, group size, sym)
    (8, 1, 4, True, False, 128, False), (8, 2, 4, True, False, 128, False), (8, 1, 4, True, False, 32, False),
    (8, 1, 4, True, False, -1, True), (16, 1, 4, True, False, 128, False), (32, 1, 4, True, True, 128, False),
    (64, 1, 4, True, True, 128, False), (128, 1, 4, False, True, 128, False),
]
WGMMA_CONFIGS = [(64, 1, 4, 128, False), (128, 1, 4, 128, False), (128, 1, 4, 32, False), (128, 1, 8, 128, False)]


def main(out_dir=None):
    for bm, r, warps, post, smem, gs, sym in CONFIGS:
        constexprs = dict(GS=gs, SYM=sym, HAS_BIAS=False, ATOMIC=True, POST_SCALE=post, X_SMEM=smem, EVEN_K=True,
                          BLOCK_M=bm, R=r, NUM_WARPS=warps)
        k = compile_sm90(_w4a16_mma_kernel, "bf16", constexprs, warps)
        ops = Counter(op.split(".")[0] for op in k.sass_ops)
        name = f"bm{bm}_r{r}_w{warps}_{'post' if post else 'pre'}_{'smem' if smem else 'direct'}_g{gs}"
        print(f"{name:34s} regs={k.regs:3d} stack={k.stack} shared={k.shared:6d} "
              f"HMMA={ops['HMMA']} LDG={ops['LDG']} STS={ops['STS']} LDS={ops['LDS'] + ops['LDSM']} "
              f"top={ops.most_common(6)}", flush=True)
        if out_dir:
            for ext, text in (("ttgir", k.ttgir), ("ptx", k.ptx), ("sass", k.sass)):
                Path(out_dir, f"{name}.{ext}").write_text(text)


    for bm, r, warps, gs, sym in WGMMA_CONFIGS:
        constexprs = dict(GS=gs, SYM=sym, HAS_BIAS=False, ATOMIC=True, BLOCK_M=bm, R=r, NUM_WARPS=warps)
        k = compile_sm90(_w4a16_wgmma_kernel, "bf16", constexprs, warps)
        ops = Counter(op.split(".")[0] for op in k.sass_ops)
        print(f"wgmma bm{bm}_r{r}_w{warps}_g{gs}: regs={k.regs:3d} stack={k.stack} HGMMA={ops['HGMMA']} "
              f"LDG={ops['LDG']} STS={ops['STS']} top={ops.most_common(6)}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
