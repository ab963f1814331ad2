"""The fused layer kernels (kernels/fused.py) against their torch twins (on the GPU when there is one, else in
Triton's interpreter), the twins against textbook formulas, the custom ops' registrations, and fused projections
(nn/fuse.py): exactly the separate layers' outputs, layer by layer and for a whole real model.

Kernel and twin both compute in float32 and round once, so they may differ by one rounding of the output dtype
(summation order, FMA; the interpreter also casts float32 to bfloat16 by truncation): tolerances are one ulp,
far below what a wrong formula (swapped RoPE halves, a missing residual, a wrong slot) gives."""
import copy

import pytest
import torch
from torch import nn

import fourbit
from fourbit import ops
from fourbit.config import EngineConfig, SamplingParams, W4A16Config
from fourbit.engine.llm import LLM
from fourbit.errors import FourbitError
from fourbit.formats.quick import unpack_quick
from fourbit.formats.uint4 import quantize_groups
from fourbit.kernels import fused, ref
from fourbit.models.generate import generate
from fourbit.nn import W4A16Linear, fuse_projections_
from fourbit.nn.fuse import W4A16GatedLinear
from fourbit.nn.linear import SCALE_DTYPE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16]
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}  # relative spacing of the dtype's values


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(hash(key) % 2**31)


def _randn(shape, gen, dtype, scale=1.0):
    return (scale * torch.randn(shape, generator=gen)).to(DEVICE, dtype)


def _close(out, want):
    """Equal up to one rounding of the output dtype."""
    assert out.dtype == want.dtype and out.shape == want.shape
    torch.testing.assert_close(out.float(), want.float(), rtol=ULP[out.dtype], atol=1e-5)


# ---- the kernels against their twins --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 64), (7, 77), (16, 300), (3, 5, 1000), (2, 4100)])
def test_rms_norm(dtype, shape):
    gen = _gen("rms", shape)
    x, w = _randn(shape, gen, dtype, 3.0), _randn(shape[-1:], gen, torch.float32) + 1
    _close(fused.rms_norm(x, w, 1e-5), ref.rms_norm_ref(x, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 64), (7, 77), (3, 5, 1000)])
def test_add_rms_norm(dtype, shape):
    """The sum is x + residual rounded to x's dtype, and the norm is of that rounded sum."""
    gen = _gen("add", shape)
    x, r = _randn(shape, gen, dtype), _randn(shape, gen, dtype, 10.0)
    w = _randn(shape[-1:], gen, dtype) + 1
    normed, s = fused.add_rms_norm(x, r, w, 1e-6)
    _close(s, x + r)
    _close(normed, ref.rms_norm_ref(s, w, 1e-6))
    want_normed, want_s = ref.add_rms_norm_ref(x, r, w, 1e-6)
    assert torch.equal(want_s, x + r)
    _close(want_normed, ref.rms_norm_ref(want_s, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "rotate-half"])
@pytest.mark.parametrize("t,hq,hkv,d", [(1, 8, 4, 8), (7, 6, 2, 10), (33, 4, 4, 64), (5, 32, 8, 128)])
def test_rope(dtype, interleaved, t, hq, hkv, d):
    """q and k as views of one (T, (Hq + 2 Hkv)·D) qkv output, as the fused projection gives them."""
    gen = _gen("rope", interleaved, t, hq, d)
    qkv = _randn((t, (hq + 2 * hkv) * d), gen, dtype)
    q, k = qkv[:, :hq * d].view(t, hq, d), qkv[:, hq * d:(hq + hkv) * d].view(t, hkv, d)
    angles = torch.rand(t, d // 2, generator=gen) * 100
    cos, sin = angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)
    qo, ko = fused.rope(q, k, cos, sin, interleaved)
    qr, kr = ref.rope_ref(q, k, cos, sin, interleaved)
    _close(qo, qr)
    _close(ko, kr)
    assert qo.is_contiguous() and ko.is_contiguous()


def test_rope_float32_tables():
    """cos and sin may be float32 (they are upcast anyway)."""
    gen = _gen("rope32")
    q, k = _randn((9, 4, 16), gen, torch.float16), _randn((9, 2, 16), gen, torch.float16)
    angles = torch.rand(9, 8, generator=gen).to(DEVICE) * 10
    for interleaved in (True, False):
        out = fused.rope(q, k, angles.cos(), angles.sin(), interleaved)
        want = ref.rope_ref(q, k, angles.cos(), angles.sin(), interleaved)
        _close(out[0], want[0])
        _close(out[1], want[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,h", [(1, 172), (7, 1500), (33, 64), (2, 2049)])
def test_silu_mul_on_fused_halves(dtype, m, h):
    """gate and up as the strided halves of one (M, 2H) gate_up output, and as separate (B, T, H) tensors."""
    gen = _gen("silu", m, h)
    gate_up = _randn((m, 2 * h), gen, dtype, 4.0)
    gate, up = gate_up.chunk(2, dim=-1)
    _close(fused.silu_mul(gate, up), ref.silu_mul_ref(gate, up))
    gate, up = _randn((2, m, h), gen, dtype, 4.0), _randn((2, m, h), gen, dtype)
    _close(fused.silu_mul(gate, up), ref.silu_mul_ref(gate, up))


def _kv_case(t, hkv, d, d_stored, bs, dtype, src_dtype, gen):
    """t tokens at distinct random slots of NaN-poisoned caches; v a strided view of a qkv output."""
    num_blocks = -(-t // bs) + 2
    slots = torch.randperm(num_blocks * bs, generator=gen)[:t].to(DEVICE)
    k = _randn((t, hkv, d), gen, src_dtype)
    v = _randn((t, 3 * hkv, d), gen, src_dtype)[:, 2 * hkv:]
    caches = [torch.full((num_blocks, hkv, bs, d_stored), float("nan"), device=DEVICE, dtype=dtype)
              for _ in range(4)]
    return k, v, slots, caches


@pytest.mark.parametrize("dtype,src_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float32)], ids=["fp16", "bf16", "fp32-to-fp16"])
@pytest.mark.parametrize("t,hkv,d,d_stored,bs", [(1, 4, 8, 32, 16), (7, 3, 80, 128, 8), (37, 2, 64, 64, 16),
                                                 (5, 8, 128, 128, 32)])
def test_paged_kv_write(dtype, src_dtype, t, hkv, d, d_stored, bs):
    gen = _gen("kv", t, hkv, d, bs)
    k, v, slots, (kc, vc, kc_ref, vc_ref) = _kv_case(t, hkv, d, d_stored, bs, dtype, src_dtype, gen)
    assert fused.paged_kv_write(k, v, kc, vc, slots) is None
    ref.paged_kv_write_ref(k, v, kc_ref, vc_ref, slots)
    torch.testing.assert_close(kc, kc_ref, rtol=0, atol=0, equal_nan=True)  # a cast: bit-exact
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype,src_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float32)], ids=["fp16", "bf16", "fp32-to-fp16"])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "rotate-half"])
@pytest.mark.parametrize("t,hq,hkv,d,d_stored,bs", [(1, 8, 4, 8, 32, 16), (7, 6, 3, 80, 128, 8),
                                                    (37, 4, 2, 64, 64, 16), (5, 32, 8, 128, 128, 32)])
def test_rope_paged_kv_write(dtype, src_dtype, interleaved, t, hq, hkv, d, d_stored, bs):
    """The one-launch rope + KV write equals rope, then paged_kv_write of the rotated k: q and the cached k within
    one rounding (the rotation), v and the zero columns exact, every other slot untouched (NaN)."""
    gen = _gen("rope-kv", interleaved, t, hq, d)
    k, v, slots, (kc, vc, kc_ref, vc_ref) = _kv_case(t, hkv, d, d_stored, bs, dtype, src_dtype, gen)
    q = _randn((t, hq, d), gen, dtype)
    angles = torch.rand(t, d // 2, generator=gen) * 100
    cos, sin = angles.cos().to(DEVICE, src_dtype), angles.sin().to(DEVICE, src_dtype)
    qo = fused.rope_paged_kv_write(q, k, v, cos, sin, interleaved, kc, vc, slots)
    _close(qo, ref.rope_paged_kv_write_ref(q, k, v, cos, sin, interleaved, kc_ref, vc_ref, slots))
    assert torch.isnan(kc).sum() == torch.isnan(kc_ref).sum() > 0
    _close(kc.nan_to_num(), kc_ref.nan_to_num())
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0, equal_nan=True)


# ---- the twins against textbook formulas (float64) -------------------------------------------------------------

def test_references_match_the_formulas():
    gen = _gen("formulas")
    x, r, w = (torch.randn(5, 24, generator=gen, dtype=torch.float64) for _ in range(3))
    want = x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w
    torch.testing.assert_close(ref.rms_norm_ref(x, w, 1e-5), want, rtol=1e-12, atol=0)
    normed, s = ref.add_rms_norm_ref(x, r, w, 1e-5)
    torch.testing.assert_close(normed, ref.rms_norm_ref(x + r, w, 1e-5), rtol=1e-12, atol=0)
    assert torch.equal(s, x + r)
    torch.testing.assert_close(ref.silu_mul_ref(x, r), x * torch.sigmoid(x) * r, rtol=1e-12, atol=1e-15)

    q, k = (torch.randn(6, h, 10, generator=gen, dtype=torch.float64) for h in (4, 2))
    theta = torch.rand(6, 5, generator=gen, dtype=torch.float64) * 50
    turn = torch.polar(torch.ones_like(theta), theta)[:, None, :]  # e^{iθ} (T, 1, D/2)
    pairs = torch.view_as_complex(q.reshape(6, 4, 5, 2).contiguous())  # interleaved: x[2i] + i·x[2i+1]
    got = ref.rope_ref(q, k, theta.cos(), theta.sin(), True)[0]
    torch.testing.assert_close(got, torch.view_as_real(pairs * turn).flatten(-2), rtol=1e-12, atol=1e-12)
    halves = torch.complex(q[..., :5], q[..., 5:]) * turn  # rotate-half: x[i] + i·x[i + D/2]
    got = ref.rope_ref(q, k, theta.cos(), theta.sin(), False)[0]
    torch.testing.assert_close(got, torch.cat((halves.real, halves.imag), -1), rtol=1e-12, atol=1e-12)


def test_paged_kv_write_reference_places_each_token():
    gen = _gen("kv-ref")
    k, v, slots, (kc, vc, _, _) = _kv_case(9, 2, 8, 32, 4, torch.float32, torch.float32, gen)
    ref.paged_kv_write_ref(k, v, kc, vc, slots)
    for cache, src in ((kc, k), (vc, v)):
        expect = torch.full_like(cache, float("nan"))
        for t, slot in enumerate(slots.tolist()):
            expect[slot // 4, :, slot % 4] = 0
            expect[slot // 4, :, slot % 4, :8] = src[t]
        torch.testing.assert_close(cache, expect, rtol=0, atol=0, equal_nan=True)


# ---- the custom ops --------------------------------------------------------------------------------------------

def test_ops_registrations():
    """Schemas, fake implementations (torch.compile, CUDA graphs) and the mutation of the caches, checked by torch."""
    gen = _gen("opcheck")
    x, r, w = (torch.randn(3, 40, generator=gen) for _ in range(3))
    q, k, cs = torch.randn(4, 4, 8, generator=gen), torch.randn(4, 2, 8, generator=gen), torch.rand(4, 4)
    kc, vc = torch.zeros(3, 2, 4, 32), torch.zeros(3, 2, 4, 32)
    cases = [(ops.rms_norm, (x, w[0], 1e-5)), (ops.add_rms_norm, (x, r, w[0], 1e-5)),
             (ops.rope, (q, k, cs.cos(), cs.sin(), True)), (ops.silu_mul, (x, r)),
             (ops.paged_kv_write, (k, k.clone(), kc, vc, torch.tensor([0, 5, 6, 11]))),
             (ops.rope_paged_kv_write, (q, k, k.clone(), cs.cos(), cs.sin(), False, kc, vc,
                                        torch.tensor([1, 2, 7, 9])))]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_errors_name_the_problem():
    x = torch.zeros(2, 8, dtype=torch.float16, device=DEVICE)
    with pytest.raises(FourbitError, match="weight"):
        fused.rms_norm(x, torch.ones(7, device=DEVICE), 1e-5)
    with pytest.raises(FourbitError, match="one shape"):
        fused.add_rms_norm(x, x[:1], torch.ones(8, device=DEVICE), 1e-5)
    with pytest.raises(FourbitError, match="even D"):
        fused.rope(x.view(2, 1, 8)[..., :7], x.view(2, 1, 8)[..., :7], x[:, :3], x[:, :3], True)
    with pytest.raises(FourbitError, match="cos and sin"):
        fused.rope(x.view(2, 1, 8), x.view(2, 1, 8), x[:, :3], x[:, :3], True)
    with pytest.raises(FourbitError, match="one shape"):
        fused.silu_mul(x, x[:, :4])
    cache = torch.zeros(2, 1, 4, 4, dtype=torch.float16, device=DEVICE)
    with pytest.raises(FourbitError, match=">= D"):
        fused.paged_kv_write(x.view(2, 1, 8), x.view(2, 1, 8), cache, cache.clone(), torch.zeros(2, device=DEVICE))


# ---- fused projections ------------------------------------------------------------------------------------------

class _Holder(nn.Module):
    """A module that declares a fusable group, as models/llama.Attention does."""
    FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}

    def __init__(self, parts):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = parts


def _w4a16(n, k, group_size, sym, bias, gen, perm=False):
    codes, scales, zeros = quantize_groups(torch.randn(n, k, generator=gen), group_size, sym, SCALE_DTYPE)
    b = torch.randn(n, generator=gen) if bias else None
    p = perm if torch.is_tensor(perm) else torch.randperm(k, generator=gen).int() if perm else None
    return W4A16Linear.from_codes(codes, scales, zeros, group_size, k, b, p)


def _fused_equals_separate(parts, m_values=(1, 7, 16, 128)):
    holder = _Holder(parts)
    k = parts[0].in_features
    xs = [torch.randn(m, k, generator=_gen("x", m)) for m in m_values]
    with torch.inference_mode():
        want = [[p(x) for p in parts] for x in xs]
        assert fuse_projections_(holder) is holder
        assert set(holder._modules) == {"qkv_proj"}  # the separate layers are gone
        for x, w in zip(xs, want):
            got = holder.qkv_proj(x).split([p.out_features for p in parts], dim=-1)
            assert all(torch.equal(g, e) for g, e in zip(got, w))
    return holder


@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_is_exact(bias):
    torch.manual_seed(0)
    parts = [nn.Linear(96, n, bias=bias) for n in (96, 32, 32)]
    numel = sum(p.numel() for part in parts for p in part.parameters())
    holder = _fused_equals_separate(parts)
    assert sum(p.numel() for p in holder.parameters()) == numel
    fused_layer = holder.qkv_proj
    fuse_projections_(holder)  # idempotent
    assert holder.qkv_proj is fused_layer


def test_fusing_under_inference_mode_leaves_normal_weights():
    """The engine may fuse inside torch.inference_mode; the model must still run with autograd on afterwards."""
    holder = _Holder([nn.Linear(16, n) for n in (16, 16, 16)])
    with torch.inference_mode():
        fuse_projections_(holder)
    assert not holder.qkv_proj.weight.is_inference() and holder.qkv_proj.weight.requires_grad
    holder.qkv_proj(torch.randn(2, 16)).sum().backward()


@pytest.mark.parametrize("group_size,sym,bias", [(32, False, False), (64, True, True), (-1, False, False)])
def test_fused_w4a16_is_exact(group_size, sym, bias):
    """Through the torch reference path (CPU, float32 activations); the last part need not fill its tiles."""
    gen = _gen("w4a16", group_size, sym)
    parts = [_w4a16(n, 200, group_size, sym, bias, gen) for n in (64, 32, 40)]
    fused_layer = _fused_equals_separate(parts).qkv_proj
    assert type(fused_layer) is W4A16Linear and fused_layer.out_features == 136
    assert fused_layer.qweight.shape == (9, 512) and fused_layer.scales.shape[1] == 136


def test_fused_w4a16_shared_permutation_is_exact():
    """Act-order parts with one input permutation fuse, keeping it: one gather of X serves q/k/v."""
    gen = _gen("w4a16-perm")
    perm = torch.randperm(200, generator=gen).int()
    parts = [_w4a16(n, 200, 32, False, False, gen, perm) for n in (64, 32, 32)]
    assert torch.equal(_fused_equals_separate(parts).qkv_proj.perm, perm)


class _GatedHolder(nn.Module):
    """A module that declares a gated fusion, as models/llama.MLP does."""
    FUSED = {"gate_up_proj": ("gate_proj", "up_proj")}
    GATED = {"gate_up_proj"}

    def __init__(self, parts):
        super().__init__()
        self.gate_proj, self.up_proj = parts


@pytest.mark.parametrize("group_size,sym,bias,perm", [(32, False, False, False), (64, True, True, False),
                                                      (-1, False, True, True)])
def test_gated_w4a16_is_exact(group_size, sym, bias, perm):
    """gate and up fused as one layer returning silu(gate) · up: through the torch reference path (CPU), exactly
    the separate layers' outputs through silu_mul, in float32 and bfloat16; 40 rows do not fill a 16-row tile
    but do fill the 8-row halves the gated layout pairs."""
    gen = _gen("gated", group_size, sym, bias)
    p = torch.randperm(200, generator=gen).int() if perm else False
    parts = [_w4a16(40, 200, group_size, sym, bias, gen, p) for _ in range(2)]
    holder = fuse_projections_(_GatedHolder(parts))
    fused_layer = holder.gate_up_proj
    assert set(holder._modules) == {"gate_up_proj"} and type(fused_layer) is W4A16GatedLinear
    assert fused_layer.qweight.shape == (5, 512) and fused_layer.scales.shape[1] == 80
    blocks = unpack_quick(fused_layer.qweight, 80, 200).view(5, 2, 8, 200)  # 8 gate rows, then their 8 up rows
    for half, part in enumerate(parts):
        assert torch.equal(blocks[:, half], unpack_quick(part.qweight, 40, 200).view(5, 8, 200))
        assert torch.equal(fused_layer.scales.view(-1, 5, 2, 8)[:, :, half], part.scales.view(-1, 5, 8))
    for dtype in (torch.float32, torch.bfloat16):
        for m in (1, 7, 33):
            x = torch.randn(2, m, 200, generator=_gen("gated-x", m)).to(dtype)
            with torch.inference_mode():
                want = ops.silu_mul(parts[0](x), parts[1](x))
                got = fused_layer(x)
            assert got.shape == (2, m, 40) and torch.equal(got, want)


def test_ungateable_pairs_stay_plain():
    """Gated fusion needs two W4A16 parts of one size in whole 8-row blocks; otherwise plain stacking (or none)."""
    gen = _gen("ungated")
    unequal = fuse_projections_(_GatedHolder([_w4a16(n, 128, 32, False, False, gen) for n in (32, 48)]))
    assert type(unequal.gate_up_proj) is W4A16Linear
    odd = fuse_projections_(_GatedHolder([_w4a16(36, 128, 32, False, False, gen) for _ in range(2)]))
    assert set(odd._modules) == {"gate_proj", "up_proj"}
    floats = fuse_projections_(_GatedHolder([nn.Linear(128, 48) for _ in range(2)]))
    assert type(floats.gate_up_proj) is nn.Linear


def test_gated_model_same_logits():
    """A W4A16 model whose MLP hidden size fills 8-row blocks (96): its fused model, with gate/up gated, gives the
    same logits, prefill and cached decode."""
    from test_gptq import tiny_llama

    model = fourbit.quantize_(tiny_llama(3), W4A16Config(group_size=32), progress=False)
    fused_model = fuse_projections_(copy.deepcopy(model))
    assert all(type(b.mlp.gate_up_proj) is W4A16GatedLinear for b in fused_model.layers)
    _assert_same_logits(model, fused_model, torch.randint(0, 96, (3, 20), generator=_gen("gated-tokens")))


class _OtherLinear(nn.Linear):
    """Stands for a Linear type fusion does not know (another quantized layer)."""


def test_unfusable_groups_stay_separate():
    """Never an error: each group below differs in one way that stacking could not keep exact."""
    gen = _gen("unfusable")

    def w4(n=32, group_size=32, sym=False, perm=False):
        return _w4a16(n, 128, group_size, sym, False, gen, perm)

    cases = {
        "group sizes": [w4(), w4(group_size=64), w4()],
        "sym": [w4(sym=True), w4(), w4()],
        "different permutations": [w4(perm=True), w4(perm=True), w4(perm=True)],
        "partial tile": [w4(n=40), w4(), w4()],
        "mixed types": [nn.Linear(128, 32), w4(), nn.Linear(128, 32)],
        "dtypes": [nn.Linear(128, 32), nn.Linear(128, 32).half(), nn.Linear(128, 32)],
        "bias": [nn.Linear(128, 32), nn.Linear(128, 32, bias=False), nn.Linear(128, 32)],
        "other linear": [_OtherLinear(128, 32), _OtherLinear(128, 32), _OtherLinear(128, 32)],
    }
    for name, parts in cases.items():
        holder = fuse_projections_(_Holder(parts))
        assert set(holder._modules) == {"q_proj", "k_proj", "v_proj"}, name


@pytest.fixture(scope="module")
def stories(realdata):
    return fourbit.load(realdata / "stories260K.bin", torch.float32, "cpu")


def _assert_same_logits(model, fused_model, tokens):
    """Bit-equal logits: a prefill without cache, then one cached decode step after a cached prefill."""
    b, t = tokens.shape
    with torch.inference_mode():
        assert torch.equal(fused_model(tokens), model(tokens))
        caches = [m.new_cache(b, t + 3) for m in (model, fused_model)]
        for m, cache in zip((model, fused_model), caches):
            m(tokens, cache)
        step = [m(tokens[:, :1], cache, start=t) for m, cache in zip((model, fused_model), caches)]
        assert torch.equal(step[0], step[1])


def test_fused_model_same_logits(stories, realdata):
    """stories260K in float32 on the CPU: the same logits with fused projections, prefill and cached decode; after
    W4A16 quantization too (q/k/v fuse; gate/up of 172 rows do not fill 16-row tiles and stay separate)."""
    tokens = torch.randint(0, 512, (3, 37), generator=_gen("tokens"))
    w4 = fourbit.quantize_(copy.deepcopy(stories), W4A16Config(group_size=32), progress=False)
    for model in (stories, w4):
        _assert_same_logits(model, fuse_projections_(copy.deepcopy(model)), tokens)
    block = fuse_projections_(w4).layers[0]
    assert "qkv_proj" in block.self_attn._modules and "gate_proj" in block.mlp._modules


def test_fused_model_refuses_save_export_quantize(stories, tmp_path):
    """Checkpoints and quantizers name the separate projections: a model fused for serving says so instead."""
    fused_model = fuse_projections_(copy.deepcopy(stories))
    calls = {"saving": lambda: fourbit.save(fused_model, tmp_path / "a"),
             "exporting": lambda: fourbit.export(fused_model, tmp_path / "b"),
             "quantizing": lambda: fourbit.quantize_(fused_model, W4A16Config(), progress=False)}
    for action, call in calls.items():
        with pytest.raises(FourbitError, match=f"{action} needs the separate"):
            call()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_fused_model_in_the_engine(stories, realdata):
    """The serving engine's paged path (q/k/v views into the KV write) on a fused model: greedy tokens equal the
    unfused model's generate."""
    tok = fourbit.Tokenizer(realdata / "tok512.model")
    prompts = [[1] + tok.encode("Once upon a time"), [1], [1] + tok.encode("The cat sat on the mat and")]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    llm = LLM(fuse_projections_(copy.deepcopy(stories)), tok, EngineConfig(block_size=8))
    outs = llm.generate(prompts, params, progress=False)
    assert [o.token_ids for o in outs] == [generate(stories, [p], params)[0] for p in prompts]
