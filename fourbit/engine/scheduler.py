"""Continuous batching: which sequences compute how many tokens in the next step.

Each step has a token budget (max_num_batched_tokens) shared by decodes (1 token each) and prefill chunks, and
at most max_num_seqs sequences. Running sequences go first, oldest arrival first: their decodes and the next
chunk of a prefill in progress (chunked prefill: a long prompt is computed over several steps, so it never
stalls the decodes of others). When KV blocks run out, the most recently arrived running sequence is preempted
by recompute: it frees its blocks and goes back to the front of the waiting queue, keeping its output tokens.
Then waiting sequences are admitted in FIFO order (shared prefix blocks first) while budget, blocks and
max_num_seqs allow; the head of the queue is never overtaken, so a big request cannot starve.
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from ..config import EngineConfig
from ..errors import FourbitError
from .block_manager import BlockManager, cdiv
from .sequence import Sequence, SeqStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new: list[int]  # tokens to compute per sequence this step: tokens[num_computed : num_computed + n]
    preempted: list[Sequence] = field(default_factory=list)  # preempted while building this batch (stats)

    def __post_init__(self):
        # fixed at scheduling time: update() advances num_computed afterwards
        self._decode = bool(self.seqs) and all(
            n == 1 and s.num_computed == s.num_tokens - 1 for s, n in zip(self.seqs, self.num_new))

    @property
    def is_decode(self) -> bool:
        """Every sequence computes exactly its last token (and samples the next one); False when empty."""
        return self._decode

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


def _order(seq: Sequence):
    return seq.arrival, seq.seq_id


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, max_model_len: int,
                 eos_ids: Iterable[int]):
        if config.block_size != block_manager.block_size:
            raise FourbitError(f"EngineConfig.block_size={config.block_size} differs from the block manager's "
                               f"{block_manager.block_size}: build both from the same config")
        self.config = config
        self.bm = block_manager
        # A sequence can never outgrow the whole cache: past it, even alone it could not get a block. Such a
        # sequence finishes with "length" there, as at max_model_len.
        self.max_model_len = min(max_model_len, block_manager.num_blocks * block_manager.block_size)
        self._asked_len = max_model_len  # as configured (error messages name what the prompt exceeds)
        self.eos_ids = frozenset(int(t) for t in eos_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by (arrival, seq_id): oldest first
        self._live: dict[int, Sequence] = {}  # seq_id -> waiting or running sequence

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (FIFO); FourbitError if it can never be served."""
        n, bs = len(seq.prompt), self.bm.block_size
        if n == 0:
            raise FourbitError("empty prompt: a request needs at least one token (e.g. the BOS token)")
        if n + 1 > self.max_model_len:
            limit = (f"max_model_len={self._asked_len}" if n + 1 > self._asked_len else
                     f"the KV cache's num_blocks={self.bm.num_blocks} of {bs} tokens")
            raise FourbitError(f"prompt of {n} tokens leaves no room for a new token within {limit}: shorten the "
                               f"prompt to at most {self.max_model_len - 1} tokens, or raise max_model_len or the "
                               f"KV cache memory (num_blocks / kv_cache_memory)")
        if seq.seq_id in self._live:
            raise FourbitError(f"sequence id {seq.seq_id} is already queued or running: use a fresh id")
        if seq.status is not SeqStatus.WAITING or seq.output or seq.block_table:
            raise FourbitError(f"sequence {seq.seq_id} was already scheduled: add a fresh Sequence")
        seq.num_computed = seq.num_cached = 0
        self._live[seq.seq_id] = seq
        self.waiting.append(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        """Finish a waiting or running sequence with "abort" and free its blocks; None if not live."""
        seq = self._live.get(seq_id)
        if seq is None:
            return None
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        self._finish(seq, "abort")
        return seq

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        seqs: list[Sequence] = []
        num_new: list[int] = []
        preempted: list[Sequence] = []

        # 1. running sequences, oldest first; victims are taken from the newest end, never already scheduled
        i = 0
        while i < len(self.running) and budget > 0 and len(seqs) < self.config.max_num_seqs:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.bm.can_append(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:  # preempted itself: nothing newer was left to preempt
                break
            self.bm.append(seq, n)
            seqs.append(seq)
            num_new.append(n)
            budget -= n
            i += 1

        # 2. admit waiting sequences in FIFO order; not after a preemption (blocks are short this step)
        while (self.waiting and not preempted and budget > 0 and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            self.bm.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.bm.can_append(seq, n):
                self.bm.free(seq)  # give the matched blocks back; the head waits for blocks (no overtaking)
                seq.num_cached = 0
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=_order)
            self.bm.append(seq, n)
            seqs.append(seq)
            num_new.append(n)
            budget -= n
        return ScheduledBatch(seqs, num_new, preempted)

    def update(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Sequence]:
        """Apply a step's results: sampled[i] is the new token of batch.seqs[i] when its step reached its
        last token, else None. Returns the sequences that got a token or finished, in batch order."""
        if len(sampled) != len(batch.seqs):
            raise RuntimeError(f"update got {len(sampled)} sampled tokens for a batch of {len(batch.seqs)}")
        done = self.advance(batch)
        return self.resolve([batch.seqs[i] for i in done], [sampled[i] for i in done])

    def advance(self, batch: ScheduledBatch) -> list[int]:
        """The first half of update(), before the sampled tokens are known: count the step's tokens as computed,
        mark each sequence that reached its last token `pending` (or finish it: "length" is known without the
        token's value). Returns the batch indices of those sequences, for resolve()."""
        done = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            if seq.status is not SeqStatus.RUNNING:  # aborted between schedule() and now
                continue
            seq.num_computed += n
            self.bm.commit(seq)
            if seq.num_computed < seq.num_tokens:  # a prefill chunk that did not reach the end
                continue
            done.append(i)
            if len(seq.output) < seq.params.max_new_tokens:  # max_new_tokens == 0: prefill only, no token
                seq.pending = True
            if seq.num_output >= seq.params.max_new_tokens or seq.num_tokens >= self.max_model_len:
                self._finish(seq, "length")
        if any(batch.seqs[i].status is SeqStatus.FINISHED for i in done):
            self.running = [s for s in self.running if s.status is SeqStatus.RUNNING]
        return done

    def resolve(self, seqs: list[Sequence], sampled: list[int | None]) -> list[Sequence]:
        """The second half of update(): the sampled tokens of the sequences advance() returned. A token is
        appended, or an EOS finishes its sequence with "stop" (wherever it is by now: running, preempted to the
        waiting queue, or finished for length). Returns the sequences to report; aborted ones are not."""
        out = []
        for seq, token in zip(seqs, sampled):
            if seq.finish_reason == "abort":
                seq.pending = False
                continue
            if seq.pending:
                if token is None:
                    raise RuntimeError(f"sequence {seq.seq_id} completed its tokens but no token was sampled")
                seq.pending = False
                if seq.params.stop_at_eos and int(token) in self.eos_ids:
                    if seq.status is SeqStatus.FINISHED:  # for length, by advance(): the EOS came first
                        seq.finish_reason = "stop"
                    else:
                        (self.running if seq.status is SeqStatus.RUNNING else self.waiting).remove(seq)
                        self._finish(seq, "stop")
                else:
                    seq.output.append(int(token))
            out.append(seq)
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.status = SeqStatus.WAITING
        seq.num_cached = 0
        self.waiting.appendleft(seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and free its blocks; the caller takes it out of `running` / `waiting`."""
        self.bm.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        del self._live[seq.seq_id]

    def check(self) -> None:
        """Test helper, between steps: raise RuntimeError when a scheduler or block-manager invariant is broken."""
        def fail(msg):
            raise RuntimeError(f"scheduler invariant broken: {msg}")

        bs = self.bm.block_size
        if len(self.running) > self.config.max_num_seqs:
            fail(f"{len(self.running)} running sequences, max_num_seqs={self.config.max_num_seqs}")
        if self.running != sorted(self.running, key=_order):
            fail("running sequences are not in arrival order")
        for s in self.waiting:
            if s.status is not SeqStatus.WAITING or s.block_table or s.num_computed:
                fail(f"waiting sequence {s.seq_id} is {s.status} with {len(s.block_table)} blocks, "
                     f"{s.num_computed} computed")
        for s in self.running:
            if s.status is not SeqStatus.RUNNING or not 0 <= s.num_computed < s.num_tokens:
                fail(f"running sequence {s.seq_id} is {s.status} with {s.num_computed}/{s.num_tokens} computed")
            if len(s.block_table) != cdiv(s.num_computed, bs):
                fail(f"sequence {s.seq_id}: {len(s.block_table)} blocks for {s.num_computed} computed tokens")
            if s.num_tokens > self.max_model_len or s.num_output > s.params.max_new_tokens:
                fail(f"sequence {s.seq_id} outgrew its limits")
        live = list(self.waiting) + self.running
        if len(live) != len(self._live) or any(self._live.get(s.seq_id) is not s for s in live):
            fail("the seq_id index disagrees with the queues")
        self.bm.check(self.running)
