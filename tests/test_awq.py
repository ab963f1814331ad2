"""AWQ: folding scales leaves the float model unchanged, the searches never do worse than doing nothing, and the
quantized block's output is closer to the float block's than RTN's on the calibration inputs."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fourbit
from fourbit.config import ModelConfig, W4A16Config
from fourbit.formats.uint4 import group_length
from fourbit.nn.linear import W4A16Linear
from fourbit.quantize.awq import apply_scale, fake_quant, llama_groups, search_clip
from fourbit.quantize.calib import block_outputs, capture_block_inputs

from test_gptq import TINY, tiny_llama

MHA = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=96, max_seq_len=64)


def test_groups_follow_the_llama_block():
    gqa, mha = tiny_llama(0, TINY).layers[0], tiny_llama(0, MHA).layers[0]
    assert [g.prev for g in llama_groups(mha)] == ["input_layernorm", "self_attn.v_proj",
                                                   "post_attention_layernorm", "mlp.up_proj"]
    # with GQA one v row feeds several o columns: no v -> o scaling
    assert [g.prev for g in llama_groups(gqa)] == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]


@pytest.mark.parametrize("config", [TINY, MHA], ids=["gqa", "mha"])
def test_folded_scales_leave_the_float_model_unchanged(config):
    model = tiny_llama(1, config)
    tokens = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(tokens)
        for block in model.layers:
            for group in llama_groups(block):
                k = block.get_submodule(group.linears[0]).in_features
                apply_scale(block, group, torch.rand(k) * 4 + 0.25)
        got = model(tokens)
    assert float((got - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", [32, -1])
def test_clip_search_never_worse_than_no_clip(group_size, sym):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(48, 96, generator=g)
    w[torch.rand(48, 96, generator=g) < 0.02] *= 6  # outliers make clipping worthwhile
    x = torch.randn(256, 96, generator=g)
    m = search_clip(w, x, group_size, sym)  # (N, G)
    gs = group_length(96, group_size)
    assert m.shape == (48, 96 // gs)
    full = w.abs().reshape(48, -1, gs).amax(-1)
    assert (m <= full).all() and (m >= 0.5 * full - 1e-6).all() and (m < full).any()
    clipped = w.clamp(-m.repeat_interleave(gs, 1), m.repeat_interleave(gs, 1))

    def group_err(wq):  # per-group partial-output MSE, the search's objective, summed
        d = (w - wq).reshape(48, -1, gs)
        return float(torch.einsum("tgj,ngj->ntg", x.reshape(256, -1, gs), d).pow(2).sum())

    assert group_err(fake_quant(clipped, group_size, sym)) < group_err(fake_quant(w, group_size, sym))


def _block_output_mse(model, quantized, tokens) -> float:
    """MSE of block 0's output, quantized vs float, on the calibration tokens (both see the same inputs)."""
    inputs = capture_block_inputs(model, tokens)
    with torch.no_grad():
        ref = torch.cat(block_outputs(inputs.run(model.layers[0], keep=True)))
        got = torch.cat(block_outputs(inputs.run(quantized.layers[0], keep=True)))
    return float((got - ref).pow(2).mean())


@pytest.mark.parametrize("config", [TINY, MHA], ids=["gqa", "mha"])
@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_awq_block_output_beats_rtn(config, group_size):
    model = tiny_llama(2, config)
    tokens = fourbit.calib_tokens(None, nsamples=8, seqlen=32, seed=0, vocab_size=config.vocab_size)
    out = {}
    for algo in ("rtn", "awq"):
        q = copy.deepcopy(model)
        report = {}
        fourbit.quantize_(q, W4A16Config(group_size=group_size, algo=algo), calib=tokens, progress=False,
                          report=report)
        assert len(report) == 7 * config.n_layers and all(0 < e < 0.3 for e in report.values()), report
        out[algo] = _block_output_mse(model, q, tokens)
    assert out["awq"] < out["rtn"], out


def test_awq_respects_the_filter():
    model = tiny_llama(3, MHA)
    tokens = fourbit.calib_tokens(None, nsamples=4, seqlen=32, seed=0, vocab_size=MHA.vocab_size)
    with torch.no_grad():
        ref = model(tokens)
    keep_k = lambda name, m: not name.endswith(("k_proj", "lm_head"))  # noqa: E731
    errors = {}
    for algo in ("rtn", "awq"):
        q = fourbit.quantize_(copy.deepcopy(model), W4A16Config(group_size=32, algo=algo), calib=tokens,
                              filter=keep_k, progress=False)
        for block in q.layers:
            assert type(block.self_attn.k_proj) is nn.Linear  # AWQ scaled its columns but did not quantize it
            assert isinstance(block.self_attn.q_proj, W4A16Linear) and isinstance(block.mlp.down_proj, W4A16Linear)
        with torch.no_grad():
            errors[algo] = float((q(tokens) - ref).norm() / ref.norm())
    assert errors["awq"] < errors["rtn"], errors  # (a random 64-wide model is fragile: RTN's error is ~25 %)
