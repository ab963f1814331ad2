"""fourbit.engine.block_manager: allocation, ref counts, exact prefix sharing, LRU eviction of cached blocks."""
import pytest

from fourbit.engine.block_manager import BlockManager
from fourbit.engine.sequence import Sequence
from fourbit.errors import FourbitError

_ids = iter(range(10**9))


def _seq(tokens):
    return Sequence(seq_id=next(_ids), prompt=list(tokens))


def _run(bm, seq):
    """What one scheduler step plus update does to a fresh sequence: match, compute the rest, publish."""
    matched = bm.match_prefix(seq)
    n = seq.num_tokens - seq.num_computed
    bm.append(seq, n)
    seq.num_computed += n
    bm.commit(seq)
    return matched


def test_allocate_free_ref_counts():
    bm = BlockManager(num_blocks=8, block_size=4, prefix_sharing=False)
    a, b = _seq(range(10)), _seq(range(100, 105))
    assert bm.blocks_needed(a, 10) == 3 and bm.can_append(a, 10)
    bm.append(a, 10)
    bm.append(b, 5)
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert not set(a.block_table) & set(b.block_table)
    assert bm.num_free == 3
    bm.check([a, b])
    # growing inside the last block needs nothing; crossing a boundary needs one more
    a.num_computed = 10
    assert bm.blocks_needed(a, 2) == 0 and bm.blocks_needed(a, 3) == 1
    assert not bm.can_append(a, 4 * 3 + 3)
    with pytest.raises(RuntimeError, match="can_append"):
        bm.append(a, 4 * 3 + 3)
    bm.free(a)
    assert a.block_table == [] and a.num_computed == 0 and bm.num_free == 6
    bm.check([b])
    with pytest.raises(RuntimeError, match="ref counts"):
        bm.check([])  # b still holds blocks: the check must notice when told b does not exist
    bm.free(b)
    assert bm.num_free == 8
    bm.check([])
    with pytest.raises(FourbitError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=16)


def test_prefix_sharing_40_tokens():
    bm = BlockManager(num_blocks=16, block_size=16)
    z = _seq(range(2000, 2050))
    _run(bm, z)  # unrelated blocks first, so block ids and any internal numbering of contents differ
    prompt = list(range(1000, 1040))
    a, b = _seq(prompt), _seq(prompt)
    assert _run(bm, a) == 0 and a.num_cached == 0
    assert _run(bm, b) == 32
    assert b.num_cached == 32 and b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.num_free == 16 - 4 - 4
    bm.check([z, a, b])
    # a different token inside the second block: only the first is shared
    c = _seq(prompt[:20] + [7] + prompt[21:])
    assert _run(bm, c) == 16 and c.block_table[0] == a.block_table[0] and c.block_table[1] != a.block_table[1]
    # a different first block shares nothing, even with an identical second block
    d = _seq([7] + prompt[1:])
    assert _run(bm, d) == 0 and not set(d.block_table) & set(a.block_table)
    bm.check([z, a, b, c, d])
    for s in (z, a, b, c, d):
        bm.free(s)
    assert bm.num_free == 16
    bm.check([])


def test_whole_prompt_match_leaves_one_token():
    bm = BlockManager(num_blocks=8, block_size=16)
    prompt = list(range(32))
    a, b = _seq(prompt), _seq(prompt)
    _run(bm, a)
    assert _run(bm, b) == 16  # both blocks are cached, but the last token must be computed for logits
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    bm.check([a, b])


def test_prefix_sharing_off():
    bm = BlockManager(num_blocks=8, block_size=16, prefix_sharing=False)
    prompt = list(range(40))
    a, b = _seq(prompt), _seq(prompt)
    _run(bm, a)
    assert _run(bm, b) == 0 and b.num_cached == 0 and not set(a.block_table) & set(b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.num_free == 8
    bm.check([])


def test_cached_blocks_survive_free_and_evict_lru():
    bm = BlockManager(num_blocks=4, block_size=4)
    p, q = [1, 2, 3, 4], [5, 6, 7, 8]
    a = _seq(p + [9])
    _run(bm, a)
    bm.free(a)
    b = _seq(q + [9])
    _run(bm, b)
    bm.free(b)
    assert bm.num_free == 4  # cached blocks with ref 0 count as free
    # still matchable after their owners left
    a2 = _seq(p + [10])
    assert _run(bm, a2) == 4
    bm.free(a2)  # p's block was used last: q's is now the least recently used
    bm.check([])
    c = _seq([20] * 9)
    bm.append(c, 9)  # 3 blocks: the 2 free ones, then the least recently used cached block (q's)
    assert bm.num_free == 1
    probe = _seq(q + [0])
    assert bm.match_prefix(probe) == 0, "q's block should have been evicted first"
    bm.free(c)
    d = _seq(p + [11])
    assert _run(bm, d) == 4, "the more recently used cached block must have survived"
    bm.check([d])


def test_eviction_takes_the_tail_of_a_prefix_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = _seq(range(1, 13))  # three full blocks, all published
    _run(bm, a)
    bm.free(a)
    bm.append(_seq([50]), 1)  # the free block
    bm.append(_seq([60]), 1)  # one eviction: the last block of the prefix, not its first
    assert bm.match_prefix(_seq(range(1, 14))) == 8


def test_stale_child_never_matches_after_parent_eviction():
    """Evict a parent, reuse its block id for other content: the old child (computed after the old parent's
    tokens) must not match a sequence that continues the new content with the child's tokens."""
    bm = BlockManager(num_blocks=4, block_size=4)
    p0, p1, q0 = [1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]
    a, b = _seq(p0), _seq(p0 + p1 + [7])
    # admitted in the same step: both compute p0; a publishes it, b's copy stays private
    for s in (a, b):
        bm.match_prefix(s)
        bm.append(s, s.num_tokens)
    for s in (a, b):
        s.num_computed = s.num_tokens
        bm.commit(s)
    bm.check([a, b])
    parent = a.block_table[0]
    bm.free(a)  # the parent is now cached with ref 0, while b's block after p1 (a child of it) is held
    d = _seq(q0)
    _run(bm, d)
    assert d.block_table == [parent], "the only allocatable block was the cached parent: it must be reused"
    bm.free(d)
    bm.free(b)  # b's child block of p0 + p1 becomes cached with ref 0
    bm.check([])
    e = _seq(q0 + p1 + [0])
    assert _run(bm, e) == 4, "matched a block computed after other tokens (stale key of an evicted parent)"
    assert e.block_table[0] == parent
    bm.check([e])


def test_stale_child_after_lru_eviction_of_parent():
    """The same hazard without concurrency: whichever of parent and child the LRU evicts first, a reused block
    id must not make the old child reachable behind new content."""
    bm = BlockManager(num_blocks=2, block_size=4)
    p0, p1, q0 = [1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]
    x = _seq(p0 + p1)
    _run(bm, x)
    bm.free(x)  # both blocks cached with ref 0
    d = _seq(q0)
    _run(bm, d)  # evicts one of them and publishes q0 in its id
    bm.free(d)
    e = _seq(q0 + p1 + [0])
    assert bm.match_prefix(e) == 4, "matched a block computed after p0 behind q0"
    bm.check([e])


def test_concurrent_duplicates_and_partial_blocks_are_not_shared():
    bm = BlockManager(num_blocks=16, block_size=4)
    a, b = _seq(range(10)), _seq(range(10))
    for s in (a, b):
        bm.match_prefix(s)
        bm.append(s, 6)  # a prefill chunk: 6 of 10 tokens
    for s in (a, b):
        s.num_computed = 6
        bm.commit(s)
    c = _seq(range(12))
    assert _run(bm, c) == 4, "only the one full computed block (published by a) is shared"
    for s in (a, b):  # the rest of the prefill
        bm.append(s, 4)
        s.num_computed = 10
        bm.commit(s)
    bm.check([a, b, c])
    f = _seq(range(11))
    assert _run(bm, f) == 8
    for s in (a, b, c, f):
        bm.free(s)
    assert bm.num_free == 16
    bm.check([])
