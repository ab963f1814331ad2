"""LLM: the serving engine's front door (continuous batching over a paged KV cache), and AsyncLLM, the same
engine on a background thread for the HTTP server.

    llm = fourbit.LLM(model, tokenizer)                 # a LlamaModel (float or W4A16), or a checkpoint path
    outs = llm.generate(["Once upon a time"], SamplingParams(max_new_tokens=64))

Each step the scheduler picks the sequences and token counts (engine/scheduler.py), the runner computes them and
samples (engine/runner.py), the scheduler appends the tokens and retires finished sequences.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import random
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import torch
from tqdm import tqdm

from ..config import EngineConfig, SamplingParams
from ..errors import FourbitError
from ..models.llama import LlamaModel
from ..models.tokenizer import TextStream, Tokenizer, prompt_ids
from ..nn.fuse import fuse_projections_
from .block_manager import BlockManager
from .runner import Runner
from .scheduler import Scheduler
from .sequence import Sequence


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None  # None without a tokenizer
    finish_reason: str


class LLM:
    def __init__(self, model: LlamaModel | str | Path, tokenizer: Tokenizer | str | Path | None = None,
                 config: EngineConfig | None = None, seed: int = 0, device=None):
        """model: a LlamaModel on its device, or anything fourbit.load reads (a path, dummy:<preset>), loaded
        in bf16 on CUDA (fp32 on a CPU). A model passed in is changed in place for serving: its q/k/v and gate/up
        projections are fused (nn/fuse.py), so quantize or export it before, not after.
        tokenizer: a Tokenizer or its file/folder (default: beside the path)."""
        if not isinstance(model, LlamaModel):
            from ..api import load

            device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            where = Path(str(model))
            model = load(str(model), torch.bfloat16 if device.type == "cuda" else torch.float32, device, seed)
            if tokenizer is None and not str(where).startswith("dummy:"):
                folder = where.parent if where.is_file() else where
                if any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
                    tokenizer = folder
        self.model = fuse_projections_(model.eval())  # q/k/v and gate/up as one GEMM each (in place)
        self.tokenizer = Tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        self.config = config = config or EngineConfig()
        self.max_model_len = min(config.max_model_len or model.config.max_seq_len, model.config.max_seq_len)
        self.runner = Runner(model, config, self.max_model_len, seed)
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size, config.prefix_sharing)
        self.scheduler = Scheduler(config, self.blocks, self.max_model_len, model.config.eos_ids)
        if self.scheduler.max_model_len < self.max_model_len:  # the scheduler caps a sequence at the whole cache
            warnings.warn(f"the KV cache holds {self.scheduler.max_model_len} tokens, fewer than max_model_len="
                          f"{self.max_model_len}: sequences are limited to {self.scheduler.max_model_len} tokens",
                          stacklevel=2)
            self.max_model_len = self.scheduler.max_model_len
        self._ids = itertools.count()
        self._launched = None  # (batch, Scheduler.advance's indices, Runner.launch's SampledTokens) not collected
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "preempted": 0}

    # -- requests -------------------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt: ids as given, or text encoded with BOS (the tokenizer's, else the model's)."""
        if not isinstance(prompt, str):
            return list(prompt)
        if self.tokenizer is None:
            raise FourbitError("text prompts need a tokenizer: pass LLM(model, tokenizer=...) or token ids")
        return prompt_ids(self.tokenizer, prompt, self.model.config.bos_id)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A chat's token ids (Tokenizer.encode_chat), with the BOS a text prompt gets."""
        if self.tokenizer is None:
            raise FourbitError("chats need a tokenizer: pass LLM(model, tokenizer=...)")
        return self.tokenizer.encode_chat(messages, self.model.config.bos_id)

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Queue a request; FourbitError if it can never be served (empty, or longer than max_model_len)."""
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise FourbitError(f"prompt token ids must be in [0, {vocab}) for this model")
        seq = Sequence(next(self._ids), list(prompt_ids), params)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq_id: int) -> None:
        self.scheduler.abort(seq_id)
        if self._launched is not None:  # nothing left to collect from the launched step: forget it
            batch, done, _ = self._launched
            if all(batch.seqs[i].finish_reason == "abort" for i in done):
                self._launched = None

    def has_work(self) -> bool:
        return self.scheduler.has_work or self._launched is not None

    def warmup(self, progress: bool = True) -> float:
        """Run one prefill of each size class of the token budget (2^i - 1, 2^i, 2^i + 1 tokens) so that the
        kernels' compiles for them (Triton specializes on the config each M picks and on M's divisibility) happen
        now instead of inside a user's request. A no-op on a CPU. Returns the seconds taken."""
        if self.runner.device.type != "cuda":
            return 0.0
        t0 = time.perf_counter()
        top = min(self.config.max_num_batched_tokens, self.max_model_len - 1)
        sizes = sorted({n for p in range(1, top.bit_length() + 1) for n in (2**p - 1, 2**p, 2**p + 1) if n <= top})
        rng = random.Random(0)
        vocab = self.model.config.vocab_size
        stats = dict(self.stats)
        for n in tqdm(sizes, desc="warm-up (kernel compiles)", unit="size", disable=not progress):
            # random ids: no prefix sharing with an earlier warm-up prompt, so the step computes all n tokens
            self.add_request([rng.randrange(vocab) for _ in range(n)], SamplingParams(max_new_tokens=1,
                                                                                      temperature=0.0))
            while self.has_work():
                self.step()
        self.stats = stats
        return time.perf_counter() - t0

    def step(self) -> list[Sequence]:
        """One engine step; returns the sequences that got a token or finished. With async scheduling
        (EngineConfig.async_scheduling) those are the previous step's: this step is scheduled and launched
        before the host waits for that one's tokens, so the GPU does not idle while the host works."""
        batch = self.scheduler.schedule()
        self.stats["preempted"] += len(batch.preempted)
        if not batch.seqs:
            return self._collect()
        prev = self._launched  # its sequences still pending: their tokens are this step's inputs, on the device
        pending = {} if prev is None else {prev[0].seqs[i]: i for i in prev[1] if prev[0].seqs[i].pending}
        sampled = self.runner.launch(batch, pending)
        out = self._collect()
        self._launched = batch, self.scheduler.advance(batch), sampled
        self.stats["steps"] += 1
        key = "decode_tokens" if batch.is_decode else "prefill_tokens"
        self.stats[key] += sum(batch.num_new)
        return out if self.config.async_scheduling else out + self._collect()

    def _collect(self) -> list[Sequence]:
        """Wait for the launched step's sampled tokens and hand them to the scheduler (Scheduler.resolve)."""
        if self._launched is None:
            return []
        batch, done, sampled = self._launched
        self._launched = None
        tokens = sampled.result()
        return self.scheduler.resolve([batch.seqs[i] for i in done], [tokens[i] for i in done])

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = True) -> list[Completion]:
        """Complete each prompt (text, or a list of token ids); all are batched together continuously."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise FourbitError(f"{len(prompts)} prompts but {len(params)} SamplingParams: pass one, or one each")
        seqs = [self.add_request(self.encode(p), sp) for p, sp in zip(prompts, params)]
        t0, produced = time.perf_counter(), 0
        with tqdm(total=len(seqs), desc="generate", unit="req", disable=not progress) as bar:
            while self.has_work():
                for seq in self.step():
                    produced += 1
                    if seq.is_finished:
                        bar.update(1)
                bar.set_postfix_str(f"{produced / (time.perf_counter() - t0):.0f} tok/s", refresh=False)
        def text(s):  # as it continues the prompt (a SentencePiece first word keeps its leading space)
            return None if self.tokenizer is None else TextStream(self.tokenizer, s.prompt).add(s.output, final=True)

        return [Completion(s.prompt, list(s.output), text(s), s.finish_reason) for s in seqs]


# -- the async engine the server drives ------------------------------------------------------------------------
@dataclass
class RequestOutput:
    new_tokens: list[int]  # tokens produced since the previous RequestOutput of this request
    finish_reason: str | None  # None while running; "stop" | "length" | "abort" on the last one
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from shared prefix blocks


class QueueFull(FourbitError):
    """More requests are in flight than the engine's max_queued."""


class EngineError(FourbitError):
    """The engine thread stopped on an error (e.g. a device fault); no request can be served."""


@dataclass(eq=False)
class _Request:
    """One AsyncLLM request as both threads see it: what to run, where its outputs go, what was delivered."""
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    seq: Sequence | None = None  # once the engine thread has queued it
    sent: int = 0  # output tokens delivered
    done: bool = False  # its last item is sent (or its consumer left): nothing more goes out

    def send(self, item: RequestOutput | BaseException):
        if self.done:
            return
        self.done = isinstance(item, BaseException) or item.finish_reason is not None
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is closed (server gone)
            pass


class AsyncLLM:
    """An LLM stepping on its own thread. generate() is called from the asyncio loop; requests and aborts cross
    to the engine thread through a queue, outputs come back through each request's asyncio.Queue."""

    def __init__(self, llm: LLM, model_name: str):
        self.llm, self.model_name = llm, model_name
        self.tokenizer, self.max_model_len = llm.tokenizer, llm.max_model_len
        self.max_queued = llm.config.max_queued
        self._inbox: queue.Queue = queue.Queue()  # ("add" | "abort", _Request), None to wake the thread up
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._in_flight = 0

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    async def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="fourbit-engine", daemon=True)
            self._thread.start()

    async def shutdown(self, grace_seconds: float = 5.0):
        """Stop taking requests; let running ones finish for up to grace_seconds, then abort the rest."""
        deadline = time.monotonic() + grace_seconds
        self.max_queued = 0
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def encode(self, text: str) -> list[int]:
        """A text prompt's token ids, as LLM.generate encodes it."""
        return self.llm.encode(text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A chat's token ids, as LLM.encode_chat makes them."""
        return self.llm.encode_chat(messages)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come; a prompt the engine cannot serve raises its FourbitError."""
        if self._error is not None:
            raise EngineError(f"the engine stopped after an error: {self._error!r}")
        if self._in_flight >= self.max_queued:
            raise QueueFull(f"{self._in_flight} requests in flight (max_queued={self.max_queued}): retry later")
        req = _Request(list(prompt_ids), params, asyncio.get_running_loop(), asyncio.Queue())
        self._in_flight += 1
        self._inbox.put(("add", req))
        done = False
        try:
            if self._error is not None:  # the engine thread failed while this request was being queued
                raise EngineError(f"the engine stopped after an error: {self._error!r}")
            while True:
                item = await req.out.get()
                if isinstance(item, BaseException):
                    raise item
                done = item.finish_reason is not None
                yield item
                if done:
                    return
        finally:
            self._in_flight -= 1
            if not done:  # the consumer left early (client gone, task cancelled): free the request's blocks
                self._inbox.put(("abort", req))

    # -- engine thread --------------------------------------------------------------------------------------
    def _loop(self):
        live: dict[int, _Request] = {}  # seq_id -> request, while its sequence is queued or running
        try:
            while not self._stop.is_set():
                self._drain(live, block=not self.llm.has_work())
                if not self.llm.has_work():
                    continue
                for seq in self.llm.step():
                    req = live.get(seq.seq_id)
                    if req is None:  # aborted after its last step was launched
                        continue
                    finished = seq.is_finished
                    req.send(RequestOutput(seq.output[req.sent:], seq.finish_reason if finished else None,
                                           len(seq.prompt), seq.num_cached))
                    req.sent = len(seq.output)
                    if finished:
                        del live[seq.seq_id]
        except BaseException as e:  # a device error: fail every request instead of hanging them
            self._error = e  # set first: generate() checks it after queueing, so no request waits forever
            error = EngineError(f"engine error: {e!r}")
            for req in live.values():
                req.send(error)
            self._answer_inbox(lambda req: error)
            raise
        for req in live.values():  # shut down with requests still running
            self.llm.abort(req.seq.seq_id)
            req.send(RequestOutput([], "abort", len(req.prompt), req.seq.num_cached))
        self._answer_inbox(lambda req: RequestOutput([], "abort", len(req.prompt), 0))

    def _answer_inbox(self, answer):
        """Answer the requests still queued for a stopped engine thread with answer(request)."""
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg is not None and msg[0] == "add":
                msg[1].send(answer(msg[1]))

    def _drain(self, live: dict[int, _Request], block: bool):
        while True:
            try:
                msg = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if msg is None:
                return
            kind, req = msg
            if kind == "add":
                try:
                    req.seq = self.llm.add_request(req.prompt, req.params)
                except FourbitError as e:
                    req.send(e)
                    continue
                live[req.seq.seq_id] = req
            else:  # "abort": its consumer is gone (an add always comes first, from the same coroutine)
                req.done = True
                if req.seq is not None and live.pop(req.seq.seq_id, None) is req:
                    self.llm.abort(req.seq.seq_id)
