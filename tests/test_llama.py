"""The Llama runtime: RoPE layouts, the KV cache, batched left-padded generation, EOS, sampling, limits."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fourbit.config import ModelConfig, SamplingParams
from fourbit.errors import FourbitError
from fourbit.models.generate import generate, sample
from fourbit.models.llama import LlamaModel
from fourbit.models.loader import build

BASE = ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=80, max_seq_len=64,
                   eos_ids=())


def _seed() -> int:
    """A fresh seed per run, printed by pytest on failure through the test's assertion messages."""
    return int(torch.randint(0, 2**31 - 1, ()).item())


def random_tensors(config: ModelConfig, seed: int) -> dict:
    """Random float64 weights for every tensor of LlamaModel(config): O(1) logits, attention far from uniform."""
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in LlamaModel(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            out[name] = 1 + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
        elif name == "embed_tokens.weight":
            out[name] = 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 1
            out[name] = torch.randn(shape, generator=g, dtype=torch.float64) * (1.2 / fan_in ** 0.5)
    return out


def make_model(config: ModelConfig = BASE, seed: int = 0, dtype=torch.float64, tensors=None) -> LlamaModel:
    return build(config, tensors if tensors is not None else random_tensors(config, seed), dtype, "cpu")


def _tokens(config, shape, seed):
    return torch.randint(0, config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


# ---- RoPE layouts --------------------------------------------------------------------------------

def interleaved_to_half(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a q/k projection for interleaved RoPE -> rows for rotate_half: per head, even rows then odd rows."""
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])  # (D,)
    rows = (torch.arange(n_heads)[:, None] * head_dim + order).reshape(-1)  # (H * D,)
    return w[rows]


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True}, {"n_kv_heads": 4, "head_dim": 16}],
                         ids=["gqa", "qkv-bias", "mha-head16"])
def test_rope_interleaved_equals_rotate_half_after_permutation(overrides):
    seed = _seed()
    cfg_i = dataclasses.replace(BASE, rope_interleaved=True, **overrides)
    cfg_h = dataclasses.replace(cfg_i, rope_interleaved=False)
    t_i = random_tensors(cfg_i, seed)
    t_h = dict(t_i)
    for name in t_i:
        if ".q_proj." in name:
            t_h[name] = interleaved_to_half(t_i[name], cfg_i.n_heads, cfg_i.head_dim)
        elif ".k_proj." in name:
            t_h[name] = interleaved_to_half(t_i[name], cfg_i.n_kv_heads, cfg_i.head_dim)
    m_i, m_h = make_model(cfg_i, tensors=t_i), make_model(cfg_h, tensors=t_h)
    tok = _tokens(BASE, (2, 20), seed)
    with torch.no_grad():
        li, lh = m_i(tok), m_h(tok)
        unpermuted = make_model(cfg_h, tensors=t_i)(tok)
    assert li.dtype == torch.float64 and li.shape == (2, 20, BASE.vocab_size)
    err = float((li - lh).abs().max() / li.abs().max())
    assert err < 1e-10, f"seed {seed}: rel err {err:.3e}"
    # the permutation matters: the same weights under the other layout give other logits
    assert float((li - unpermuted).abs().max()) > 1e-3, f"seed {seed}"


# ---- KV cache ------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 5], ids=["causal", "window5"])
@pytest.mark.parametrize("chunks", [(7,), (4, 3)], ids=["prefill", "chunked-prefill"])
def test_kv_cache_decode_matches_full_forward(window, chunks):
    seed = _seed()
    cfg = dataclasses.replace(BASE, sliding_window=window)
    model = make_model(cfg, seed)
    B, T = 3, 19
    tok = _tokens(cfg, (B, T), seed)
    with torch.no_grad():
        full = model(tok)  # (B, T, V)
        cache = model.new_cache(B, T)
        parts, pos = [], 0
        for n in chunks:  # prefill, possibly in chunks
            parts.append(model(tok[:, pos:pos + n], cache, pos))
            pos += n
        while pos < T:  # decode one token at a time
            parts.append(model(tok[:, pos:pos + 1], cache, pos))
            pos += 1
    inc = torch.cat(parts, dim=1)
    assert inc.shape == full.shape
    err = float((inc - full).abs().max() / full.abs().max())
    assert err < 1e-12, f"seed {seed}: rel err {err:.3e}"


def test_sliding_window_is_applied():
    """A window shorter than the sequence must change late logits and leave the first `window` positions alone."""
    seed = _seed()
    t = random_tensors(BASE, seed)
    tok = _tokens(BASE, (2, 16), seed)
    with torch.no_grad():
        a = make_model(dataclasses.replace(BASE, sliding_window=5), tensors=t)(tok)
        b = make_model(BASE, tensors=t)(tok)
    assert torch.allclose(a[:, :5], b[:, :5], rtol=0, atol=1e-12)
    assert float((a[:, 5:] - b[:, 5:]).abs().max()) > 1e-3


def test_kv_cache_overflow_raises():
    model = make_model(BASE, _seed())
    cache = model.new_cache(1, 4)
    with torch.no_grad(), pytest.raises(FourbitError, match="longer cache"):
        model(_tokens(BASE, (1, 5), 0), cache, 0)


# ---- generation ----------------------------------------------------------------------------------

def _prompts(config, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("window", [None, 6], ids=["causal", "window6"])
def test_batched_left_padded_generation_equals_one_by_one(window):
    seed = _seed()
    cfg = dataclasses.replace(BASE, sliding_window=window)
    model = make_model(cfg, seed)
    prompts = _prompts(cfg, [3, 9, 1], seed)
    params = SamplingParams(temperature=0, max_new_tokens=12)
    batched = generate(model, prompts, params)
    alone = [generate(model, [p], params)[0] for p in prompts]
    assert [len(o) for o in batched] == [12, 12, 12]  # eos_ids=(): nothing stops early
    assert batched == alone, f"seed {seed}"
    # and greedy really is the argmax of a plain full forward over prompt + generated tokens
    for p, out in zip(prompts, alone):
        with torch.no_grad():
            logits = model(torch.tensor([p + out]))[0]  # (T, V)
        assert logits[len(p) - 1:-1].argmax(-1).tolist() == out, f"seed {seed}"


def _stopping_point(seq):
    """An index j > 0 whose token does not occur before it (so EOS = seq[j] stops exactly there)."""
    for j in range(len(seq) - 1, 0, -1):
        if seq[j] not in seq[:j]:
            return j
    return None


def test_generation_stops_at_eos():
    seed = _seed()
    t = random_tensors(BASE, seed)
    model = make_model(BASE, tensors=t)
    prompts = _prompts(BASE, [4, 2, 7], seed)
    params = SamplingParams(temperature=0, max_new_tokens=12)
    free = generate(model, prompts, params)  # no EOS ids: 12 tokens each
    j = _stopping_point(free[0])
    if j is None:
        pytest.skip(f"seed {seed}: greedy output {free[0]} repeats one token throughout")
    eos = free[0][j]
    stopping = make_model(dataclasses.replace(BASE, eos_ids=(eos,)), tensors=t)
    seen = []
    out = generate(stopping, prompts, params, on_token=lambda row, tok: seen.append((row, tok)))
    # each row stops before its first EOS (not returned); rows without it run to max_new_tokens
    expected = [f[:f.index(eos)] if eos in f else f for f in free]
    assert out == expected, f"seed {seed}, eos {eos}"
    assert out[0] == free[0][:j] and len(out[0]) < 12
    assert sorted(seen) == sorted((r, tok) for r, o in enumerate(out) for tok in o)  # streamed = returned
    # stop_at_eos=False ignores the EOS ids
    assert generate(stopping, prompts, dataclasses.replace(params, stop_at_eos=False)) == free


def test_generate_max_new_tokens_zero_and_bad_prompts():
    model = make_model(BASE, _seed())
    assert generate(model, [[1, 2], [3]], SamplingParams(max_new_tokens=0)) == [[], []]
    with pytest.raises(FourbitError, match="at least one token"):
        generate(model, [[1], []], SamplingParams(max_new_tokens=2))


def test_generate_rejects_more_than_the_context():
    cfg = dataclasses.replace(BASE, max_seq_len=32)
    model = make_model(cfg, _seed())
    prompts = _prompts(cfg, [20, 5], 0)
    with pytest.raises(FourbitError, match="max_new_tokens"):
        generate(model, prompts, SamplingParams(max_new_tokens=13))  # 20 + 13 > 32
    out = generate(model, prompts, SamplingParams(max_new_tokens=12))  # 20 + 12 == 32 fits exactly
    assert [len(o) for o in out] == [12, 12]


# ---- sampling ------------------------------------------------------------------------------------

def test_sample_greedy_and_tiny_top_p_pick_the_argmax():
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(256, 50, generator=g) * 3
    best = logits.argmax(-1)
    assert torch.equal(sample(logits, SamplingParams(temperature=0)), best)
    for temperature in (0.5, 1.0, 5.0):
        for _ in range(5):
            got = sample(logits, SamplingParams(temperature=temperature, top_p=1e-6), generator=g)
            assert torch.equal(got, best), f"seed {seed}, T={temperature}"


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_sample_distribution_matches_softmax(temperature):
    seed = _seed()
    logits = torch.tensor([1.0, -0.5, 0.3, 2.0, 0.0])
    n = 10_000
    draws = sample(logits.expand(n, 5), SamplingParams(temperature=temperature),
                   generator=torch.Generator().manual_seed(seed))  # (n,)
    assert draws.shape == (n,) and int(draws.min()) >= 0 and int(draws.max()) < 5
    freq = torch.bincount(draws, minlength=5).double() / n
    p = torch.softmax(logits.double() / temperature, dim=0)
    # binomial std <= 0.005 at n = 10k; 0.02 is 4 sigma
    assert float((freq - p).abs().max()) < 0.02, f"seed {seed}: freq {freq.tolist()} vs p {p.tolist()}"


def test_top_p_stays_inside_the_nucleus():
    seed = _seed()
    p = torch.tensor([0.08, 0.35, 0.12, 0.25, 0.20])  # sorted: 0.35, 0.25 (cum 0.60 >= 0.5) | 0.20, 0.12, 0.08
    logits = p.log()
    n = 10_000
    draws = sample(logits.expand(n, 5), SamplingParams(temperature=1.0, top_p=0.5),
                   generator=torch.Generator().manual_seed(seed))
    counts = torch.bincount(draws, minlength=5)
    assert set(draws.unique().tolist()) == {1, 3}, f"seed {seed}: counts {counts.tolist()}"
    # renormalized inside the nucleus: 0.35 / 0.60
    assert abs(counts[1].item() / n - 0.35 / 0.60) < 0.02, f"seed {seed}: counts {counts.tolist()}"
    # a nucleus just past the top token's mass takes the second one in too; just under it, only the top one
    only_top = sample(logits.expand(n, 5), SamplingParams(temperature=1.0, top_p=0.34),
                      generator=torch.Generator().manual_seed(seed))
    assert set(only_top.unique().tolist()) == {1}
