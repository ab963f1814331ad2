"""Paged KV cache bookkeeping: which physical blocks each sequence owns, and prefix sharing between them.

Blocks are ids 0..num_blocks-1 (the runner keeps one more physical block for padding; it is not ours).
Each block is in exactly one state:
  free       ref 0, holds nothing reusable                          (in `_free`)
  cached     ref 0, a published full block, matchable until evicted (in `_evictable`, LRU order)
  in use     ref >= 1: in the block table of that many sequences
Only FULL blocks whose K/V are computed are published, so a sequence only ever writes into blocks it owns
alone (its unpublished tail): no copy-on-write.

Sharing key. A block's K/V depend on every token before it, so a block is identified by its whole prefix:
key = (parent uid, tokens of this block), where the parent uid is a fresh int handed out when the parent's
content was published. Uids are never reused: when a cached block is evicted its key is forgotten, and the
same content published again gets a new uid, so children keyed by the old uid can never be matched again
(a reused block id cannot alias a stale child, as it could if blocks were keyed by their parent's block id).
The comparison is exact (dict lookup on ints and token tuples), not a hash that could collide silently.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Iterable

from ..errors import FourbitError
from .sequence import Sequence

_ROOT = -1  # parent uid of a sequence's first block


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_sharing: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise FourbitError(f"the KV cache needs num_blocks >= 1 and block_size >= 1, got num_blocks={num_blocks}, "
                               f"block_size={block_size}: give the KV cache more memory or set num_blocks")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_sharing = prefix_sharing
        self._ref = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest release first
        self._cached: dict[tuple[int, tuple[int, ...]], int] = {}  # key -> block id of every published block
        # block id -> (its key, the uid of its content), published blocks only
        self._pub: dict[int, tuple[tuple[int, tuple[int, ...]], int]] = {}
        self._next_uid = 0
        # per sequence: content uids of its leading full computed blocks, in order (the parent chain for the
        # next block's key). A block that duplicated an already published one stays private but takes that
        # one's uid: the uid names the content, not the physical block.
        self._seq_uids: dict[Sequence, list[int]] = {}

    @property
    def num_free(self) -> int:
        """Blocks allocatable now: free ones plus cached ones nobody uses (they get evicted on demand)."""
        return len(self._free) + len(self._evictable)

    def match_prefix(self, seq: Sequence) -> int:
        """Attach the shared full blocks that hold a prefix of `seq`'s tokens; returns the tokens they cover.

        `seq` must own no blocks. Sets num_computed to the matched tokens and num_cached to the matched prompt
        tokens. At least one token is left to compute, so the sequence's next step produces logits.
        """
        if seq.block_table:
            raise RuntimeError(f"match_prefix on sequence {seq.seq_id}, which already owns blocks")
        seq.num_computed = seq.num_cached = 0
        if not self.prefix_sharing:
            return 0
        tokens, bs = seq.tokens, self.block_size
        uids: list[int] = []
        parent = _ROOT
        for i in range((len(tokens) - 1) // bs):  # full blocks, never the one holding the last token
            block = self._cached.get((parent, tuple(tokens[i * bs:(i + 1) * bs])))
            if block is None:
                break
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
            seq.block_table.append(block)
            parent = self._pub[block][1]
            uids.append(parent)
        if uids:
            self._seq_uids[seq] = uids
        seq.num_computed = len(uids) * bs
        seq.num_cached = min(seq.num_computed, len(seq.prompt))  # after preemption, output tokens match too
        return seq.num_computed

    def blocks_needed(self, seq: Sequence, n: int) -> int:
        """New blocks `seq` needs to hold num_computed + n tokens."""
        return max(0, cdiv(seq.num_computed + n, self.block_size) - len(seq.block_table))

    def can_append(self, seq: Sequence, n: int) -> bool:
        return self.blocks_needed(seq, n) <= self.num_free

    def append(self, seq: Sequence, n: int) -> None:
        """Grow seq.block_table to hold num_computed + n tokens (check can_append first)."""
        need = self.blocks_needed(seq, n)
        if need > self.num_free:
            raise RuntimeError(f"sequence {seq.seq_id} needs {need} KV blocks, {self.num_free} free: "
                               f"the scheduler must check can_append first")
        for _ in range(need):
            seq.block_table.append(self._allocate())

    def commit(self, seq: Sequence) -> None:
        """After a step advanced seq.num_computed: publish the blocks that became full and computed."""
        if not self.prefix_sharing:
            return
        bs, full = self.block_size, seq.num_computed // self.block_size
        uids = self._seq_uids.setdefault(seq, [])
        if full <= len(uids):
            return
        tokens = seq.tokens
        for i in range(len(uids), full):
            key = (uids[-1] if uids else _ROOT, tuple(tokens[i * bs:(i + 1) * bs]))
            twin = self._cached.get(key)
            if twin is not None:  # computed concurrently by another sequence: keep ours private, share the uid
                uids.append(self._pub[twin][1])
                continue
            block = seq.block_table[i]
            self._cached[key] = block
            self._pub[block] = key, self._next_uid
            uids.append(self._next_uid)
            self._next_uid += 1

    def free(self, seq: Sequence) -> None:
        """Release all of seq's blocks (num_computed becomes 0); published ones stay matchable until evicted."""
        # tail first, so that its blocks are evicted before the prefix blocks they depend on
        for block in reversed(seq.block_table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._pub:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_table = []
        seq.num_computed = 0
        self._seq_uids.pop(seq, None)

    def _allocate(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:  # evict the least recently released cached block; its key dies with it (see module docstring)
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._pub.pop(block)[0]]
        self._ref[block] = 1
        return block

    def check(self, seqs: Iterable[Sequence] | None = None) -> None:
        """Test helper: raise RuntimeError when an invariant is broken.

        With `seqs` (every sequence that owns blocks), also check that ref counts equal block-table counts.
        """
        def fail(msg):
            raise RuntimeError(f"block manager invariant broken: {msg}")

        free, evictable = set(self._free), set(self._evictable)
        if len(free) != len(self._free):
            fail("a block is twice in the free list")
        if free & evictable:
            fail(f"blocks both free and cached: {sorted(free & evictable)}")
        for b in range(self.num_blocks):
            ref = self._ref[b]
            if ref < 0:
                fail(f"block {b} has ref count {ref}")
            if (ref == 0) != (b in free or b in evictable):
                fail(f"block {b} has ref count {ref} but free={b in free}, cached={b in evictable}")
            if b in free and b in self._pub:
                fail(f"free block {b} is still published")
            if b in evictable and b not in self._pub:
                fail(f"cached block {b} is not published")
        if len(self._cached) != len(self._pub) or any(self._cached.get(k) != b for b, (k, _) in self._pub.items()):
            fail("the key -> block and block -> key maps disagree")
        if seqs is None:
            return
        seqs = list(seqs)
        counts = [0] * self.num_blocks
        for s in seqs:
            for b in s.block_table:
                counts[b] += 1
            if s.num_computed > len(s.block_table) * self.block_size:
                fail(f"sequence {s.seq_id} has {s.num_computed} tokens computed in {len(s.block_table)} blocks")
            if len(self._seq_uids.get(s, ())) > s.num_computed // self.block_size:
                fail(f"sequence {s.seq_id} has more published blocks than full computed blocks")
        if counts != self._ref:
            bad = [b for b in range(self.num_blocks) if counts[b] != self._ref[b]]
            fail(f"ref counts differ from block tables for blocks {bad[:10]}")
        if not set(self._seq_uids) <= set(seqs):
            fail("prefix chains kept for sequences that own no blocks")
