"""Real weights and text (shared/realdata, read in place): Karpathy's stories260K llama2.c model on TinyStories.

Reference numbers are from shared/realdata/README.md (computed independently). The full-file perplexity takes
about a minute on a CPU, so the default tests score a 30k-token prefix and pin the value measured for it; the
full-file check runs with FOURBIT_SLOW=1.
"""
from __future__ import annotations

import math

import pytest
import torch

import fourbit
from fourbit.config import SamplingParams, W4A16Config
from fourbit.errors import FourbitError
from fourbit.eval.perplexity import perplexity
from fourbit.models.generate import generate
from fourbit.models.loader import load_model
from fourbit.models.tokenizer import Tokenizer

SEQ_LEN = 512
PREFIX = 30_000  # tokens scored by the default tests: 58 windows
TEXT_TOKENS = 393_013  # README: the whole tinystories_val_head794k.txt, BOS included
FULL_PPL = 5.047  # README: full file, fp64 activations
# Measured for the 30k prefix (fp32 and fp64 agree to 1e-7; with this package the full file gives 5.0468, the
# README's 5.047, and the 100k prefix 4.2529): the prefix is easier text than the whole file.
PREFIX_PPL = 4.0511
# W4A16 RTN asymmetric on the 30k prefix, measured: g32 4.413, g64 4.434, per-channel 4.436 (+9 % over fp32;
# on the 100k prefix g32 gives 4.668 vs 4.253).
QUANT_MAX_RATIO = 1.15


@pytest.fixture(scope="module")
def tokenizer(realdata):
    return Tokenizer(realdata / "tok512.model")


@pytest.fixture(scope="module")
def text_ids(realdata, tokenizer):
    ids = tokenizer.encode((realdata / "tinystories_val_head794k.txt").read_text(encoding="utf-8"), bos=True)
    assert ids[0] == 1 and ids[1] != 1
    return ids


@pytest.fixture(scope="module")
def fp32_ppl(realdata, text_ids):
    model = load_model(realdata / "stories260K.bin")
    return perplexity(model, text_ids, SEQ_LEN, max_tokens=PREFIX, progress=False)


def test_model_shape(realdata):
    model = load_model(realdata / "stories260K.bin")
    c = model.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len) == \
           (64, 172, 5, 8, 4, 512, 512)
    assert c.rope_interleaved and c.tie_embeddings and model.lm_head is None and c.bos_id == 1
    assert model.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_greedy_golden_text(realdata, tokenizer, dtype):
    """llama2.c `run -t 0.0 -n 200` forwards 200 positions and prints the token each one yields: 200 tokens."""
    golden = (realdata / "stories260K.greedy.txt").read_text(encoding="utf-8")
    model = load_model(realdata / "stories260K.bin", dtype=dtype)
    out = generate(model, [[1]], SamplingParams(temperature=0, max_new_tokens=200))[0]
    assert len(out) == 200  # llama2.c's EOS ids (1, 2) never come up in this story
    text = tokenizer.decode(out)
    assert text == golden
    # 199 tokens: the same text without its last piece
    assert golden.endswith(" she")
    out199 = generate(model, [[1]], SamplingParams(temperature=0, max_new_tokens=199))[0]
    assert out199 == out[:199]
    assert tokenizer.decode(out199) == golden[: -len(" she")]


def test_perplexity_prefix(fp32_ppl, text_ids):
    r = fp32_ppl
    assert len(text_ids) == TEXT_TOKENS
    assert r["tokens"] == TEXT_TOKENS  # the whole tokenized text, not just the scored prefix
    assert r["seq_len"] == SEQ_LEN and r["windows"] == PREFIX // SEQ_LEN == 58
    assert r["predictions"] == r["windows"] * (SEQ_LEN - 1)
    assert r["ppl"] == pytest.approx(math.exp(r["nll"]), rel=1e-12)
    assert r["ppl"] == pytest.approx(PREFIX_PPL, abs=2e-3)
    # the same ballpark as the full-file reference (the prefix is easier text: ~20 % lower)
    assert 0.7 * FULL_PPL < r["ppl"] < FULL_PPL


@pytest.mark.slow
@pytest.mark.parametrize("name,tokens,nll,ppl", [("tinystories_val_head794k.txt", 393_013, 1.6188, 5.047),
                                                 ("wiki.test.raw", 809_285, 4.7828, 119.44)])
def test_perplexity_full_file_matches_reference(realdata, name, tokens, nll, ppl):
    """The reference numbers of shared/realdata/README.md (fp64 there; fp32 here, as `fourbit ppl --scheme fp32`)."""
    model = load_model(realdata / "stories260K.bin", dtype=torch.float32)
    tok = Tokenizer(realdata / "tok512.model")
    r = perplexity(model, tok.encode((realdata / name).read_text(encoding="utf-8"), bos=True), SEQ_LEN,
                   progress=False)
    assert r["tokens"] == tokens and r["windows"] == tokens // SEQ_LEN
    assert r["nll"] == pytest.approx(nll, abs=1e-4)
    assert r["ppl"] == pytest.approx(ppl, rel=1e-4)


@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_w4a16_rtn_perplexity(realdata, text_ids, fp32_ppl, group_size):
    model = load_model(realdata / "stories260K.bin")
    report = {}
    fourbit.quantize(model, W4A16Config(group_size=group_size), report=report, progress=False)
    assert len(report) == 5 * 7 and all(0 < e < 0.2 for e in report.values()), report
    r = perplexity(model, text_ids, SEQ_LEN, max_tokens=PREFIX, progress=False)
    assert math.isfinite(r["ppl"])
    ratio = r["ppl"] / fp32_ppl["ppl"]
    # quantization costs something, but not much: measured +9 % for every group size here
    assert 1.0 < ratio < QUANT_MAX_RATIO, f"g{group_size}: ppl {r['ppl']:.4f} vs fp32 {fp32_ppl['ppl']:.4f}"


def test_w4a16_g128_does_not_apply(realdata):
    model = load_model(realdata / "stories260K.bin")
    with pytest.raises(FourbitError, match=r"group size 128 does not apply to in_features=64"):
        fourbit.quantize(model, W4A16Config(group_size=128), progress=False)


def test_truncated_checkpoint(realdata, tmp_path):
    cut = tmp_path / "stories260K_cut.bin"
    cut.write_bytes((realdata / "stories260K.bin").read_bytes()[:100_000])
    with pytest.raises(FourbitError, match="truncated"):
        load_model(cut)
    with pytest.raises(FourbitError, match="truncated"):
        fourbit.load(cut)
