"""The serving engine (fourbit.engine.LLM) on stories260K: greedy output equals the static-cache generate token for
token under chunked prefill, preemption and prefix sharing; seeded sampling; aborts; the async front end."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

import fourbit
from fourbit.config import EngineConfig, SamplingParams, W4A16Config
from fourbit.engine.llm import LLM, AsyncLLM, QueueFull
from fourbit.errors import FourbitError
from fourbit.models.generate import generate


@pytest.fixture(scope="module")
def model(realdata):
    return fourbit.load(realdata / "stories260K.bin", torch.float32, "cpu")


@pytest.fixture(scope="module")
def tokenizer(realdata):
    return fourbit.Tokenizer(realdata / "tok512.model")


def _prompts(tokenizer, n=12, seed=0):
    """Prompts of varied lengths, several sharing a long prefix (prefix sharing), a few 1-token ones."""
    rng = random.Random(seed)
    stem = [1] + tokenizer.encode("Once upon a time, there was a little girl named Lily. She liked to play outside")
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append(stem + [rng.randrange(3, 512) for _ in range(rng.randrange(0, 5))])
        elif i % 5 == 4:
            out.append([1])
        else:
            out.append([1] + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 60))])
    return out


def _reference(model, prompts, params):
    return [generate(model, [p], params)[0] for p in prompts]


@pytest.mark.parametrize("config", [
    EngineConfig(),  # everything in one step
    EngineConfig(max_num_batched_tokens=24, block_size=8),  # chunked prefill, mixed prefill/decode steps
    EngineConfig(num_blocks=14, block_size=8, max_num_batched_tokens=64),  # blocks run out: preemption
    EngineConfig(max_num_seqs=3, prefix_sharing=False),
    EngineConfig(max_num_batched_tokens=24, block_size=8, async_scheduling=False),  # each step waits for its tokens
], ids=["one-step", "chunked", "preempt", "few-seqs", "sync"])
def test_greedy_equals_static_generate(model, tokenizer, config):
    prompts = _prompts(tokenizer)
    params = SamplingParams(max_new_tokens=40, temperature=0)
    llm = LLM(model, tokenizer, config)
    outs = llm.generate(prompts, params, progress=False)
    assert [o.token_ids for o in outs] == _reference(model, prompts, params)
    assert all(o.finish_reason in ("length", "stop") for o in outs)
    if config.num_blocks == 14:
        assert llm.stats["preempted"] > 0  # the case really preempted
    assert llm.blocks.num_free == llm.runner.num_blocks  # every block came back


def test_prefix_sharing_reuses_blocks(model, tokenizer):
    stem = [1] + tokenizer.encode("Once upon a time, there was a little girl named Lily. She liked to play outside")
    llm = LLM(model, tokenizer, EngineConfig(block_size=8))
    params = SamplingParams(max_new_tokens=8, temperature=0)
    first = llm.generate([stem + [7]], params, progress=False)[0]
    seq = llm.add_request(stem + [7], params)
    while llm.has_work():
        llm.step()
    assert seq.num_cached == (len(stem) + 1 - 1) // 8 * 8 > 0  # every full block of the prompt came from cache
    assert seq.output == first.token_ids


def test_w4a16_greedy_equals_static_generate(realdata, tokenizer):
    model = fourbit.load(realdata / "stories260K.bin", torch.float32, "cpu")
    fourbit.quantize_(model, W4A16Config(group_size=32), progress=False)
    prompts = _prompts(tokenizer, n=6, seed=1)
    params = SamplingParams(max_new_tokens=24, temperature=0)
    outs = LLM(model, tokenizer, EngineConfig(max_num_batched_tokens=32)).generate(prompts, params, progress=False)
    assert [o.token_ids for o in outs] == _reference(model, prompts, params)


def test_seeded_sampling_does_not_depend_on_the_batch(model, tokenizer):
    params = SamplingParams(max_new_tokens=30, temperature=0.8, top_p=0.9, seed=1234)
    alone = LLM(model, tokenizer).generate(["Once upon a time"], params, progress=False)[0]
    others = SamplingParams(max_new_tokens=30, temperature=1.0)
    batch = LLM(model, tokenizer).generate(["Tom had a dog", "Once upon a time", "The sun"],
                                           [others, params, others], progress=False)
    assert batch[1].token_ids == alone.token_ids
    synced = LLM(model, tokenizer, EngineConfig(async_scheduling=False)).generate(
        ["Once upon a time"], params, progress=False)[0]
    assert synced.token_ids == alone.token_ids  # async scheduling draws the same random numbers
    # the text continues the prompt: its first word keeps the space that decoding it alone would strip
    assert alone.text == tokenizer.decode([1] + tokenizer.encode("Once upon a time") + alone.token_ids)[
        len("Once upon a time"):]
    assert alone.text.strip() == tokenizer.decode(alone.token_ids).strip()


def test_stops_at_eos_and_lengths(model, tokenizer):
    llm = LLM(model, tokenizer, EngineConfig(max_model_len=40))
    outs = llm.generate([[1], [1] * 30], SamplingParams(max_new_tokens=100, temperature=0), progress=False)
    for o in outs:
        if o.finish_reason == "length":  # the sequence reached max_model_len
            assert len(o.prompt_ids) + len(o.token_ids) == 40
        else:
            assert o.finish_reason == "stop" and 2 not in o.token_ids
    with pytest.raises(FourbitError, match="max_model_len|40"):
        llm.add_request([1] * 40, SamplingParams())
    with pytest.raises(FourbitError, match=r"\[0, 512\)"):
        llm.add_request([1, 600], SamplingParams())


def test_abort_frees_blocks(model, tokenizer):
    llm = LLM(model, tokenizer, EngineConfig(block_size=8))
    seqs = [llm.add_request([1] + [5] * 30, SamplingParams(max_new_tokens=50)) for _ in range(3)]
    llm.step()
    llm.step()
    assert llm.blocks.num_free < llm.runner.num_blocks
    for s in seqs:
        llm.abort(s.seq_id)
    assert not llm.has_work() and llm.blocks.num_free == llm.runner.num_blocks
    assert all(s.finish_reason == "abort" for s in seqs)


def test_async_engine_streams_and_cancels(model, tokenizer):
    llm = LLM(model, tokenizer, EngineConfig(max_queued=4))
    engine = AsyncLLM(llm, "stories")
    prompts = _prompts(tokenizer, n=4, seed=2)
    params = SamplingParams(max_new_tokens=20, temperature=0)
    want = _reference(model, prompts, params)

    async def collect(p):
        tokens = []
        async for out in engine.generate(p, params):
            tokens += out.new_tokens
        return tokens, out.finish_reason

    async def main():
        await engine.start()
        got = await asyncio.gather(*(collect(p) for p in prompts))
        # a consumer that leaves after the first token: the engine aborts the request and frees its blocks
        stream = engine.generate(prompts[0], SamplingParams(max_new_tokens=200))
        await stream.__anext__()
        await stream.aclose()
        for _ in range(100):
            if not llm.has_work():
                break
            await asyncio.sleep(0.02)
        free_after_cancel = llm.blocks.num_free
        # a full queue refuses new requests
        streams = [engine.generate(p, SamplingParams(max_new_tokens=200)) for p in prompts]
        firsts = [await s.__anext__() for s in streams]
        with pytest.raises(QueueFull):
            await engine.generate(prompts[0], params).__anext__()
        for s in streams:
            await s.aclose()
        await engine.shutdown()
        return got, free_after_cancel, firsts

    got, free_after_cancel, firsts = asyncio.run(main())
    assert [g[0] for g in got] == want
    assert free_after_cancel == llm.runner.num_blocks
    assert all(f.prompt_tokens == len(p) for f, p in zip(firsts, prompts))


def test_async_engine_crash_answers_every_request(model, tokenizer):
    """A device error inside a step fails the running request and the ones queued meanwhile: none waits forever."""
    import threading

    from fourbit.engine.llm import EngineError

    llm = LLM(model, tokenizer)
    engine = AsyncLLM(llm, "stories")
    in_step, release = threading.Event(), threading.Event()

    def failing_step():
        in_step.set()
        release.wait(5)
        raise RuntimeError("CUDA error: an illegal memory access")

    llm.step = failing_step
    prompt = _prompts(tokenizer, n=1, seed=4)[0]

    async def first_token(stream):
        return await asyncio.wait_for(stream.__anext__(), 10)

    async def main():
        await engine.start()
        running = asyncio.ensure_future(first_token(engine.generate(prompt, SamplingParams(max_new_tokens=5))))
        await asyncio.to_thread(in_step.wait, 5)
        queued = asyncio.ensure_future(first_token(engine.generate(prompt, SamplingParams(max_new_tokens=5))))
        await asyncio.sleep(0.05)  # the second request sits in the inbox while the step runs
        release.set()
        results = await asyncio.gather(running, queued, return_exceptions=True)
        later = await asyncio.gather(first_token(engine.generate(prompt, SamplingParams())), return_exceptions=True)
        return results + later

    results = asyncio.run(main())
    assert all(isinstance(r, EngineError) for r in results), results


def test_decode_bucket_path_on_cpu(model, tokenizer):
    """The CUDA-graph decode path's bookkeeping (static buffers, padding rows written to the scratch block with
    seq_len 0, block tables padded to max_model_len) on a CPU: each "graph" replays the captured call eagerly."""
    llm = LLM(model, tokenizer, EngineConfig(max_num_seqs=8, max_model_len=128))
    runner = llm.runner

    class Replay:  # what a captured graph does on replay(): the same call on the same buffers, into the same output
        def __init__(self, static, out, greedy):
            self.static, self.out, self.greedy = static, out, greedy

        def replay(self):
            logits, greedy = runner.decode_step(self.static)
            self.out.copy_(logits)
            self.greedy.copy_(greedy)

    for b in (4, 8):  # 3 or 5 sequences land in a bigger bucket: padding rows are exercised
        static, logits, greedy = runner.decode_buffers(b), torch.empty(b, model.config.vocab_size), torch.empty(b).long()
        runner.install_graph(b, Replay(static, logits, greedy), static, logits, greedy)
    prompts = _prompts(tokenizer, n=5, seed=3)
    params = SamplingParams(max_new_tokens=30, temperature=0)
    replays = []
    original = runner.launch

    def counting(batch, pending):
        replays.append(batch.is_decode and runner._bucket(len(batch.seqs)) is not None)
        return original(batch, pending)

    runner.launch = counting
    outs = llm.generate(prompts, params, progress=False)
    assert any(replays)  # the bucket path ran
    assert [o.token_ids for o in outs] == _reference(model, prompts, params)
