"""A stand-in for fourbit.engine.llm.AsyncLLM with the same interface, for testing the server without a model.

Its "model" echoes the prompt: output token i is prompt[i % len(prompt)], BOS left out, so a test knows the text
every request must get. Like the engine it stops at EOS (a prompt holding the EOS id ends its echo there, "stop")
or after max_new_tokens / at max_model_len ("length"), raises its errors at the first __anext__, and hands out
tokens in uneven groups (1, 2, 3, 1, ...) with a delay before each, so multi-byte characters split across outputs
and streaming, concurrency and disconnects are real.
"""
from __future__ import annotations

import asyncio

from fourbit.config import SamplingParams
from fourbit.engine.llm import EngineError, QueueFull, RequestOutput
from fourbit.errors import FourbitError


class FakeAsyncLLM:
    def __init__(self, tokenizer, model_name: str = "fake-model", max_model_len: int = 2048, max_queued: int = 256,
                 delay: float = 0.002):
        self.tokenizer, self.model_name = tokenizer, model_name
        self.max_model_len, self.max_queued, self.delay = max_model_len, max_queued, delay
        self.requests: list[tuple[list[int], SamplingParams]] = []  # every accepted generate(), in order
        self.aborted = 0  # requests whose consumer left before the last output
        self.peak_in_flight = 0
        self.started = self.shut_down = False
        self.fail_after: int | None = None  # outputs per request before the "device" fails (engine error path)
        self.dead = False  # after a failure every new request is refused, as AsyncLLM does
        self._in_flight = 0

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    async def start(self):
        self.started = True

    async def shutdown(self):
        self.shut_down = True

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=self.tokenizer.bos_id is not None)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode_chat(messages)

    async def generate(self, prompt_ids: list[int], params: SamplingParams):
        if not self.started or self.shut_down:
            raise FourbitError("the fake engine is not running")
        if self.dead:
            raise EngineError("the engine stopped after an error: RuntimeError('CUDA error: an illegal memory access')")
        if self._in_flight >= self.max_queued:
            raise QueueFull(f"{self._in_flight} requests in flight (max_queued={self.max_queued}): retry later")
        if not prompt_ids or len(prompt_ids) + 1 > self.max_model_len:
            raise FourbitError(f"the prompt has {len(prompt_ids)} tokens; this engine serves at most "
                               f"{self.max_model_len} per sequence: shorten the prompt")
        if any(not 0 <= t < self.tokenizer.vocab_size for t in prompt_ids):
            raise FourbitError(f"prompt token ids must be in [0, {self.tokenizer.vocab_size}) for this model")
        self.requests.append((list(prompt_ids), params))
        self._in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        source = [t for t in prompt_ids if t != self.tokenizer.bos_id] or list(prompt_ids)
        limit = min(params.max_new_tokens, self.max_model_len - len(prompt_ids))
        produced, group, finish = 0, 1, None
        try:
            while finish is None:
                await asyncio.sleep(self.delay)
                if self.fail_after is not None and produced >= self.fail_after:
                    raise EngineError("engine error: RuntimeError('CUDA error: an illegal memory access')")
                new = []
                while len(new) < group:
                    if produced == limit:
                        finish = "length"
                        break
                    token = source[produced % len(source)]
                    if token == self.tokenizer.eos_id and params.stop_at_eos:
                        finish = "stop"  # like the engine: EOS ends the request and is not part of the output
                        break
                    new.append(token)
                    produced += 1
                group = group % 3 + 1
                yield RequestOutput(new, finish, len(prompt_ids), 0)
        finally:
            self._in_flight -= 1
            if finish is None:
                self.aborted += 1
