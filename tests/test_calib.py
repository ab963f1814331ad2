"""Calibration windows (text file, strings, random ids) and the block-by-block driver."""
from __future__ import annotations

import pytest
import torch

import fourbit
from fourbit.errors import FourbitError
from fourbit.quantize.calib import BlockInputs, block_outputs, capture_block_inputs, quantize_blockwise

from test_gptq import TINY, tiny_llama


class WordTokenizer:
    """One id per whitespace-separated word (its length), enough to check where windows come from."""

    def encode(self, text):
        return [len(w) for w in text.split()]


def test_windows_from_strings_are_seeded_slices_of_the_text():
    texts = ["a bb ccc dddd", "eeeee ffffff g hh iii"]
    ids = [1, 2, 3, 4, 5, 6, 1, 2, 3]
    tok = WordTokenizer()
    a = fourbit.calib_tokens(texts, tok, nsamples=6, seqlen=4, seed=3)
    assert a.shape == (6, 4) and a.dtype == torch.long
    starts = [next(s for s in range(len(ids) - 3) if ids[s:s + 4] == row) for row in a.tolist()]
    assert len(starts) == 6  # every window is a slice of the concatenated ids
    assert torch.equal(a, fourbit.calib_tokens(texts, tok, nsamples=6, seqlen=4, seed=3))
    assert not torch.equal(a, fourbit.calib_tokens(texts, tok, nsamples=6, seqlen=4, seed=4))
    assert fourbit.calib_tokens(texts, tok, nsamples=2, seqlen=9).tolist() == [ids, ids]  # the whole text


def test_windows_from_a_file(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("x " * 50, encoding="utf-8")
    assert fourbit.calib_tokens(f, WordTokenizer(), nsamples=3, seqlen=50).tolist() == [[1] * 50] * 3
    with pytest.raises(FourbitError, match="fewer than one window.*--seqlen"):
        fourbit.calib_tokens(f, WordTokenizer(), nsamples=3, seqlen=51)
    with pytest.raises(FourbitError, match="--calib"):
        fourbit.calib_tokens(tmp_path / "missing.txt", WordTokenizer())


def test_random_tokens_and_bad_arguments():
    r = fourbit.calib_tokens(None, nsamples=5, seqlen=7, seed=1, vocab_size=11)
    assert r.shape == (5, 7) and 0 <= int(r.min()) and int(r.max()) < 11
    assert torch.equal(r, fourbit.calib_tokens(None, nsamples=5, seqlen=7, seed=1, vocab_size=11))
    with pytest.raises(FourbitError, match="--nsamples"):
        fourbit.calib_tokens(None, nsamples=0, vocab_size=11)
    with pytest.raises(FourbitError, match="--seqlen"):
        fourbit.calib_tokens(None, seqlen=-1, vocab_size=11)
    with pytest.raises(FourbitError, match="tokenizer"):
        fourbit.calib_tokens(["some text"])
    with pytest.raises(FourbitError, match="vocab_size"):
        fourbit.calib_tokens(None)


def test_blocks_one_at_a_time_reproduce_the_model():
    """Captured block-0 inputs run through every block (mini-batches of 3 rows) give the model's own logits."""
    model = tiny_llama(0)
    tokens = torch.randint(0, TINY.vocab_size, (7, 20))
    with torch.no_grad():
        ref = model(tokens)
        inputs = capture_block_inputs(model, tokens, batch_size=3)
        assert [x.shape[0] for x in inputs.xs] == [3, 3, 1] and inputs.tokens == 7 * 20
        assert torch.equal(torch.cat(inputs.xs), model.embed_tokens(tokens))
        for block in model.layers:
            inputs = BlockInputs(block_outputs(inputs.run(block, keep=True)), inputs.rest)
        h = model.norm(torch.cat(inputs.xs))
        got = h @ model.embed_tokens.weight.t() if model.lm_head is None else model.lm_head(h)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_driver_visits_each_block_with_quantized_predecessors():
    model = tiny_llama(1)
    tokens = torch.randint(0, TINY.vocab_size, (4, 16))
    seen = []

    def step(prefix, block, inputs, note):
        note("looking")
        seen.append((prefix, inputs.tokens, inputs.xs[0].clone()))
        with torch.no_grad():  # stand-in for quantization: perturb the block's output projection
            block.mlp.down_proj.weight.mul_(0.5)

    quantize_blockwise(model, tokens, step, desc="test", progress=False)
    assert [p for p, _, _ in seen] == ["layers.0", "layers.1"] and all(t == 64 for _, t, _ in seen)
    with torch.no_grad():  # block 1 saw the output of the *modified* block 0
        expected = block_outputs([model.layers[0](*_args(model, tokens))])[0]
    assert torch.allclose(seen[1][2], expected, atol=1e-6)


def _args(model, tokens):
    inputs = capture_block_inputs(model, tokens)
    return (inputs.xs[0], *inputs.rest[0][0])
