"""The serving engine on a CUDA GPU (skipped without one), on stories260K in bf16, fp16 and W4A16: greedy output
through the engine (paged attention kernel, CUDA-graph decode buckets, continuous batching) equals the
static-cache generate token for token.

One request at a time, every GEMM sees the same rows as in the static generate and a prefill is bit-equal, but
decode attention differs: the paged kernel (split-KV, its own summation order) against SDPA over the static cache.
Batched, each GEMM also sees other requests' rows; cuBLAS gives a row the same bits whatever M, but the W4A16 kernel
picks its kernel and tile shape by M, and so sums in another order. So a sequence may leave
the static one only where its two best tokens are within rounding of each other (checked below), and rarely: at
most three of the seven sequences per run. (H100, 2026-11-22: fp16 equal everywhere; bf16 one-by-one, with or
without CUDA graphs, leaves the static path at token 10 of one prompt, while its prefill logits are bit-equal;
W4A16 left it in three of one run, each at a checked near tie, after the ring kernel took M <= 16 and the split-KV
shares changed, both changing summation orders.)
"""
from __future__ import annotations

import pytest
import torch

import fourbit
from fourbit.config import EngineConfig, SamplingParams, W4A16Config
from fourbit.engine.llm import LLM
from fourbit.models.generate import generate
from fourbit.nn import fuse_projections_

pytestmark = pytest.mark.requires_cuda
TEXTS = ["Once upon a time", "Tom and Lily went to the park. They saw a big", "The cat", "One day, a little bird",
         "Sue had a red ball. She", "Once upon a time, there was a little girl named Lily"]


def _near_tie(model, prompt, got, want) -> bool:
    """At the first token where got and want part, are the two tokens' logits within rounding of each other?"""
    i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    if i == len(got) or i == len(want):
        return False
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + want[:i]], device="cuda"))[0, -1].float()
    return bool((logits[want[i]] - logits[got[i]]).abs() <= 0.02 * logits.abs().max())


@pytest.mark.parametrize("scheme", ["bf16", "fp16", "w4a16"])
def test_engine_greedy_equals_static_generate_on_cuda(realdata, scheme):
    dtype = torch.float16 if scheme == "fp16" else torch.bfloat16
    model = fourbit.load(realdata / "stories260K.bin", dtype, "cuda")
    if scheme == "w4a16":
        fourbit.quantize_(model, W4A16Config(group_size=32), progress=False)
    fuse_projections_(model)  # as the engine does: the static generate then runs the same GEMMs
    tok = fourbit.Tokenizer(realdata / "tok512.model")
    prompts = [[1] + tok.encode(t) for t in TEXTS] + [[1]]
    params = SamplingParams(max_new_tokens=64, temperature=0)
    want = [generate(model, [p], params)[0] for p in prompts]

    # num_blocks: by default an engine takes most of the free GPU memory, and this test builds three
    configs = (EngineConfig(max_num_seqs=1, num_blocks=256), EngineConfig(max_num_seqs=16, num_blocks=256),
               EngineConfig(max_num_batched_tokens=16, max_num_seqs=4, num_blocks=256, cuda_graphs=False))
    for config in configs:
        llm = LLM(model, tok, config)
        assert config.cuda_graphs == bool(llm.runner.graphs)
        got = [o.token_ids for o in llm.generate(prompts, params, progress=False)]
        differ = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
        assert all(_near_tie(model, prompts[i], got[i], want[i]) for i in differ), differ
        assert len(differ) <= 3, (config, differ)
        assert llm.blocks.num_free == llm.runner.num_blocks


def test_dropped_engine_leaves_no_graph_memory(realdata):
    """An engine with CUDA graphs, dropped, gives its memory back: a second and third engine leave no more
    allocated than the first (each graph's warm-up on a new stream once left a cuBLAS workspace behind)."""
    import gc

    model = fourbit.load(realdata / "stories260K.bin", torch.bfloat16, "cuda")
    left = []
    for _ in range(3):
        llm = LLM(model, config=EngineConfig(max_num_seqs=64, num_blocks=64))
        assert len(llm.runner.graphs) > 5
        llm.generate([[1, 5, 6]], SamplingParams(max_new_tokens=4), progress=False)
        del llm
        gc.collect()
        left.append(torch.cuda.memory_allocated())
    assert left[2] == left[1] == left[0], left


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_launch_never_waits_for_the_device(realdata, cuda_graphs):
    """Async scheduling needs Runner.launch to return before the GPU is done: no stream synchronization in prefill,
    mixed or decode steps, greedy or sampled (top-p, seeded). torch's sync debug mode raises on any."""
    model = fourbit.load(realdata / "stories260K.bin", torch.bfloat16, "cuda")
    llm = LLM(model, config=EngineConfig(max_num_seqs=8, num_blocks=64, max_num_batched_tokens=16,
                                         cuda_graphs=cuda_graphs))
    launch, steps = llm.runner.launch, []

    def checked(batch, pending):
        steps.append(batch.is_decode)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(batch, pending)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    llm.runner.launch = checked
    params = [SamplingParams(max_new_tokens=12, stop_at_eos=False),
              SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, stop_at_eos=False),
              SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, stop_at_eos=False)]
    outs = llm.generate([[1, 5, 6] * k for k in (1, 4, 9)], params, progress=False)
    assert [len(o.token_ids) for o in outs] == [12, 12, 12]
    assert any(steps) and not all(steps)  # decode steps and prefill (or mixed) steps were checked
