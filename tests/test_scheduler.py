"""fourbit.engine.scheduler: chunked prefill, mixed and decode batches, preemption by recompute, finishing rules,
aborts, and a randomized soak against a fake model that checks every token it reads from a simulated KV cache."""
import random
import time

import pytest

from fourbit.config import EngineConfig, SamplingParams
from fourbit.engine.block_manager import BlockManager
from fourbit.engine.scheduler import Scheduler
from fourbit.engine.sequence import Sequence, SeqStatus
from fourbit.errors import FourbitError

EOS = 0


def _sched(num_blocks=64, block_size=16, max_num_seqs=256, budget=2048, max_model_len=1024, sharing=True):
    cfg = EngineConfig(block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=budget, prefix_sharing=sharing)
    return Scheduler(cfg, BlockManager(num_blocks, block_size, sharing), max_model_len, eos_ids=[EOS])


def _seq(seq_id, prompt, max_new_tokens=8, stop_at_eos=True):
    return Sequence(seq_id, list(prompt), SamplingParams(max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos))


def _step(sched, token=7):
    """One engine step with a model that samples `token` (a callable of the sequence, or an int)."""
    batch = sched.schedule()
    sampled = [(token(s) if callable(token) else token) if s.num_computed + n == s.num_tokens else None
               for s, n in zip(batch.seqs, batch.num_new)]
    sched.update(batch, sampled)
    sched.check()
    return batch, sampled


def test_chunked_prefill_100_tokens_budget_32():
    sched = _sched(budget=32)
    seq = _seq(1, range(1, 101), max_new_tokens=3)
    sched.add(seq)
    chunks = []
    for _ in range(4):
        batch, sampled = _step(sched)
        assert batch.seqs == [seq] and not batch.is_decode
        chunks.append(batch.num_new[0])
        assert seq.output == ([] if len(chunks) < 4 else [7])
    assert chunks == [32, 32, 32, 4] and seq.num_computed == 100
    batch, _ = _step(sched)
    assert batch.is_decode and batch.num_new == [1] and seq.output == [7, 7]


def test_update_needs_a_token_when_the_step_completes():
    sched = _sched()
    sched.add(_seq(1, [1, 2, 3]))
    batch = sched.schedule()
    with pytest.raises(RuntimeError, match="no token"):
        sched.update(batch, [None])


def test_decode_batch_mixed_batch_and_max_num_seqs():
    sched = _sched(budget=32, max_num_seqs=3)
    a, b, c, d = (_seq(i, range(10 * i, 10 * i + 5), max_new_tokens=4) for i in range(1, 5))
    for s in (a, b, c, d):
        sched.add(s)
    batch, _ = _step(sched)
    assert batch.seqs == [a, b, c] and batch.num_new == [5, 5, 5] and sched.num_waiting == 1
    batch, _ = _step(sched)
    assert batch.is_decode and batch.seqs == [a, b, c] and batch.num_new == [1, 1, 1]
    # a long prompt arrives: one step carries the decodes and a prefill chunk of what is left of the budget
    sched = _sched(budget=32)
    a, big = _seq(1, [1, 2, 3], max_new_tokens=10), _seq(2, range(1, 101))
    sched.add(a)
    _step(sched)
    sched.add(big)
    batch, _ = _step(sched)
    assert batch.seqs == [a, big] and batch.num_new == [1, 31] and not batch.is_decode
    batch, _ = _step(sched)
    assert batch.seqs == [a, big] and batch.num_new == [1, 31]  # the prefill in progress keeps going


def test_fifo_head_is_not_overtaken():
    sched = _sched(num_blocks=8, block_size=4, budget=64)
    a = _seq(1, range(1, 21), max_new_tokens=2)  # 6 blocks for prompt + 1 + decode
    big, small = _seq(2, range(1, 25)), _seq(3, [5])
    for s in (a, big, small):
        sched.add(s)
    batch, _ = _step(sched)
    assert batch.seqs == [a], "the big head must wait for blocks, and the small one behind it too"
    while a.status is not SeqStatus.FINISHED:
        _step(sched)
    batch, _ = _step(sched)
    assert batch.seqs[0] is big


def test_preemption_by_recompute():
    sched = _sched(num_blocks=6, block_size=4, budget=64, max_num_seqs=2)
    a, b = _seq(1, range(1, 9), max_new_tokens=12), _seq(2, range(11, 19), max_new_tokens=12)
    c = _seq(3, [30], max_new_tokens=1)  # waits behind them (max_num_seqs): b must get back in front of it
    for s in (a, b, c):
        sched.add(s)
    counter = iter(range(100, 10**6))
    preempted, kept, recompute = [], None, None
    while sched.has_work:
        batch = sched.schedule()
        preempted += batch.preempted
        if batch.preempted and kept is None:
            assert batch.preempted == [b], "the most recently arrived running sequence is preempted"
            assert b.status is SeqStatus.WAITING and b.block_table == [] and b.num_computed == 0
            assert list(sched.waiting) == [b, c] and batch.seqs == [a]
            kept = list(b.output)
        if kept is not None and recompute is None and b in batch.seqs:
            recompute = b.num_computed + batch.num_new[batch.seqs.index(b)]
            assert recompute == b.num_tokens == 8 + len(kept), "the recompute covers prompt + the output kept"
        sched.update(batch, [next(counter) if s.num_computed + n == s.num_tokens else None
                             for s, n in zip(batch.seqs, batch.num_new)])
        sched.check()
    assert preempted and kept
    assert a.finish_reason == b.finish_reason == "length"
    assert len(a.output) == len(b.output) == 12 and b.output[:len(kept)] == kept
    assert recompute is not None
    assert c.finish_reason == "length" and c.output
    assert sched.bm.num_free == 6
    sched.bm.check([])


def test_finish_rules():
    sched = _sched(max_model_len=10)
    stop, no_stop, zero, long = (_seq(1, [1, 2], 5), _seq(2, [1, 2], 5, stop_at_eos=False), _seq(3, [1, 2], 0),
                                 _seq(4, [3, 4, 5, 6, 7, 8], 100, stop_at_eos=False))
    for s in (stop, no_stop, zero, long):
        sched.add(s)
    _, sampled = _step(sched, 9)
    assert zero.status is SeqStatus.FINISHED and zero.finish_reason == "length" and zero.output == []
    _step(sched, EOS)
    assert stop.finish_reason == "stop" and stop.output == [9], "EOS finishes and is not appended"
    assert no_stop.output == [9, EOS] and no_stop.status is SeqStatus.RUNNING
    for _ in range(10):
        _step(sched, 9)
    assert no_stop.finish_reason == "length" and len(no_stop.output) == 5
    assert long.finish_reason == "length" and long.num_tokens == 10, "max_model_len tokens in all"
    assert not sched.has_work and sched.bm.num_free == 64


def test_add_rejects_what_can_never_run():
    sched = _sched(num_blocks=4, block_size=4, max_model_len=100)
    with pytest.raises(FourbitError, match="empty prompt"):
        sched.add(_seq(1, []))
    with pytest.raises(FourbitError, match="max_model_len=100"):
        sched.add(_seq(2, range(100)))
    with pytest.raises(FourbitError, match="num_blocks=4"):
        sched.add(_seq(3, range(16)))  # 17 tokens need 5 blocks
    sched.add(_seq(4, range(15)))
    with pytest.raises(FourbitError, match="already queued"):
        sched.add(_seq(4, [1]))
    assert sched.num_waiting == 1


def test_cache_capacity_caps_the_length():
    sched = _sched(num_blocks=2, block_size=4, max_model_len=100)
    s = _seq(1, [1, 2, 3], max_new_tokens=50)
    sched.add(s)
    while sched.has_work:
        _step(sched)
    assert s.finish_reason == "length" and s.num_tokens == 8


def test_abort_in_any_state():
    sched = _sched(num_blocks=16, block_size=4, budget=8, max_num_seqs=2)
    a, b, c = _seq(1, range(1, 7)), _seq(2, range(1, 20)), _seq(3, [1])
    for s in (a, b, c):
        sched.add(s)
    batch, _ = _step(sched)  # a prefilled, b mid-prefill, c waiting
    assert b.num_computed == 2 and c.status is SeqStatus.WAITING
    assert sched.abort(3) is c and c.finish_reason == "abort" and sched.num_waiting == 0
    assert sched.abort(2) is b and b.block_table == [] and sched.num_running == 1
    batch = sched.schedule()
    assert sched.abort(1) is a  # between schedule() and update(): the step's result is dropped
    assert sched.update(batch, [5]) == [] and a.output == [7]
    assert sched.abort(1) is None and sched.abort(99) is None
    assert not sched.has_work and sched.bm.num_free == 16
    sched.check()


def _soak(n_requests, seed, overlap=False):
    """Random requests through the scheduler and a simulated model that checks every K/V read and write.
    overlap: as the engine's async scheduling does, each step is scheduled and "launched" before the previous
    step's tokens are resolved (the model knows a pending token's value, as the device does)."""
    rng = random.Random(seed)
    bs, nb, max_len, budget, max_seqs = 4, 40, 64, 24, 8
    sched = _sched(num_blocks=nb, block_size=bs, max_num_seqs=max_seqs, budget=budget, max_model_len=max_len)
    bm = sched.bm
    prefixes = [[rng.randrange(1, 50) for _ in range(24)] for _ in range(4)]
    cache = [[None] * bs for _ in range(nb)]  # simulated K/V: the chain value of the prefix ending at the slot
    chain: dict[Sequence, list[int]] = {}  # per sequence: chain value of each of its positions
    verified: dict[Sequence, int] = {}  # tokens known to be intact in the cache, per sequence
    sampled_by_model: dict[Sequence, list[int]] = {}
    requests: list[Sequence] = []
    stats = dict(preempted=0, cached=0, deep=0, model_len=0, stop=0, abort=0, steps=0)

    def values(s):
        v, toks = chain.setdefault(s, []), s.tokens + sampled_by_model.get(s, [])[-1:] * s.pending
        for p in range(len(v), len(toks)):
            v.append(hash((v[p - 1] if p else None, toks[p])))
        return v

    def model(batch):
        owners = {}
        for s in sched.running:
            for b in s.block_table:
                owners[b] = owners.get(b, 0) + 1
        out = []
        for s, n in zip(batch.seqs, batch.num_new):
            start, v, table = s.num_computed, values(s), s.block_table
            assert n >= 1 and start + n <= s.num_tokens and len(table) * bs >= start + n
            if verified.get(s) != start:  # just admitted (maybe onto shared blocks): read back all of it
                for p in range(start):
                    assert cache[table[p // bs]][p % bs] == v[p], f"seq {s.seq_id} reads a wrong K/V at {p}"
            for p in range(start, start + n):
                assert owners[table[p // bs]] == 1, "writes into a shared block"
                cache[table[p // bs]][p % bs] = v[p]
            verified[s] = start + n
            token = None
            if start + n == s.num_tokens:
                token = EOS if rng.random() < 0.04 else rng.randrange(1, 50)
                sampled_by_model.setdefault(s, []).append(token)
            out.append(token)
        return out

    launched = None  # (batch, advance()'s indices, sampled) when overlapping

    def resolve(batch, done, sampled):
        before = {s: len(s.output) for s in batch.seqs}
        for s in sched.resolve([batch.seqs[i] for i in done], [sampled[i] for i in done]):
            assert s.status is SeqStatus.FINISHED or len(s.output) == before[s] + 1

    while len(requests) < n_requests or sched.has_work or launched:
        while len(requests) < n_requests and sched.num_waiting < 12 and rng.random() < 0.7:
            k = rng.choice([0, 0, 8, 17, 24])
            prompt = rng.choice(prefixes)[:k] + [rng.randrange(1, 50) for _ in range(rng.randrange(0 if k else 1, 40))]
            s = _seq(len(requests), prompt, rng.choice([0, 1, 3, 8, 16, 40]), rng.random() < 0.8)
            sched.add(s)
            requests.append(s)
        if rng.random() < 0.02:
            assert sched.abort(rng.randrange(len(requests) + 5)) in (None, *requests)
        had_work = sched.has_work
        batch = sched.schedule()
        stats["steps"] += 1
        stats["preempted"] += len(batch.preempted)
        assert len(batch.seqs) <= max_seqs and sum(batch.num_new) <= budget and len(set(batch.seqs)) == len(batch.seqs)
        assert bool(batch.seqs) == had_work, "no progress"
        assert batch.is_decode == (bool(batch.seqs) and all(n == 1 and s.num_computed == s.num_tokens - 1
                                                            for s, n in zip(batch.seqs, batch.num_new)))
        fresh = [s.num_cached for s in batch.seqs if s.num_cached > 0 and s.num_computed == s.num_cached]
        stats["cached"] += len(fresh)
        stats["deep"] += sum(c >= 3 * bs for c in fresh)
        for s in batch.preempted:
            verified.pop(s, None)  # its next admission must read back whatever it matched
        sampled = model(batch)
        if batch.seqs and rng.random() < 0.01:
            sched.abort(rng.choice(batch.seqs).seq_id)
        if launched:
            resolve(*launched)
            launched = None
        if overlap:
            launched = (batch, sched.advance(batch), sampled) if batch.seqs else None
        else:
            before = {s: len(s.output) for s in batch.seqs}
            for s in sched.update(batch, sampled):
                assert s.status is SeqStatus.FINISHED or len(s.output) == before[s] + 1
        sched.check()

    assert bm.num_free == nb and not sched.has_work
    bm.check([])
    for s in requests:
        assert s.status is SeqStatus.FINISHED and s.block_table == []
        p, out, got = s.params, s.output, sampled_by_model.get(s, [])
        assert len(out) <= p.max_new_tokens and s.num_tokens <= max_len
        if p.stop_at_eos:
            assert EOS not in out
        if s.finish_reason == "abort":
            stats["abort"] += 1
            assert out == got[:len(out)]
        elif s.finish_reason == "stop":
            stats["stop"] += 1
            # overlapping, the step after the EOS was already launched: its token is dropped
            assert p.stop_at_eos and got[:len(out) + 1] == out + [EOS] and len(got) <= len(out) + 1 + overlap
        else:
            assert s.finish_reason == "length"
            assert len(out) == p.max_new_tokens or s.num_tokens == max_len
            stats["model_len"] += s.num_tokens == max_len and len(out) < p.max_new_tokens
            assert got == out if p.max_new_tokens else (out == [] and len(got) == 1)
    return stats


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_soak_random_requests(overlap):
    t0 = time.perf_counter()
    stats = _soak(10_000, seed=0, overlap=overlap)
    # the soak reached the paths it is meant to test
    assert stats["preempted"] > 50 and stats["cached"] > 1000 and stats["deep"] > 500, stats
    assert stats["model_len"] > 50 and stats["stop"] > 100 and stats["abort"] > 50, stats
    assert time.perf_counter() - t0 < 60, stats


def test_token_range_equals_slicing_tokens():
    from fourbit.engine.sequence import Sequence

    seq = Sequence(0, [5, 6, 7])
    seq.output += [8, 9]
    for start in range(6):
        for end in range(start, 7):
            assert seq.token_range(start, end) == seq.tokens[start:end]
