"""The Triton W4A16 GEMM against the torch reference: on the GPU when there is one, else in Triton's
interpreter (conftest sets TRITON_INTERPRET=1), where only fp16 is trustworthy (DESIGN §5)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fourbit.formats.uint4 import quantize_groups
from fourbit.kernels.ref import w4a16_gemm_ref
from fourbit.kernels.w4a16_gemm import WGMMA_CTAS_PER_SM, w4a16_gemm
from fourbit.nn.linear import SCALE_DTYPE, W4A16Linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]


def _layer(n, k, group_size, sym, bias, gen):
    w = torch.randn(n, k, generator=gen)
    codes, scales, zeros = quantize_groups(w, group_size, sym, SCALE_DTYPE)
    b = torch.randn(n, generator=gen) if bias else None
    return W4A16Linear.from_codes(codes, scales, zeros, group_size, k, b).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size,sym", [(32, False), (64, True), (128, False), (-1, False), (-1, True)])
@pytest.mark.parametrize("m,n,k", [(1, 40, 172), (7, 72, 300), (16, 24, 128), (33, 130, 1000), (3, 8, 4104)])
def test_kernel_matches_reference(dtype, group_size, sym, m, n, k):
    if group_size > k:
        pytest.skip("group larger than K")
    gen = torch.Generator().manual_seed(hash((group_size, sym, m, n, k)) % 2**31)
    layer = _layer(n, k, group_size, sym, bias=m % 2 == 1, gen=gen)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    y = w4a16_gemm(x, layer.qweight, layer.scales, layer.zeros, group_size, n, k,
                   None if layer.bias is None else layer.bias.to(dtype))
    ref = w4a16_gemm_ref(x.double(), layer.qweight, layer.scales, layer.zeros, group_size, n, k,
                         None if layer.bias is None else layer.bias.double())
    assert y.dtype == dtype and y.shape == (m, n)
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < (2e-3 if dtype == torch.float16 else 1e-2), err


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size,sym,bias", [(32, False, True), (128, True, False), (-1, False, False)])
@pytest.mark.parametrize("m,n,k", [(1, 40, 172), (7, 16, 300), (33, 72, 1000)])
def test_gated_kernel_matches_reference(dtype, group_size, sym, bias, m, n, k):
    """A gated layer's GEMM (nn/fuse.py: gate and up rows alternating in 8-row blocks) -> silu(gate) · up, against
    the two separate layers' references through silu_mul."""
    from fourbit.kernels.ref import silu_mul_ref
    from fourbit.nn.fuse import _gate_w4a16

    gen = torch.Generator().manual_seed(hash(("gated", group_size, sym, m, n, k)) % 2**31)
    parts = [_layer(n, k, group_size, sym, bias, gen) for _ in range(2)]
    gated = _gate_w4a16(parts)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    y = w4a16_gemm(x, gated.qweight, gated.scales, gated.zeros, group_size, 2 * n, k,
                   None if gated.bias is None else gated.bias.to(dtype), glu=True)
    gate, up = (w4a16_gemm_ref(x.double(), p.qweight, p.scales, p.zeros, group_size, n, k,
                               None if p.bias is None else p.bias.double()) for p in parts)
    ref = silu_mul_ref(gate, up)
    assert y.dtype == dtype and y.shape == (m, n)
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < (2e-3 if dtype == torch.float16 else 1e-2), err


# ---- what the GPU kernels compile to (offline sm_90 compile: runs on any machine, no GPU) -------------------

_COMPILE = """
import json, sys
from collections import Counter
from fourbit.kernels.sass import compile_sm90
from fourbit.kernels import w4a16_gemm as mod
out = {}
for name, (kernel, dtype, consts) in json.loads(sys.argv[1]).items():
    maxnreg = mod._ws_maxnreg(consts["BLOCK_M"], consts["R"], consts["NUM_WARPS"]) if kernel == "_w4a16_ws_kernel" else None
    k = compile_sm90(getattr(mod, kernel), dtype, consts, consts["NUM_WARPS"], maxnreg)
    out[name] = dict(shared=k.shared, smem=k.smem, regs=k.regs, stack=k.stack, ops=Counter(k.sass_ops),
                     order=[op for op in k.sass_ops if op in ("LDGSTS.E.BYPASS.128", "LDGDEPBAR", "ACQBULK", "PREEXIT")])
print(json.dumps(out))
"""
_MMA = dict(HAS_BIAS=True, ATOMIC=False, POST_SCALE=True, X_SMEM=False, EVEN_K=False, BLOCK_M=8, R=1, NUM_WARPS=4)
_CASES = {
    "mma-bf16-g128": ("_w4a16_mma_kernel", "bf16", dict(GS=128, SYM=False, **_MMA)),
    "mma-fp16-g32": ("_w4a16_mma_kernel", "fp16", dict(GS=32, SYM=False, **_MMA)),
    "mma-bf16-perchannel-sym": ("_w4a16_mma_kernel", "bf16", dict(GS=-1, SYM=True, **_MMA)),
    "ring-bf16-g128-split-pdl": ("_w4a16_ring_kernel", "bf16", dict(GS=128, SYM=False, HAS_BIAS=False, ATOMIC=True,
                                                                     BLOCK_M=8, R=1, NUM_WARPS=4, STAGES=3,
                                                                     PDL=True)),
    "ring-fp16-g32": ("_w4a16_ring_kernel", "fp16", dict(GS=32, SYM=False, HAS_BIAS=True, ATOMIC=False, BLOCK_M=16,
                                                         R=1, NUM_WARPS=4, STAGES=4)),
    "ring-bf16-perchannel-sym": ("_w4a16_ring_kernel", "bf16", dict(GS=-1, SYM=True, HAS_BIAS=False, ATOMIC=False,
                                                                    BLOCK_M=8, R=2, NUM_WARPS=4, STAGES=2)),
    "wgmma-bf16-g128": ("_w4a16_wgmma_kernel", "bf16", dict(GS=128, SYM=False, HAS_BIAS=False, ATOMIC=False,
                                                            BLOCK_M=256, R=1, NUM_WARPS=8, STAGES=3)),
    "wgmma-fp16-g32-split": ("_w4a16_wgmma_kernel", "fp16", dict(GS=32, SYM=False, HAS_BIAS=True, ATOMIC=True,
                                                                 BLOCK_M=64, R=2, NUM_WARPS=4, STAGES=4)),
    # BN 64 (one warpgroup, R 1): the M = 64-256 configs; its epilogue once held every element twice and spilled
    "wgmma-bf16-g128-bn64-split": ("_w4a16_wgmma_kernel", "bf16", dict(GS=128, SYM=False, HAS_BIAS=False,
                                                                       ATOMIC=True, BLOCK_M=128, R=1, NUM_WARPS=4,
                                                                       STAGES=2)),
    # a tile in parts (w4a16_gemm.tile_parts): 256 + 128 rows, and 256 + 8 with bias and groups of 32
    "wgmma-bf16-g128-parts-384": ("_w4a16_wgmma_kernel", "bf16", dict(GS=128, SYM=False, HAS_BIAS=False,
                                                                      ATOMIC=False, BLOCK_M=384, R=1, NUM_WARPS=4,
                                                                      STAGES=2)),
    "wgmma-fp16-g32-parts-264": ("_w4a16_wgmma_kernel", "fp16", dict(GS=32, SYM=True, HAS_BIAS=True, ATOMIC=False,
                                                                     BLOCK_M=264, R=1, NUM_WARPS=8, STAGES=2)),
}
_WS = dict(SYM=False, HAS_BIAS=False, NUM_WARPS=4)
# the warp-specialized kernel at the configs _ws_pick chooses among (BLOCK_M, R, warps, stages), split and not;
# below, its config for 80 < M <= 256 and a group size below a tile with bias
_WS_PICKS = [(32, 1, 4, 4), (64, 1, 4, 4), (32, 2, 4, 3), (64, 2, 4, 3), (32, 2, 8, 4), (64, 2, 8, 3)]
_CASES.update({
    f"ws-bf16-g128-{bm}-{r}-{atomic}": ("_w4a16_ws_kernel", "bf16", dict(
        GS=128, SYM=False, HAS_BIAS=False, ATOMIC=atomic, BLOCK_M=bm, R=r, NUM_WARPS=warps, STAGES=stages))
    for bm, r, warps, stages in _WS_PICKS for atomic in (False, True)})
_CASES["ws-bf16-g128-128-rows"] = ("_w4a16_ws_kernel", "bf16", dict(GS=128, ATOMIC=False, BLOCK_M=128, R=1, STAGES=3,
                                                                   **_WS))  # the config for 80 < M <= 256, K <= 4096
_CASES["ws-fp16-g32-bias"] = ("_w4a16_ws_kernel", "fp16", dict(GS=32, SYM=True, HAS_BIAS=True, ATOMIC=True,
                                                               BLOCK_M=64, R=1, NUM_WARPS=4, STAGES=4))
# the wgmma configs the cost model chooses among (w4a16_gemm.WGMMA_CTAS_PER_SM), split and not
_CASES.update({f"occupancy-{bm}-{r}-{atomic}": ("_w4a16_wgmma_kernel", "bf16", dict(
    GS=128, SYM=False, HAS_BIAS=False, ATOMIC=atomic, BLOCK_M=bm, R=r, NUM_WARPS=4, STAGES=2))
    for bm, r in WGMMA_CTAS_PER_SM for atomic in (False, True)})

# gated epilogues (silu(gate) · up, nn/fuse.py), each beside its plain twin above
_CASES.update({f"{name}-glu": (_CASES[name][0], _CASES[name][1], dict(_CASES[name][2], GLU=True)) for name in (
    "mma-bf16-g128", "ring-bf16-g128-split-pdl", "ring-fp16-g32", "wgmma-bf16-g128", "wgmma-bf16-g128-bn64-split",
    "wgmma-bf16-g128-parts-384", "ws-bf16-g128-64-1-True")})


@pytest.fixture(scope="module")
def compiled():
    """The kernels compiled for sm_90 in a fresh process: Triton's interpreter, which the tests above run
    in, patches triton.language in this one."""
    from fourbit.kernels.w4a16_gemm import GLUON_OK, GLUON_TRITON

    if not GLUON_OK:
        pytest.skip(f"the Gluon kernels are written for Triton {GLUON_TRITON}")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(_CASES)], capture_output=True, text=True,
                         env=env, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.mark.parametrize("case", [c for c in _CASES if c.startswith("mma")])
def test_mma_kernel_keeps_dequantized_weights_in_registers(compiled, case):
    # Compiling at all proves the unpacked words already have the mma A-operand layout: the kernel's
    # convert_layout(..., assert_trivial=True) fails the compile otherwise. The SASS then shows the weights
    # arriving as 128-bit loads and going into HMMA with no shared memory anywhere in the kernel.
    k = compiled[case]
    assert k["shared"] == 0 and k["stack"] == 0
    assert not any(op.startswith(("STS", "LDS")) for op in k["ops"])
    assert k["ops"].get("LDG.E.128", 0) >= 2  # a lane's 8 words of a tile: two 128-bit loads
    assert sum(n for op, n in k["ops"].items() if op.startswith("HMMA.16816")) >= 8  # 8 k16 slices per tile


@pytest.mark.parametrize("case", [c for c in _CASES if c.startswith("ring")])
def test_ring_kernel_copies_packed_words_only(compiled, case):
    # The ring kernel stages every global read in shared memory with cp.async (LDGSTS): the packed weight words
    # (each lane's 8 words as two 16-byte copies), X and the group parameters. Each lane reads its own words back
    # with two 128-bit LDS and dequantizes them in registers (compiling proves, as above, that they are the mma A
    # fragments). The kernel has no shared-memory store at all but the one broadcasting the split-K arrival
    # count: a dequantized tile written back would show up here as STS.
    k = compiled[case]
    assert k["stack"] == 0
    assert k["ops"].get("LDGSTS.E.BYPASS.128", 0) >= 2 and k["ops"].get("LDS.128", 0) >= 2
    assert sum(n for op, n in k["ops"].items() if op.startswith("STS")) <= 1
    direct = [op for op in k["ops"] if op.startswith("LDG.E") and "STRONG" not in op]  # (STRONG: split-K sums)
    assert not direct or (_CASES[case][2]["HAS_BIAS"] and direct == ["LDG.E.U16"]), direct  # only the bias
    assert sum(n for op, n in k["ops"].items() if op.startswith("HMMA.16816")) >= 8


@pytest.mark.parametrize("case", [c for c in _CASES if c.startswith("ring")])
def test_ring_kernel_requests_weights_before_waiting_for_the_previous_kernel(compiled, case):
    # With PDL (kernels/pdl.py) griddepcontrol.wait is ACQBULK in the SASS and launch_dependents PREEXIT. The
    # weight copies of the ring's first STAGES - 1 tiles are committed (LDGDEPBAR) before the wait, X's after it,
    # and the next kernel is let in only after the K loop (PREEXIT after the loop's copies). Without PDL, neither.
    consts = _CASES[case][2]
    order = compiled[case]["order"]
    if not consts.get("PDL"):
        assert "ACQBULK" not in order and "PREEXIT" not in order
        return
    wait = order.index("ACQBULK")
    assert order[:wait].count("LDGDEPBAR") == consts["STAGES"] - 1
    assert order.index("PREEXIT") > max(i for i, op in enumerate(order) if op.startswith("LDGSTS"))


@pytest.mark.parametrize("case", [c for c in _CASES if c.startswith("wgmma")])
def test_wgmma_kernel_feeds_register_weights_to_wgmma(compiled, case):
    # As above, compiling proves the dequantized fragments are wgmma's register A operand as they are unpacked.
    # X arrives by TMA (UTMALDG, two boxes per ring stage and part of the tile's rows). The only shared stores left
    # are the epilogue's: the fp32 accumulator re-laid out for coalesced output, BN x BLOCK_M x 4 bytes, plus one
    # broadcasting the split-K arrival count. A dequantized weight tile would add as many again.
    from fourbit.kernels.w4a16_gemm import tile_parts

    _, _, c = _CASES[case]
    parts = len(tile_parts(c["BLOCK_M"]))
    threads = 32 * c["NUM_WARPS"]
    epilogue = 16 * c["R"] * c["NUM_WARPS"] * c["BLOCK_M"] * 4 // (threads * 16)
    k = compiled[case]
    assert k["stack"] == 0
    assert sum(n for op, n in k["ops"].items() if op.startswith("HGMMA")) >= 8 * parts
    assert k["ops"].get("UTMALDG.2D", 0) >= 2 * parts
    width = {"STS.128": 16, "STS.64": 8, "STS": 4}  # bytes per thread (a small part's re-layout stores 4 at a time)
    assert sum(width[op] * n for op, n in k["ops"].items() if op.startswith("STS")) <= 16 * epilogue + 4


@pytest.mark.parametrize("bm, r", list(WGMMA_CTAS_PER_SM))
def test_wgmma_occupancy_table_matches_the_compile(compiled, bm, r):
    # The config cost model counts how many CTAs of each wgmma shape share an SM. Recompute it from the sm_90
    # compile (split and unsplit, the larger): 64K registers per SM allocated 8 per thread at a time, 228 KB of
    # shared memory with 1 KB reserved per CTA, at most 64 warps. A kernel change that moves these fails here.
    runs = [compiled[f"occupancy-{bm}-{r}-{atomic}"] for atomic in (False, True)]
    regs = max(k["regs"] for k in runs)
    smem = max(k["smem"] + k["shared"] for k in runs)
    fits = min(65536 // (-(-regs // 8) * 8 * 128), 228 * 1024 // (smem + 1024), 64 // 4)
    assert fits == WGMMA_CTAS_PER_SM[bm, r], (regs, smem)


@pytest.mark.parametrize("case", [c for c in _CASES if c.startswith("ws")])
def test_ws_kernel_streams_packed_words_by_tma(compiled, case):
    # The warp-specialized kernel: X (two boxes) and the packed weight words (one box) arrive by TMA and the group
    # parameters by cp.async (LDGSTS), all issued by the loader warps; the consumers read their own words back
    # (128-bit LDS) and, as above, compiling proves the dequantized fragments are wgmma's A operand in registers.
    # No global load is left but the bias and the split-K sums, and the only wide shared stores are the
    # epilogue's re-layout (a dequantized tile would add as many again).
    _, _, c = _CASES[case]
    k = compiled[case]
    assert k["stack"] == 0
    assert k["ops"].get("UTMALDG.2D", 0) == 3 and k["ops"].get("LDS.128", 0) + k["ops"].get("LDS.64", 0) >= 2
    assert any(op.startswith("LDGSTS") for op in k["ops"])
    direct = [op for op in k["ops"] if op.startswith("LDG.E") and "STRONG" not in op]
    assert not direct or (c["HAS_BIAS"] and direct == ["LDG.E.128"]), direct
    assert sum(n for op, n in k["ops"].items() if op.startswith("HGMMA")) >= 8
    epilogue = 16 * c["R"] * c["NUM_WARPS"] * c["BLOCK_M"] * 4 // (32 * c["NUM_WARPS"] * 8)
    assert sum(n for op, n in k["ops"].items() if op.startswith("STS.")) <= epilogue


@pytest.mark.parametrize("bm, r, warps, stages", _WS_PICKS)
def test_ws_occupancy_matches_the_compile(compiled, bm, r, warps, stages):
    # _ws_pick splits K as far as the CTAs that fit an SM allow (_ws_ctas_per_sm); recompute that from the
    # compile: registers at maxnreg for the consumers + 4 warps (the loaders' warpgroup), shared memory with 1 KB
    # per CTA.
    from fourbit.kernels.w4a16_gemm import _ws_ctas_per_sm

    runs = [compiled[f"ws-bf16-g128-{bm}-{r}-{atomic}"] for atomic in (False, True)]
    regs = max(k["regs"] for k in runs)
    smem = max(k["smem"] + k["shared"] for k in runs)
    fits = min(65536 // (regs * (warps + 4) * 32), 228 * 1024 // (smem + 1024))
    assert fits == _ws_ctas_per_sm(bm, r, warps, stages), (regs, smem)


@pytest.mark.parametrize("case", [c for c in _CASES if c.endswith("-glu")])
def test_gated_epilogue_pairs_gate_and_up_in_registers(compiled, case):
    # A gated layer's rows alternate in 8-row blocks of gate and up channels, the rows g and g + 8 one thread holds
    # in the mma / wgmma accumulators (16 consecutive rows in the wgmma epilogue's re-layout), so silu(gate) · up
    # needs no data exchange: against the plain twin, no shuffle or shared memory more, fewer global stores (half
    # the outputs), and the sigmoid's exponential and reciprocal (MUFU) in.
    plain, gated = compiled[case.removesuffix("-glu")], compiled[case]

    def count(k, prefix):
        return sum(n for op, n in k["ops"].items() if op.startswith(prefix))

    assert gated["stack"] == 0 and (gated["shared"], gated["smem"]) == (plain["shared"], plain["smem"])
    assert count(gated, "SHFL") == count(plain, "SHFL") and count(gated, "STS") == count(plain, "STS")
    assert count(gated, "STG") < count(plain, "STG")
    assert count(gated, "MUFU.EX2") > 0 and count(plain, "MUFU") == 0


def test_tile_parts():
    from fourbit.kernels.w4a16_gemm import tile_parts

    assert tile_parts(8) == (8, ) and tile_parts(256) == (256, )
    assert tile_parts(264) == (256, 8) and tile_parts(384) == (256, 128) and tile_parts(320) == (256, 64)
    for bad in (4, 96, 200, 336, 260, 512, 640):  # not a power of two from 8 to 256, nor 256 + a smaller one
        with pytest.raises(ValueError):
            tile_parts(bad)


def test_parts_tile_for_256_to_384_rows_where_its_grid_fills_the_sms():
    # all of 256 < M <= 384 in one row of CTAs (256 + the next power of two rows), BN 128 where N / 128 CTAs fill
    # >= 70% of their waves on 132 SMs, else BN 64 where N / 64 do, else not at all (N = 4096: 64 CTAs)
    from fourbit.kernels.w4a16_gemm import _config, _parts_pick, _plan

    assert _parts_pick(334, 28672, 132) == (384, 8) and _parts_pick(257, 12288, 132) == (264, 8)
    assert _parts_pick(320, 6144, 132) == (320, 4) and _parts_pick(300, 22016, 132) == (320, 4)
    assert _parts_pick(334, 4096, 132) is None and _parts_pick(334, 10240, 132) is None
    assert _parts_pick(256, 28672, 132) is None and _parts_pick(385, 28672, 132) is None
    assert _config(334, 28672, 32, 132) == ("wgmma", 384, 1, 8, 1, False, True, 2)
    assert _plan(288, 12288, 32, 132, True, True) == ((0, 288, ("wgmma", 288, 1, 8, 1, False, True, 2)), )
    assert _config(334, 28672, 32, 132, hopper=False)[0] == "mma"


def test_row_parts_only_for_large_layers_just_past_128_or_256_rows_on_hopper():
    # two launches, the first 128 or 256 rows and the rest, on sm_90 only: 256 < M <= 288 where N·K >= 2^25 (to
    # M = 320 where also N >= 12288), 128 < M <= 144 where N·K >= 80·2^20
    from fourbit.kernels.w4a16_gemm import _row_parts

    assert _row_parts(288, 8192, 32, True) == ((0, 256), (256, 288))
    assert _row_parts(257, 16384, 16, True) == ((0, 256), (256, 257))  # N·K = 2^25 exactly
    assert _row_parts(320, 12288, 32, True) == ((0, 256), (256, 320))
    assert _row_parts(144, 22016, 32, True) == ((0, 128), (128, 144))
    assert _row_parts(129, 8192, 80, True) == ((0, 128), (128, 129))  # N·K = 80·2^20 exactly
    for m, n, k_tiles, hopper in [(288, 8192, 32, False), (256, 8192, 32, True), (289, 8192, 32, True),
                                  (321, 12288, 32, True), (288, 6144, 32, True), (288, 16384, 15, True),
                                  (136, 22016, 32, False), (128, 22016, 32, True), (145, 22016, 32, True),
                                  (136, 15360, 40, True)]:
        assert _row_parts(m, n, k_tiles, hopper) == ((0, m), )
