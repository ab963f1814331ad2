"""Sweep the W4A16 kernels' configs on Llama layer shapes; prints the best per (shape, M) and the default.

python benchmarks/tune_w4a16.py [--shapes ...] [--m ...] (GPU). Weights rotate beyond L2 and calls are timed as
CUDA graphs, as in fourbit bench gemm. Also times the mma kernel (at the config it gets off Hopper) with and without
the dequantized tile written to and re-read from shared memory (`round trip`, what QUICK removes).
"""
import itertools

import torch
import triton

from fourbit.bench import SHAPES, _copies, gpu_ms
from fourbit.formats.uint4 import quantize_groups
from fourbit.kernels import w4a16_gemm as mod
from fourbit.nn.linear import SCALE_DTYPE, W4A16Linear


def candidates(m, k_tiles, n, sms):
    """(kind, BLOCK_M, R, warps, split, post_scale, x_smem, stages) configs worth trying at M rows."""
    bms = [b for b in (8, 16, 32, 64, 128, 256) if b >= min(m, 256) and b <= max(8, 2 * m)][:2]
    out = []
    for bm, r, per_sm, stages in itertools.product((8, 16), (1, 2), (2, 4, 6, 8), (2, 3, 4)):
        if m <= bm <= max(8, 2 * m):
            split = max(1, min(per_sm * sms // (triton.cdiv(m, bm) * triton.cdiv(n, 64 * r)), k_tiles))
            out.append(("ring", bm, r, 4, split, True, True, stages))
    for kind, bm, r, warps in itertools.product(("mma", "wgmma"), bms, (1, 2), (4, 8)):
        if kind == "wgmma" and bm * r > 256:
            continue
        if kind == "mma" and (bm > 128 or bm * r > 256):
            continue
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, 16 * r * warps)
        for per_sm in (1, 2, 4, 8, 16):
            split = max(1, min(per_sm * sms // tiles, k_tiles))
            if kind == "wgmma":
                for stages in (2, 3, 4):
                    if stages * bm * 256 <= 200 * 1024:  # X ring in shared memory
                        out.append((kind, bm, r, warps, split, False, True, stages))
                continue
            for post, smem in itertools.product((True, False), (True, False)):
                out.append((kind, bm, r, warps, split, post, smem, 0))
    return sorted(set(out))


def time_cfg(layer, copies, x, n, k, cfg, **extra):
    if extra:  # a variant flag the launcher does not take: call the kernel the way the launcher does
        return gpu_ms(lambda x, q: _launch(x, q, layer, n, k, cfg, extra), copies, x)
    return gpu_ms(lambda x, q: mod.w4a16_gemm(x, q, layer.scales, layer.zeros, 128, n, k, config=cfg), copies, x)


def _launch(x, q, layer, n, k, cfg, extra):
    _, bm, r, warps, split, post, smem, _ = cfg
    kt = q.shape[1] // 256
    per = triton.cdiv(kt, split)
    split = triton.cdiv(kt, per)
    out = x.new_empty((x.shape[0], n))
    grid = (triton.cdiv(n, 16 * r * warps), triton.cdiv(x.shape[0], bm), split)
    ws, count = mod._split_workspace(x.device, x.shape[0] * n, grid[0] * grid[1])
    mod._w4a16_mma_kernel[grid](x, q, layer.scales, layer.zeros, layer.scales, out, x.shape[0], n, k, kt, per, ws,
                                count, GS=128, SYM=False, HAS_BIAS=False, ATOMIC=split > 1, POST_SCALE=post,
                                X_SMEM=smem, EVEN_K=True, BLOCK_M=bm, R=r, NUM_WARPS=warps, num_warps=warps, **extra)
    return out


def main(shapes, ms, budget):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for shape in shapes:
        n, k = SHAPES[shape]
        codes, scales, zeros = quantize_groups(torch.randn(n, k, device="cuda"), 128, False, SCALE_DTYPE)
        layer = W4A16Linear.from_codes(codes, scales, zeros, 128, k)
        copies = _copies(lambda: layer.qweight.clone(), n * k // 2)
        dense = _copies(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), 2 * n * k)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base = gpu_ms(lambda x, d: x @ d.t(), dense, x)
            default = mod._config(m, n, k // 128, sms)
            t_def = time_cfg(layer, copies, x, n, k, default)
            mma = mod._config(m, n, k // 128, sms, hopper=False, aligned=False)  # the mma kernel's config
            t_mma = time_cfg(layer, copies, x, n, k, mma)
            t_rt = time_cfg(layer, copies, x, n, k, mma, ROUND_TRIP=True)
            pool = candidates(m, k // 128, n, sms)
            torch.manual_seed(m)
            pool = [pool[i] for i in torch.randperm(len(pool))[:budget].tolist()]
            best = (t_def, default)
            for cfg in pool:
                try:
                    best = min(best, (time_cfg(layer, copies, x, n, k, cfg), cfg))
                except Exception as e:  # out of registers / shared memory: skip the config
                    print("  skip", cfg, type(e).__name__, flush=True)
            line = (f"{shape:>10} M={m:<5} bf16 {base * 1e3:7.1f}us | default {default} {base / t_def:5.2f}x | "
                    f"mma {base / t_mma:5.2f}x, with the round trip {base / t_rt:5.2f}x | best {best[1]} "
                    f"{base / best[0]:5.2f}x")
            print(line, flush=True)
            rows.append(line)
    print("\n".join(rows))


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["7b.qkv", "7b.o", "7b.down", "70b.down"])
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 256, 1024])
    p.add_argument("--budget", type=int, default=30, help="configs tried per (shape, M), sampled at random")
    a = p.parse_args()
    main(a.shapes, a.m, a.budget)
