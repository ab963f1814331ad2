"""One generation request as the engine tracks it: its tokens, its KV blocks and how far they are computed.

Token/step semantics (shared with the scheduler and the runner): `tokens = prompt + output`; the first
`num_computed` tokens have K/V in the cache, in the physical blocks listed in `block_table` (token t lives in
block `block_table[t // block_size]` at offset `t % block_size`). A step computes
`tokens[num_computed : num_computed + n]`; when that reaches the last token, the step samples one new token.

With async scheduling (EngineConfig.async_scheduling) a sampled token reaches the host one step late: until
then the sequence is `pending`, its token counted in num_tokens (the next step is scheduled and launched with it,
the runner taking its value on the device) but not yet in `output` or `tokens`.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ..config import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted: blocks freed, to be recomputed)
    RUNNING = "running"  # holds KV blocks and is scheduled step after step
    FINISHED = "finished"


@dataclass(eq=False)  # identity equality and hashing: sequences are dict keys and list members by identity
class Sequence:
    seq_id: int
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    arrival: float = field(default_factory=time.monotonic)
    output: list[int] = field(default_factory=list)  # new tokens, excluding the prompt
    block_table: list[int] = field(default_factory=list)  # physical block ids, in token order
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    num_cached: int = 0  # prompt tokens served from shared prefix blocks at the last scheduling (stats)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None  # "stop" (EOS), "length" (max_new_tokens or max_model_len), "abort"
    generator: object = None  # the torch.Generator of a request with its own seed (made at its first sample)
    pending: bool = False  # a token was sampled on the device and is not yet in `output`

    def __post_init__(self):
        # plain ints: prefix sharing keys blocks by token tuples, and a tensor or numpy scalar would hash by
        # identity or compare elementwise instead of by value
        self.prompt = [int(t) for t in self.prompt]

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def token_range(self, start: int, end: int) -> list[int]:
        """tokens[start:end] without building the whole list (the runner asks every step); a pending token
        (end = num_tokens) reads as 0, a placeholder the runner replaces on the device."""
        p = len(self.prompt)
        known = self.output[start - p:end - p] if start >= p else self.prompt[start:end] + self.output[:max(0, end - p)]
        return known + [0] if self.pending and start < self.num_tokens <= end else known

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output) + self.pending

    @property
    def num_output(self) -> int:
        """Output tokens sampled so far, a pending one included."""
        return len(self.output) + self.pending

    @property
    def is_finished(self) -> bool:
        """Finished with its last token in `output` (a sequence finished for length may still await it)."""
        return self.status is SeqStatus.FINISHED and not self.pending
