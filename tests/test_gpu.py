"""GPU-only checks (skipped without CUDA): the W4A16 op on the device, real-weight generation and the demo."""
import json
import subprocess
import sys

import pytest
import torch

import fourbit
from fourbit import ops
from fourbit.formats.uint4 import quantize_groups
from fourbit.graphs import capture
from fourbit.nn.linear import SCALE_DTYPE, W4A16Linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size,sym", [(32, False), (64, True), (128, False), (-1, True)])
@pytest.mark.parametrize("m", [1, 7, 16, 33, 128, 300, 1000])
@pytest.mark.parametrize("n,k", [(1000, 1100), (1008, 1040)])
def test_w4a16_op_on_cuda(dtype, group_size, sym, m, n, k):
    # neither a multiple of the tile nor of the group; the second shape is in multiples of 16 (the ring kernel)
    w = torch.randn(n, k, device="cuda")
    codes, scales, zeros = quantize_groups(w, group_size, sym, SCALE_DTYPE)
    bias = torch.randn(n, device="cuda")
    layer = W4A16Linear.from_codes(codes, scales, zeros, group_size, k, bias)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    y = ops.w4a16_gemm(x, layer.qweight, layer.scales, layer.zeros, group_size, n, k, layer.bias)
    ref = x.double() @ layer.dequantize().double().t() + bias.double()
    assert y.dtype == dtype and y.shape == (m, n)
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2


_KERNEL_CONFIGS = [  # (kind, BLOCK_M, R, warps, split K, post-scale, X in smem, stages): each kernel path
    ("ring", 8, 1, 4, 1, True, True, 2), ("ring", 8, 2, 4, 3, True, True, 3), ("ring", 16, 1, 4, 4, True, True, 4),
    ("mma", 8, 1, 4, 1, True, False, 0), ("mma", 8, 2, 4, 3, True, False, 0), ("mma", 16, 1, 8, 2, False, True, 0),
    ("mma", 64, 1, 8, 1, False, True, 0),
    ("wgmma", 8, 1, 4, 4, False, True, 4), ("wgmma", 16, 2, 8, 2, False, True, 2),
    ("wgmma", 32, 1, 8, 1, False, True, 3), ("wgmma", 64, 1, 8, 1, False, True, 4),
    ("wgmma", 64, 2, 4, 3, False, True, 2), ("wgmma", 128, 1, 8, 4, False, True, 4),
    ("wgmma", 128, 1, 4, 1, False, True, 3), ("wgmma", 256, 1, 8, 1, False, True, 3),
    ("wgmma", 256, 1, 8, 2, False, True, 2),
    ("wgmma", 264, 1, 8, 1, False, True, 2), ("wgmma", 320, 1, 4, 1, False, True, 2),  # tiles in parts (tile_parts)
    ("ws", 32, 1, 4, 2, False, True, 4), ("ws", 64, 2, 4, 1, False, True, 3), ("ws", 64, 1, 4, 4, False, True, 2),
    ("ws", 128, 1, 4, 1, False, True, 3), ("ws", 128, 1, 8, 3, False, True, 3),
    ("ws", 32, 2, 8, 2, False, True, 4), ("ws", 64, 2, 8, 4, False, True, 3),  # two consumer warpgroups (_ws_pick)
]


def _w4a16_layer(n, k, bias=True):
    codes, scales, zeros = quantize_groups(torch.randn(n, k, device="cuda"), 64, False, SCALE_DTYPE)
    return W4A16Linear.from_codes(codes, scales, zeros, 64, k, torch.randn(n, device="cuda") if bias else None)


@pytest.mark.parametrize("cfg", _KERNEL_CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [5, 300])
@pytest.mark.parametrize("glu", [False, True], ids=["plain", "gated"])
def test_w4a16_kernel_configs_on_cuda(cfg, dtype, m, glu):
    """Every kernel configuration (not only the one chosen by M), plain and gated (nn/fuse.py: silu(gate) · up in
    the epilogue), over an output buffer that the caching allocator hands back still holding NaNs: every element
    must be written, and right."""
    from fourbit.kernels.ref import silu_mul_ref
    from fourbit.kernels.w4a16_gemm import w4a16_gemm
    from fourbit.nn.fuse import _gate_w4a16

    torch.manual_seed(1000 * _KERNEL_CONFIGS.index(cfg) + m + glu)
    # ring and ws want multiples of 16, as does a gated layer (two parts of 504 channels)
    n, k = (1008, 1040) if cfg[0] in ("ring", "ws") or glu else (1000, 1100)
    parts = [_w4a16_layer(n // 2, k, bias=False) for _ in range(2)] if glu else [_w4a16_layer(n, k)]
    layer = _gate_w4a16(parts) if glu else parts[0]
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    refs = [x.double() @ p.dequantize().double().t() + (0 if p.bias is None else p.bias.double()) for p in parts]
    ref = silu_mul_ref(*refs) if glu else refs[0]
    for _ in range(2):  # the second call reuses the split-K workspace the first one zeroed again
        torch.full(ref.shape, float("nan"), device="cuda", dtype=dtype)  # freed at once: the output's future block
        y = w4a16_gemm(x, layer.qweight, layer.scales, layer.zeros, 64, n, k, layer.bias, config=cfg, glu=glu)
        assert y.shape == ref.shape and torch.isfinite(y).all()
        assert float((y.double() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("m, n, k", [(129, 4096, 20496), (144, 4096, 20496), (257, 4096, 20496),
                                     (288, 4096, 8208), (257, 20480, 4112), (300, 20480, 4112), (334, 20480, 4112),
                                     (384, 12288, 4112)])
@pytest.mark.parametrize("glu", [False, True], ids=["plain", "gated"])
def test_w4a16_row_parts_on_cuda(m, n, k, glu):
    """Just past 128 or 256 rows a large layer runs on Hopper as two launches (the first 128 / 256 rows, then
    the rest) writing disjoint rows of one output, or, where its grid fills the SMs (N >= ~6144), as one tile of
    two parts (256 + the next power of two rows, _parts_pick): every row written, and right, with bias and
    split-K workspaces reused; also for a gated layer (silu(gate) · up, nn/fuse.py). K is not a multiple of 128."""
    from fourbit.kernels import sm_count
    from fourbit.kernels.ref import silu_mul_ref
    from fourbit.kernels.w4a16_gemm import _parts_pick, _row_parts, kernel_for, w4a16_gemm
    from fourbit.nn.fuse import _gate_w4a16

    hopper = torch.cuda.get_device_capability()[0] == 9  # elsewhere one launch: the same checks apply
    in_parts = _parts_pick(m, n, sm_count(0)) is not None
    assert in_parts or len(_row_parts(m, n, -(-k // 128), True)) == 2
    assert ("+" in kernel_for(torch.device("cuda"), m, n, k)) == (hopper and not in_parts)
    torch.manual_seed(m)
    parts = []
    for _ in range(2 if glu else 1):  # gated: gate and up of n / 2 channels each
        w = torch.randn(n // (1 + glu), k, device="cuda") / 8  # (/ 8: gated products at K = 20496 stay in fp16)
        codes, scales, zeros = quantize_groups(w, 128, False, SCALE_DTYPE)
        bias = torch.randn(n // (1 + glu), device="cuda")
        parts.append(W4A16Linear.from_codes(codes, scales, zeros, 128, k, bias))
    layer = _gate_w4a16(parts) if glu else parts[0]
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        refs = [x.double() @ p.dequantize().double().t() + p.bias.double() for p in parts]
        ref = silu_mul_ref(*refs) if glu else refs[0]
        torch.full(ref.shape, float("nan"), device="cuda", dtype=dtype)  # freed at once: the output's future block
        y = w4a16_gemm(x, layer.qweight, layer.scales, layer.zeros, 128, n, k, layer.bias, glu=glu)
        assert y.shape == ref.shape and torch.isfinite(y).all()
        base = 128 if m <= 144 else 256
        for rows in (slice(0, base), slice(base, m)):
            assert float((y[rows].double() - ref[rows]).norm() / ref[rows].norm()) < 1e-2


def test_golden_text_on_cuda(realdata):
    model = fourbit.load(realdata / "stories260K.bin", device="cuda")
    tok = fourbit.Tokenizer(realdata / "tok512.model")
    out = fourbit.generate(model, [[1]], fourbit.SamplingParams(max_new_tokens=200, temperature=0))
    assert tok.decode(out[0]) == (realdata / "stories260K.greedy.txt").read_text()


def test_w4a16_perplexity_cuda_matches_cpu(realdata):
    tok = fourbit.Tokenizer(realdata / "tok512.model")
    ids = tok.encode((realdata / "tinystories_val_head794k.txt").read_text(), bos=True)
    ppl = {}
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        model = fourbit.load(realdata / "stories260K.bin", dtype=dtype, device=device)
        fourbit.quantize(model, fourbit.W4A16Config(group_size=32), progress=False)
        ppl[device] = fourbit.perplexity(model, ids, 512, max_tokens=50_000, progress=False)["ppl"]
    assert abs(ppl["cuda"] / ppl["cpu"] - 1) < 0.01, ppl


def test_demo_on_cuda():
    out = subprocess.run([sys.executable, "-m", "fourbit.cli", "demo", "--json"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["preset"] == "llama-2-7b" and result["layers_quantized"] == 224
    assert all(e["max"] < 0.15 for e in result["rel_error"].values())


def test_w4a16_layer_in_cuda_graph():
    """The W4A16 forward captures into a CUDA graph (no host syncs or copies) and replays the eager result."""
    lin = torch.nn.Linear(1100, 1000, bias=True, device="cuda")
    layer = fourbit.quantize(torch.nn.Sequential(lin), fourbit.W4A16Config(group_size=64), progress=False)[0]
    x = torch.randn(16, 1100, device="cuda", dtype=torch.bfloat16)
    eager = layer(x)
    outs = []
    graph = capture(lambda: outs.append(layer(x)))
    out = outs[-1]  # the tensor the graph writes
    x.copy_(torch.randn_like(x))
    graph.replay()
    again = layer(x).float()  # split-K adds partial sums atomically: equal up to summation order
    assert float((out.float() - again).norm() / again.norm()) < 1e-3
    assert not torch.allclose(out, eager)  # the replay really computed the new input


def test_w4a16_layer_under_torch_compile():
    """The custom op's fake implementation lets torch.compile trace the layer whole (fullgraph)."""
    lin = torch.nn.Linear(1100, 1000, bias=True, device="cuda")
    layer = fourbit.quantize(torch.nn.Sequential(lin), fourbit.W4A16Config(group_size=64), progress=False)[0]
    compiled = torch.compile(layer, fullgraph=True)
    for m in (1, 7, 300):
        x = torch.randn(m, 1100, device="cuda", dtype=torch.bfloat16)
        eager, out = layer(x).float(), compiled(x).float()
        assert out.shape == (m, 1000) and float((out - eager).norm() / eager.norm()) < 1e-3


_ATTN_CASES = [  # (Hq, Hkv, D, block_size, sliding_window, [(seq_len, q_len), ...])
    (32, 8, 128, 16, None, [(2048, 1), (1, 1), (0, 1), (1500, 1)]),  # decode, long contexts: split KV
    (32, 32, 128, 16, None, [(n, 1) for n in range(1, 400, 7)] + [(0, 1)]),  # decode, many sequences
    (32, 8, 128, 16, None, [(1000, 1000), (17, 17), (300, 77), (1, 1), (0, 1), (513, 1)]),  # mixed prefill
    (28, 4, 64, 32, 100, [(700, 250), (129, 1), (64, 64), (5, 3)]),  # G = 7, window
    (8, 1, 256, 16, None, [(333, 100), (90, 1), (2, 2)]),
    (16, 16, 32, 16, 33, [(257, 257), (48, 1)]),
]


@pytest.mark.parametrize("case", range(len(_ATTN_CASES)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_attention_on_cuda(dtype, case):
    """The Triton paged-attention kernel in bf16 and fp16 against the float32 reference, outputs poisoned with
    NaN; decode batches also replay from a CUDA graph after their lengths change (no host syncs in the launch)."""
    from test_paged_attention import _batch  # its caches hold NaN outside the written tokens

    from fourbit.kernels.paged_attention import paged_attention
    from fourbit.kernels.ref import paged_attention_ref

    hq, hkv, d, bs, window, specs = _ATTN_CASES[case]
    args, _, _ = _batch(specs, hq, hkv, d, bs, dtype, seed=case)
    out = torch.full_like(args["q"], float("nan"))
    paged_attention(**args, sliding_window=window, out=out)
    ref = paged_attention_ref(**args, sliding_window=window)
    assert torch.isfinite(out).all()
    assert float((out.double() - ref.double()).norm() / ref.double().norm()) < 1e-2
    if args["max_query_len"] == 1:
        graph = capture(lambda: paged_attention(**args, sliding_window=window, out=out))
        args["seq_lens"].copy_((args["seq_lens"] - 1).clamp(min=0))  # drop each context's last key
        args["q"].copy_(torch.randn_like(args["q"]))
        out.fill_(float("nan"))
        graph.replay()
        ref = paged_attention_ref(**args, sliding_window=window)
        assert float((out.double() - ref.double()).norm() / ref.double().norm()) < 1e-2


# ---- fused layer kernels (kernels/fused.py) ------------------------------------------------------------------------
# tests/test_fused.py runs its kernel-vs-twin checks on the GPU too (small odd shapes, fp16 and bf16); these add
# Llama-2-7B shapes through the ops (the dispatch to Triton), CUDA-graph replay and a fused bf16 model.

def _fused_cases(dtype, t, gen):
    """(op name, the op's args, its torch twin) at 7B shapes plus odd ones: dim 4096, 32 q / 8 kv heads of 128,
    hidden 11008 as the halves of a fused gate_up output, a 16-token-block KV cache."""
    from fourbit.kernels import ref

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(shape, generator=gen)).to("cuda", dtype)

    x, res, w = rnd(t, 4096), rnd(t, 4096, scale=5.0), rnd(4096) + 1
    qkv = rnd(t, (32 + 16) * 128)
    q, k, v = qkv[:, :4096].view(t, 32, 128), qkv[:, 4096:5120].view(t, 8, 128), qkv[:, 5120:].view(t, 8, 128)
    angles = torch.rand(t, 64, generator=gen, device="cpu") * 4000
    cos, sin = angles.cos().to("cuda", dtype), angles.sin().to("cuda", dtype)
    gate, up = rnd(t, 2 * 11008, scale=3.0).chunk(2, dim=-1)
    cache = torch.full((t // 16 + 3, 8, 16, 128), float("nan"), device="cuda", dtype=dtype)
    slots = torch.randperm(cache.shape[0] * 16, generator=gen)[:t].cuda()
    return [
        ("rms_norm", (x, w, 1e-5), ref.rms_norm_ref),
        ("add_rms_norm", (x, res, w, 1e-6), ref.add_rms_norm_ref),
        ("rope", (q, k, cos, sin, False), ref.rope_ref),
        ("rope", (q, k, cos, sin, True), ref.rope_ref),
        ("silu_mul", (gate, up), ref.silu_mul_ref),
        ("paged_kv_write", (k, v, cache, cache.clone(), slots), ref.paged_kv_write_ref),
    ]


def _same(out, want):
    """One rounding apart (test_fused._close), output by output."""
    from test_fused import _close

    for o, e in zip(out if isinstance(out, tuple) else (out,), want if isinstance(want, tuple) else (want,)):
        _close(o, e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 7, 333])
def test_fused_ops_on_cuda(dtype, t):
    gen = torch.Generator().manual_seed(t)
    for name, args, twin in _fused_cases(dtype, t, gen):
        if name == "paged_kv_write":
            k, v, kc, vc, slots = args
            kc_ref, vc_ref = kc.clone(), vc.clone()
            ops.paged_kv_write(k, v, kc, vc, slots)
            twin(k, v, kc_ref, vc_ref, slots)
            torch.testing.assert_close(kc, kc_ref, rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0, equal_nan=True)
        else:
            _same(getattr(ops, name)(*args), twin(*args))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_ops_in_cuda_graph(dtype):
    """Each op captured once, replayed on new inputs (new slots for the KV write): no host syncs, and the replay
    computes from the device buffers."""
    gen = torch.Generator().manual_seed(5)
    for name, args, twin in _fused_cases(dtype, 7, gen):
        op = getattr(ops, name)
        outs = []
        graph = capture(lambda: outs.append(op(*args)))
        for a in args:
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                a.copy_(torch.randn(a.shape, generator=gen).to(a))
        if name == "paged_kv_write":
            k, v, kc, vc, slots = args
            slots.copy_(torch.randperm(kc.shape[0] * 16, generator=gen)[:7])
            kc.fill_(float("nan"))
            vc.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            kc_ref, vc_ref = torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))
            twin(k, v, kc_ref, vc_ref, slots)
            torch.testing.assert_close(kc, kc_ref, rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0, equal_nan=True)
            continue
        graph.replay()
        torch.cuda.synchronize()
        _same(outs[-1], twin(*args))


def test_fused_projections_bf16_model_on_cuda(realdata):
    """stories260K in bf16 with fused projections: logits as the unfused model's up to bf16 rounding (cuBLAS may sum
    a wider GEMM in another order)."""
    from fourbit.nn import fuse_projections_

    model = fourbit.load(realdata / "stories260K.bin", dtype=torch.bfloat16, device="cuda")
    tokens = torch.randint(0, 512, (3, 100), device="cuda")
    with torch.inference_mode():
        want = model(tokens)
        fuse_projections_(model)
        assert "qkv_proj" in model.layers[0].self_attn._modules
        got = model(tokens)
    assert float((got - want).norm() / want.norm()) < 2e-2
