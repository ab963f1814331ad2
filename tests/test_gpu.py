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
@pytest.mark.parametrize("m", [1, 7, 16, 33, 128, 1000])
def test_w4a16_op_on_cuda(dtype, group_size, sym, m):
    n, k = 1000, 1100  # neither a multiple of the tile nor of the group
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
    ("mma", 8, 1, 4, 1, True, False, 0), ("mma", 8, 2, 4, 3, True, False, 0), ("mma", 16, 1, 8, 2, False, True, 0),
    ("mma", 64, 1, 8, 1, False, True, 0),
    ("wgmma", 8, 1, 4, 4, False, True, 4), ("wgmma", 16, 2, 8, 2, False, True, 2),
    ("wgmma", 32, 1, 8, 1, False, True, 3), ("wgmma", 64, 1, 8, 1, False, True, 4),
    ("wgmma", 64, 2, 4, 3, False, True, 2), ("wgmma", 128, 1, 8, 4, False, True, 4),
    ("wgmma", 128, 1, 4, 1, False, True, 3), ("wgmma", 256, 1, 8, 1, False, True, 3),
    ("wgmma", 256, 1, 8, 2, False, True, 2),
]


@pytest.mark.parametrize("cfg", _KERNEL_CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [5, 300])
def test_w4a16_kernel_configs_on_cuda(cfg, dtype, m):
    """Every kernel configuration (not only the one chosen by M), over an output buffer that the caching
    allocator hands back still holding NaNs: every element must be written, and right."""
    from fourbit.kernels.w4a16_gemm import w4a16_gemm

    torch.manual_seed(1000 * _KERNEL_CONFIGS.index(cfg) + m)
    n, k = 1000, 1100
    codes, scales, zeros = quantize_groups(torch.randn(n, k, device="cuda"), 64, False, SCALE_DTYPE)
    layer = W4A16Linear.from_codes(codes, scales, zeros, 64, k, torch.randn(n, device="cuda"))
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    for _ in range(2):  # the second call reuses the split-K workspace the first one zeroed again
        torch.full((m, n), float("nan"), device="cuda", dtype=dtype)  # freed at once: the output's future block
        y = w4a16_gemm(x, layer.qweight, layer.scales, layer.zeros, 64, n, k, layer.bias, config=cfg)
        ref = x.double() @ layer.dequantize().double().t() + layer.bias.double()
        assert torch.isfinite(y).all()
        assert float((y.double() - ref).norm() / ref.norm()) < 1e-2


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
