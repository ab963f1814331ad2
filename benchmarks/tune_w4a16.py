"""Sweep the Triton W4A16 kernel's configs on a few shapes and batch sizes; prints the best per (shape, M).

python benchmarks/tune_w4a16.py   (GPU). Weights rotate beyond L2 and calls are timed
as CUDA graphs, as in fourbit bench gemm.
"""
import itertools

import torch

from fourbit.bench import SHAPES, _copies, gpu_ms
from fourbit.formats.uint4 import quantize_groups
from fourbit.kernels.w4a16_gemm import w4a16_gemm
from fourbit.nn.linear import SCALE_DTYPE, W4A16Linear

def candidates(m):
    """Configs worth trying at M rows, in the tuple form kernels/w4a16_gemm._config returns."""
    out = []
    if m == 1:
        out += [("gemv", 1, bn, 1, split, warps, stages) for bn, split, warps, stages in itertools.product(
            (64, 128, 256, 512), (8, 16, 32, 64), (1, 2, 4), (2, 3, 4))]
    bms = (16,) if m <= 16 else tuple(b for b in (64, 128) if b <= 2 * m)
    out += [("mma", bm, bn, t, split, warps, stages) for bm, bn, t, split, warps, stages in itertools.product(
        bms, (32, 64, 128, 256), (1, 2, 4), (1, 2, 4, 8) if m <= 64 else (1,), (4, 8), (2, 3, 4))]
    return out


KIND = None


def main(shapes=("7b.qkv", "7b.down", "70b.down"), ms=(1, 4, 16), budget=40):
    for shape in shapes:
        n, k = SHAPES[shape]
        codes, scales, zeros = quantize_groups(torch.randn(n, k, device="cuda"), 128, False, SCALE_DTYPE)
        layer = W4A16Linear.from_codes(codes, scales, zeros, 128, k)
        copies = _copies(lambda: layer.qweight.clone(), n * k // 2)
        dense = _copies(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), 2 * n * k)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base = gpu_ms(lambda x, d: x @ d.t(), dense, x)
            pool = [c for c in candidates(m) if KIND is None or c[0] == KIND]
            torch.manual_seed(m)
            pool = [pool[i] for i in torch.randperm(len(pool))[:budget].tolist()]
            results = []
            for cfg in pool:
                try:
                    t = gpu_ms(lambda x, q: w4a16_gemm(x, q, layer.scales, layer.zeros, 128, n, k, config=cfg),
                               copies, x)
                except Exception:  # out of shared memory / registers: skip the config
                    continue
                results.append((t, cfg))
            results.sort()
            print(f"{shape:>10} M={m:<5} bf16 {base * 1e3:7.1f}us  best " +
                  "  ".join(f"{cfg} {t * 1e3:6.1f}us ({base / t:.2f}x)" for t, cfg in
                            [next(r for r in results if r[1][0] == kind) for kind in ("gemv", "mma")
                             if any(r[1][0] == kind for r in results)]), flush=True)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["7b.qkv", "7b.down", "70b.down"])
    p.add_argument("--m", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--budget", type=int, default=40, help="configs tried per (shape, M), sampled at random")
    p.add_argument("--kind", choices=("gemv", "mma"), help="only this kernel")
    a = p.parse_args()
    KIND = a.kind
    main(a.shapes, a.m, a.budget)
