"""W4A16 end to end on the CPU: RTN codes -> quick layout -> reference dequant / custom op -> quantize/save/load.

Every check compares against an independent path: formats.uint4.dequantize_groups of the codes (which never
touches the quick layout) and float64 matmuls.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fourbit
from fourbit.config import W4A16Config
from fourbit.errors import FourbitError
from fourbit.formats.uint4 import dequantize_groups, quantize_groups
from fourbit.kernels.ref import w4a16_dequant_ref
from fourbit.models.tokenizer import Tokenizer
from fourbit.nn.linear import SCALE_DTYPE, W4A16Linear
from fourbit.quantize.rtn import rtn_linear

from hf_fixtures import write_hf_checkpoint

# (in_features, out_features): odd on purpose (172 = 4 * 43, 13 rows is not a multiple of 8, 300 not of 128)
SHAPES = [(172, 64), (64, 172), (300, 13)]
GROUPS = [32, 64, -1]


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _linear(k, n, seed, bias=True, spread=True) -> nn.Linear:
    """nn.Linear(k, n) with random weights; rows spread over magnitudes 1e-2..1e1 so the scales differ."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    w = torch.randn(n, k, generator=g)
    if spread:
        w = w * torch.logspace(-2, 1, n)[torch.randperm(n, generator=g)][:, None]
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return lin


def _expand(scales_gn: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """scales (G, N) as stored by W4A16Linear -> (N, k): each weight's scale, float32."""
    gs = k if group_size == -1 else group_size
    return scales_gn.float().repeat_interleave(gs, dim=0)[:k].t()


# ---- reference dequantization ---------------------------------------------------------------------

@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"in{k}-out{n}" for k, n in SHAPES])
def test_dequant_ref_matches_uint4_dequantize(shape, group_size, sym):
    k, n = shape
    seed = _seed()
    lin = _linear(k, n, seed)
    cfg = W4A16Config(group_size=group_size, sym=sym)
    layer = rtn_linear(lin, cfg)
    groups = 1 if group_size == -1 else -(-k // group_size)
    assert isinstance(layer, W4A16Linear)
    assert layer.qweight.dtype == torch.int32 and layer.qweight.shape == (-(-n // 16), -(-k // 128) * 256)
    assert layer.scales.dtype == SCALE_DTYPE and layer.scales.shape == (groups, n)
    assert (layer.zeros is None) == sym
    if not sym:
        assert layer.zeros.dtype == torch.uint8 and layer.zeros.shape == (groups, n)
    assert torch.equal(layer.bias, lin.bias)

    # independent path: the codes straight from quantize_groups, dequantized without the quick layout
    codes, scales, zeros = quantize_groups(lin.weight.detach(), group_size, sym, SCALE_DTYPE)
    expected = dequantize_groups(codes, scales, zeros, group_size, k=k)  # (N, K) float32
    got = w4a16_dequant_ref(layer.qweight, layer.scales, layer.zeros, group_size, n, k)
    assert got.dtype == torch.float32 and got.shape == (n, k)
    assert torch.equal(got, expected), f"seed {seed}: max diff {float((got - expected).abs().max()):.3e}"
    assert torch.equal(layer.dequantize(), expected)


# ---- RTN error ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"in{k}-out{n}" for k, n in SHAPES])
def test_rtn_error_within_half_a_step(shape, group_size, sym):
    k, n = shape
    seed = _seed()
    lin = _linear(k, n, seed)
    layer = rtn_linear(lin, W4A16Config(group_size=group_size, sym=sym))
    s = _expand(layer.scales, k, group_size)  # (N, K) the stored fp16 scales
    err = (lin.weight.detach() - layer.dequantize()).abs()
    # scales are rounded *up* to fp16 before the codes are chosen, so nothing is clipped: at most s / 2
    ratio = err / s
    assert float(ratio.max()) <= 0.5 + 1e-6, f"seed {seed}: max |W - Ŵ| / s = {float(ratio.max()):.4f}"
    assert float(ratio.max()) > 0.3, f"seed {seed}: the grid is barely used (scales too large?)"


def test_rtn_relative_error_falls_with_group_size():
    seed = _seed()
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(seed))
    lin = nn.Linear(512, 256, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    for sym in (False, True):
        errs = {}
        for g in (32, 64, 128, -1):
            w_hat = rtn_linear(lin, W4A16Config(group_size=g, sym=sym)).dequantize()
            errs[g] = float((w - w_hat).norm() / w.norm())
        assert errs[32] < errs[64] < errs[128] < errs[-1], f"seed {seed}, sym={sym}: {errs}"
        # 4-bit on a Gaussian: roughly 5-15 % relative error, never 0 and never ~1
        assert 0.02 < errs[32] and errs[-1] < 0.25, f"seed {seed}, sym={sym}: {errs}"


def test_rtn_tiny_group_is_not_clipped():
    w = torch.tensor([[-9.144127375293465e-07, 2.686023776732327e-07]])  # range 1.2e-6: s16 is subnormal
    codes, scales, zeros = quantize_groups(w, -1, False, torch.float16)
    err = (w - dequantize_groups(codes, scales, zeros, -1)).abs()
    assert float((err / scales.float()).max()) <= 0.5 + 1e-6


# ---- the custom op -------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M", [1, 7, 16, 128, 1000])
def test_w4a16_gemm_matches_float64(M, dtype, bias):
    seed = _seed()
    k, n, group_size = 300, 172, 64
    lin = _linear(k, n, seed, bias=bias)
    layer = rtn_linear(lin, W4A16Config(group_size=group_size, sym=False))
    codes, scales, zeros = quantize_groups(lin.weight.detach(), group_size, False, SCALE_DTYPE)
    w_hat = dequantize_groups(codes, scales, zeros, group_size, k=k).double()  # (N, K)
    x = torch.randn(M, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    ref = x.double() @ w_hat.t()  # (M, N), from the x actually passed in
    if bias:
        ref = ref + lin.bias.detach().double()
    y = torch.ops.fourbit.w4a16_gemm(x, layer.qweight, layer.scales, layer.zeros, group_size, n, k, layer.bias)
    assert y.dtype == dtype and y.shape == (M, n)
    assert torch.isfinite(y).all()
    rel = float((y.double() - ref).norm() / ref.norm())
    # fp32: accumulation only. fp16: Ŵ rounded to fp16 (2^-11 relative) and the output rounded to fp16.
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel < tol, f"seed {seed}: relative norm error {rel:.3e}"
    # the layer is the op on flattened leading dims
    y3 = layer(x.view(1, M, k))
    assert y3.shape == (1, M, n) and torch.equal(y3[0], y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_w4a16_gemm_opcheck(sym, dtype):
    lin = _linear(172, 64, _seed(), bias=not sym)
    layer = rtn_linear(lin, W4A16Config(group_size=32, sym=sym))
    x = torch.randn(7, 172).to(dtype)
    args = (x, layer.qweight, layer.scales, layer.zeros, 32, 64, 172, layer.bias)
    result = torch.library.opcheck(torch.ops.fourbit.w4a16_gemm, args)
    assert all(v == "SUCCESS" for v in result.values()), result


# ---- fourbit.quantize / save / load on a small HF Llama ------------------------------------------

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture()
def hf_llama(tmp_path):
    d = tmp_path / "hf"
    cfg = write_hf_checkpoint(d, "llama", seed=_seed())  # hidden 64, intermediate 96, 2 layers, vocab 101
    return d, cfg


def _tok(vocab, seed, shape=(2, 11)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_quantize_swaps_every_decoder_projection(hf_llama):
    d, cfg = hf_llama
    model = fourbit.load(d)
    ref_weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = {}
    out = fourbit.quantize(model, W4A16Config(group_size=32), report=report, progress=False)
    assert out is model and model.quant_config == W4A16Config(group_size=32)
    expected = {f"layers.{i}.{p}" for i in range(cfg["num_hidden_layers"]) for p in PROJECTIONS}
    swapped = {n for n, m in model.named_modules() if isinstance(m, W4A16Linear)}
    assert swapped == expected
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, ref_weights["lm_head"])
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    assert set(report) == expected
    for name, rel in report.items():
        w = ref_weights[name]
        layer = model.get_submodule(name)
        assert layer.group_size == 32 and not layer.sym
        assert rel == pytest.approx(float((layer.dequantize() - w).norm() / w.norm()), rel=1e-6)
        assert 0.04 < rel < 0.15, (name, rel)  # 4-bit g32 on Gaussian weights: ~8 %
    # the quantized model still runs and stays near the original (this random fixture amplifies weight error:
    # ~0.2-0.35 relative logit error for ~8 % weight error; two unrelated models would be ~1.4 apart)
    tok = _tok(cfg["vocab_size"], 0)
    with torch.no_grad():
        lq, lf = model(tok), fourbit.load(d)(tok)
    assert 0.0 < float((lq - lf).norm() / lf.norm()) < 0.6


def test_quantize_rejects_a_group_size_that_does_not_apply_before_swapping(hf_llama):
    d, _ = hf_llama
    model = fourbit.load(d)
    before = {n: type(m) for n, m in model.named_modules()}
    report = {}
    with pytest.raises(FourbitError, match=r"group size 128 does not apply to in_features=64"):
        fourbit.quantize(model, W4A16Config(group_size=128), report=report, progress=False)
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing swapped
    assert report == {} and not hasattr(model, "quant_config")
    with pytest.raises(FourbitError, match="W4A16Config"):
        fourbit.quantize(model, {"group_size": 32}, progress=False)


def _write_json_tokenizer(folder, vocab_size):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return Tokenizer(folder / "tokenizer.json")


@pytest.mark.parametrize("group_size,sym", [(32, False), (64, True), (-1, False)])
def test_save_load_round_trip(hf_llama, tmp_path, group_size, sym):
    d, cfg = hf_llama
    model = fourbit.quantize(fourbit.load(d), W4A16Config(group_size=group_size, sym=sym), progress=False)
    tokenizer = _write_json_tokenizer(tmp_path / "tok", cfg["vocab_size"])
    out = fourbit.save(model, tmp_path / "ckpt", tokenizer=tokenizer)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer.json").read_bytes() == tokenizer.path.read_bytes()
    assert (out / "tokenizer_config.json").read_bytes() == (tmp_path / "tok" / "tokenizer_config.json").read_bytes()
    reloaded_tok = Tokenizer(out)
    assert reloaded_tok.encode("w5 w7 w3", bos=True) == [1, 5, 7, 3] and reloaded_tok.eos_id == 2

    meta = json.loads((out / "config.json").read_text())
    assert meta["fourbit"]["format_version"] == 1
    assert meta["quantization_config"] == W4A16Config(group_size=group_size, sym=sym).to_dict()

    loaded = fourbit.load(out)
    assert loaded.quant_config == model.quant_config
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert {n for n, m in loaded.named_modules() if isinstance(m, W4A16Linear)} == \
           {n for n, m in model.named_modules() if isinstance(m, W4A16Linear)}
    tok = _tok(cfg["vocab_size"], 1)
    with torch.no_grad():
        assert torch.equal(loaded(tok), model(tok))


def test_save_unquantized_round_trip(hf_llama, tmp_path):
    d, cfg = hf_llama
    model = fourbit.load(d)
    out = fourbit.save(model, tmp_path / "fp")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not list(out.glob("tokenizer*"))
    loaded = fourbit.load(out)
    assert getattr(loaded, "quant_config", None) is None
    tok = _tok(cfg["vocab_size"], 2)
    with torch.no_grad():
        assert torch.equal(loaded(tok), model(tok))


def test_quick_v1_checkpoints_are_refused_with_the_fix():
    d = W4A16Config(group_size=32).to_dict()
    assert d["version"] == 2
    with pytest.raises(FourbitError, match="quantize the model again"):
        W4A16Config.from_dict({**d, "version": 1})
    with pytest.raises(FourbitError, match="upgrade fourbit"):
        W4A16Config.from_dict({**d, "version": 3})
