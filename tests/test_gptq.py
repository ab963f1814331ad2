"""GPTQ: the per-layer core against a slow independent reference, its objective against RTN's, and GPTQ through
quantize_ on fourbit's LlamaModel (block by block, true sequential) and on a generic torch module."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fourbit
from fourbit.config import ModelConfig, W4A16Config
from fourbit.errors import FourbitError
from fourbit.formats.uint4 import dequantize_groups, group_params, quantize_groups, quantize_with
from fourbit.models.llama import LlamaModel
from fourbit.nn.linear import SCALE_DTYPE, W4A16Linear
from fourbit.quantize.gptq import gptq_quantize

GROUPS = [32, 64, -1]


def _problem(n, k, seed, rows=512):
    """A weight (N, K) and calibration inputs X (rows, K) with correlated channels of unequal size, and H."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, k, generator=g) @ torch.randn(k, k, generator=g) * 0.2
    X = X * torch.logspace(-1, 1, k)[torch.randperm(k, generator=g)] + torch.randn(k, generator=g)
    W = torch.randn(n, k, generator=g)
    return W, X, 2 * X.t() @ X / rows


def _objective(X, W, Wq) -> float:
    return float((X.double() @ (W.double() - Wq.double()).t()).pow(2).sum())


def _reference_gptq(W, H, group_size, sym, act_order, damp=0.01):
    """Optimal Brain Quantization, column at a time, float64, with the explicit inverse Hessian of the columns
    not yet quantized (eliminating each quantized column from it), no blocks, no Cholesky: the formulation
    GPTQ's Cholesky trick is derived from. Same group conventions as fourbit (formats/uint4.py)."""
    W, H = W.double().clone(), H.double().clone()
    n, k = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    gs = k if group_size == -1 else group_size
    static = group_size == -1 or act_order
    if static:
        _, s_all, z_all = quantize_groups(W.float(), group_size, sym, SCALE_DTYPE)
        S, Z = s_all.double(), (torch.full_like(s_all, 8).double() if z_all is None else z_all.double())
    else:
        S, Z = torch.zeros(n, -(-k // gs), dtype=torch.float64), torch.zeros(n, -(-k // gs), dtype=torch.float64)
    Hinv = torch.linalg.inv(H + damp * torch.diag(H).mean() * torch.eye(k, dtype=torch.float64))
    order = torch.argsort(torch.diag(H), descending=True).tolist() if act_order else range(k)
    codes = torch.zeros(n, k, dtype=torch.uint8)
    for j in order:
        if not static and j % gs == 0:
            s, z = group_params(W[:, j:j + gs].float(), sym, SCALE_DTYPE)
            S[:, j // gs], Z[:, j // gs] = s.double(), z.double()
        s, z = S[:, j // gs], Z[:, j // gs]
        q = quantize_with(W[:, j], s, z)
        codes[:, j] = q.to(torch.uint8)
        err = (W[:, j] - (q - z) * s) / Hinv[j, j]
        W -= err[:, None] * Hinv[j][None, :]  # the OBS update of every column not yet quantized
        Hinv -= Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]  # eliminate column j
    return codes, S, Z


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", GROUPS)
def test_gptq_matches_slow_reference(group_size, sym, act_order):
    # K = 300: three blocks of 128 (the last partial), a partial last group; one dead input channel
    W, X, H = _problem(24, 300, seed=group_size % 7 + 2 * sym + act_order)
    X[:, 17] = 0
    H = 2 * X.t() @ X / X.shape[0]
    codes, scales, zeros = gptq_quantize(W, H.double(), group_size, sym, act_order)
    ref_codes, ref_s, ref_z = _reference_gptq(W, H, group_size, sym, act_order)
    k = W.shape[1]
    assert codes.dtype == torch.uint8 and scales.dtype == SCALE_DTYPE and (zeros is None) == sym
    assert torch.equal(codes[:, :k], ref_codes)
    assert torch.equal(scales.double(), ref_s)
    if not sym:
        assert torch.equal(zeros.double(), ref_z)


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("group_size", GROUPS)
def test_gptq_beats_rtn_on_its_objective(group_size, act_order):
    W, X, H = _problem(64, 172, seed=11)  # 172: not a multiple of any group size
    codes, scales, zeros = gptq_quantize(W, H, group_size, False, act_order)
    rtn_codes, rtn_s, rtn_z = quantize_groups(W, group_size, False, SCALE_DTYPE)
    assert codes.shape == rtn_codes.shape and scales.shape == rtn_s.shape and zeros.shape == rtn_z.shape
    gptq = _objective(X, W, dequantize_groups(codes, scales, zeros, group_size, 172))
    rtn = _objective(X, W, dequantize_groups(rtn_codes, rtn_s, rtn_z, group_size, 172))
    assert gptq < 0.8 * rtn, (gptq, rtn)
    # and the result drops straight into the layer, as RTN's does
    layer = W4A16Linear.from_codes(codes, scales, zeros, group_size, 172)
    assert torch.equal(layer.dequantize(), dequantize_groups(codes, scales, zeros, group_size, 172))


def test_act_order_static_groups_are_contiguous():
    """With act-order each group's scale is the RTN scale of that contiguous group of the original weight."""
    W, X, H = _problem(16, 128, seed=5)
    _, scales, zeros = gptq_quantize(W, H, 32, False, act_order=True)
    _, rtn_s, rtn_z = quantize_groups(W, 32, False, SCALE_DTYPE)
    assert torch.equal(scales, rtn_s) and torch.equal(zeros, rtn_z)


def test_gptq_inputs_are_checked_and_untouched():
    W, X, H = _problem(8, 64, seed=1)
    W0, H0 = W.clone(), H.clone()
    gptq_quantize(W, H, 32, False, True)
    assert torch.equal(W, W0) and torch.equal(H, H0)
    with pytest.raises(FourbitError, match="Hessian"):
        gptq_quantize(W, H[:32, :32], 32, False)
    with pytest.raises(FourbitError, match="group size"):
        gptq_quantize(W, H, 48, False)
    with pytest.raises(FourbitError, match="act_order"):
        W4A16Config(algo="awq", act_order=True)
    assert W4A16Config.from_dict({"scheme": "w4a16", "format": "quick", "version": 2, "group_size": 64,
                                  "sym": False, "algo": "rtn"}).act_order is False  # a dict from before act_order
    cfg = W4A16Config(group_size=32, algo="gptq", act_order=True)
    assert W4A16Config.from_dict(cfg.to_dict()) == cfg


# ---- through quantize_ ---------------------------------------------------------------------------------

TINY = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64)


def tiny_llama(seed: int, config: ModelConfig = TINY) -> LlamaModel:
    """Random LlamaModel with a few input channels of the norms scaled up (activation outliers, as in real LLMs)."""
    torch.manual_seed(seed)
    model = LlamaModel(config).eval()
    with torch.no_grad():
        for layer in model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.mul_(1 + 9 * (torch.rand(config.dim) < 0.1))
    return model


def _linear_inputs(model, tokens, names):
    """{name: X (rows, K)} the inputs the named Linears see when the model runs on tokens."""
    seen = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0]))
             for n in names]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return {n: torch.cat([x.reshape(-1, x.shape[-1]) for x in v]) for n, v in seen.items()}


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("group_size", [32, -1])
def test_quantize_gptq_llama_beats_rtn(group_size, act_order):
    model = tiny_llama(0)
    tokens = fourbit.calib_tokens(None, nsamples=8, seqlen=48, seed=1, vocab_size=TINY.vocab_size)
    first = ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj"]
    X = _linear_inputs(model, tokens, first)  # block 0's q, k, v see the same inputs under every algorithm
    with torch.no_grad():
        ref = model(tokens)
    W = {n: model.get_submodule(n).weight.detach().clone() for n in first}
    errors = {}
    for algo in ("rtn", "gptq"):
        q = tiny_llama(0)
        report = {}
        cfg = W4A16Config(group_size=group_size, algo=algo, act_order=act_order and algo == "gptq")
        fourbit.quantize_(q, cfg, calib=tokens, progress=False, report=report)
        assert set(report) == {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} - {"lm_head"}
        assert isinstance(q.lm_head, nn.Linear) and q.quant_config == cfg
        layers = {n: _objective(X[n], W[n], q.get_submodule(n).dequantize()) for n in first}
        with torch.no_grad():
            out = float((q(tokens) - ref).pow(2).mean())
        errors[algo] = layers, out
    for n in first:
        assert errors["gptq"][0][n] < errors["rtn"][0][n], (n, errors)
    assert errors["gptq"][1] < errors["rtn"][1], errors  # the logits on the calibration tokens, too


def test_quantize_gptq_generic_module():
    """A plain MLP (not a fourbit model): hooks on its Linears, calibration given as a list of input tensors."""
    torch.manual_seed(3)
    mlp = nn.Sequential(nn.Linear(64, 160), nn.GELU(), nn.Linear(160, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    mlp[0].weight.data[:, :4] *= 8  # a few strong input channels
    calls = [torch.randn(256, 64) * torch.logspace(0, 1, 64) for _ in range(4)]
    X = torch.cat(calls)
    rtn = fourbit.quantize_(_clone(mlp), W4A16Config(group_size=32), progress=False)
    skip_last = lambda name, m: name != "4"  # noqa: E731
    gptq = fourbit.quantize_(_clone(mlp), W4A16Config(group_size=32, algo="gptq"), calib=calls, filter=skip_last,
                             progress=False)
    assert isinstance(gptq[0], W4A16Linear) and isinstance(gptq[2], W4A16Linear) and type(gptq[4]) is nn.Linear
    W0 = mlp[0].weight.detach()
    assert _objective(X, W0, gptq[0].dequantize()) < _objective(X, W0, rtn[0].dequantize())
    with torch.no_grad():
        ref = mlp(X)
        assert float((gptq(X) - ref).pow(2).mean()) < float((rtn(X) - ref).pow(2).mean())
    # the small Hessian budget makes one pass per layer: the same layers get quantized
    one_by_one = _clone(mlp)
    from fourbit.quantize.gptq import gptq_module

    with torch.no_grad():
        gptq_module(one_by_one, ["0", "2", "4"], W4A16Config(group_size=32, algo="gptq"),
                    [((x,), {}) for x in calls], progress=False, budget=1)
    assert all(isinstance(one_by_one[i], W4A16Linear) for i in (0, 2, 4))


def _clone(module):
    import copy

    return copy.deepcopy(module)


def test_quantize_errors():
    mlp = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(FourbitError, match="calib"):
        fourbit.quantize_(_clone(mlp), W4A16Config(group_size=32, algo="gptq"))
    with pytest.raises(FourbitError, match="AWQ.*gptq"):
        fourbit.quantize_(_clone(mlp), W4A16Config(group_size=32, algo="awq"), calib=[torch.randn(4, 64)])
    with pytest.raises(FourbitError, match="calib"):
        fourbit.quantize_(_clone(mlp), W4A16Config(group_size=32, algo="gptq"), calib=torch.randn(4, 64))
    unused = nn.ModuleDict({"a": nn.Linear(64, 64), "b": nn.Linear(64, 64)})
    unused.forward = lambda x: unused["a"](x)
    with pytest.raises(FourbitError, match="never ran"):
        fourbit.quantize_(unused, W4A16Config(group_size=32, algo="gptq"), calib=[torch.randn(4, 64)])
    model = tiny_llama(0)
    with pytest.raises(FourbitError, match="lm_head"):
        fourbit.quantize_(model, W4A16Config(group_size=32, algo="gptq"), calib=torch.zeros(2, 8, dtype=torch.long),
                          filter=lambda n, m: True)
    with pytest.raises(FourbitError, match="integer tensor"):
        fourbit.quantize_(model, W4A16Config(group_size=32, algo="gptq"), calib=[torch.zeros(8, dtype=torch.long)])
    with pytest.raises(FourbitError, match="context"):
        fourbit.quantize_(model, W4A16Config(group_size=32, algo="gptq"), calib=torch.zeros(2, 65, dtype=torch.long))


def test_quantize_gptq_hf_llama():
    """A tiny random Hugging Face LlamaForCausalLM (when transformers is installed): GPTQ through the generic path."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (8, 32))
    with torch.no_grad():
        ref = model(ids).logits
    rtn = fourbit.quantize_(_clone(model), W4A16Config(group_size=32), progress=False)
    gptq = fourbit.quantize_(model, W4A16Config(group_size=32, algo="gptq"), calib=ids, progress=False)
    linears = {n: type(m) for n, m in gptq.named_modules() if isinstance(m, (nn.Linear, W4A16Linear))}
    assert linears.pop("lm_head") is nn.Linear
    assert len(linears) == 2 * 7 and set(linears.values()) == {W4A16Linear}
    with torch.no_grad():
        err_gptq = float((gptq(ids).logits - ref).pow(2).mean())
        err_rtn = float((rtn(ids).logits - ref).pow(2).mean())
    assert err_gptq < err_rtn
