"""Runner: one engine step on the device. Builds the step's BatchMeta once, runs the model over the paged KV
cache, samples the next tokens.

Decode steps (every sequence computes one token) replay a CUDA graph captured for the smallest batch-size
bucket that holds the batch; the rows past the batch are padding: token 0 at a scratch slot with seq_len 0,
which the attention kernel skips. Prefill and mixed steps run eagerly.

A launch does not wait for the device: its sampled tokens come back through a SampledTokens handle, and stay on
the device (`last`, by batch row) so that the next launch, scheduled before the host has read them (async
scheduling, engine/llm.py), takes its pending input tokens from there.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..config import EngineConfig
from ..errors import FourbitError
from ..graphs import capture
from ..models.attention import BatchMeta, PagedKVCache
from ..models.generate import nucleus
from ..models.llama import LlamaModel
from .scheduler import ScheduledBatch
from .sequence import Sequence

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
CPU_CACHE_BYTES = 2 << 30  # default KV cache on a CPU: enough for tests and small models


class Runner:
    def __init__(self, model: LlamaModel, config: EngineConfig, max_model_len: int, seed: int = 0):
        self.model, self.config, self.max_model_len = model, config, max_model_len
        self.device = model.device
        self.max_blocks = -(-max_model_len // config.block_size)  # block-table width
        self.cache = PagedKVCache(model.config, self._num_blocks() + 1, config.block_size, model.dtype, self.device)
        self.num_blocks = self.cache.num_blocks - 1  # the scheduler's; the last block is the scratch block
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # bucket -> (graph, its static inputs, its logits, their argmax); page-locked staging for the inputs
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict, torch.Tensor, torch.Tensor]] = {}
        self._pinned: dict[int, list[dict[str, torch.Tensor]]] = {}
        # each launch's sampled tokens by batch row, on the device (the next launch reads its pending tokens
        # there) and on their way to the host through two page-locked buffers. Launches alternate (`_flip`)
        # between the two buffers and between two sets of staged graph inputs: the previous launch's copies
        # may not have run yet, the one before it has (the host has collected its tokens).
        rows = config.max_num_seqs
        self.last = torch.zeros(rows, dtype=torch.long, device=self.device)
        pin = self.device.type == "cuda"
        self._host_tokens = [torch.zeros(rows, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._flip = 0
        self.capture_seconds = 0.0
        self._logits = None  # every decode graph's logits, in its leading rows (one buffer instead of one each)
        if config.cuda_graphs and self.device.type == "cuda":
            self._capture_graphs()

    # -- memory ---------------------------------------------------------------------------------------------
    def _num_blocks(self) -> int:
        c, per_block = self.config, PagedKVCache.bytes_per_block(self.model.config, self.config.block_size,
                                                                  self.model.dtype)
        if c.num_blocks is not None:
            return c.num_blocks
        if self.device.type != "cuda":
            want = c.max_num_seqs * self.max_blocks
            return max(self.max_blocks, min(want, CPU_CACHE_BYTES // per_block))
        # What a full step needs besides the cache: measure it with one step of the token budget.
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self._profile_step()
        step_bytes = torch.cuda.max_memory_allocated(self.device) - before
        torch.cuda.empty_cache()  # blocks torch holds but no tensor uses (loading, fusing, this step) count as free
        free, total = torch.cuda.mem_get_info(self.device)
        graphs = 0.5 * 2**30 if c.cuda_graphs else 0  # captured graphs' own pool (measured ~0.3 GB for 7B)
        budget = free * c.kv_cache_fraction - 1.2 * step_bytes - graphs
        blocks = int(budget // per_block)
        if blocks < self.max_blocks:
            raise FourbitError(f"the KV cache fits only {max(blocks, 0)} blocks of {c.block_size} tokens, less than "
                               f"one sequence of max_model_len={self.max_model_len}: lower max_model_len, "
                               f"max_num_batched_tokens, or free GPU memory")
        return blocks

    @torch.inference_mode()
    def _profile_step(self):
        """One prefill of the whole token budget over a throwaway cache: the activation peak of a step."""
        c = self.config
        t = min(c.max_num_batched_tokens, self.max_model_len)
        blocks = -(-t // c.block_size)
        cache = PagedKVCache(self.model.config, blocks, c.block_size, self.model.dtype, self.device)
        pos = torch.arange(t, device=self.device)
        step = {"tokens": torch.zeros_like(pos), "positions": pos, "slots": pos,
                "block_tables": torch.arange(blocks, dtype=torch.int32, device=self.device)[None],
                "seq_lens": torch.tensor([t], dtype=torch.int32, device=self.device),
                "query_start": torch.tensor([0, t], dtype=torch.int32, device=self.device),
                "last": torch.tensor([t - 1], device=self.device)}
        self.model.forward_paged(step["tokens"], batch_meta(step, t), cache)
        del cache

    # -- one step -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, pending: dict[Sequence, int]) -> SampledTokens:
        """Start the batch's step on the device without waiting for it; its SampledTokens hold the token of each
        sequence whose step completes its tokens (a decode, or the last chunk of a prefill). pending: the
        sequences whose last token the previous launch sampled and the host does not know yet, each with its
        row there; the device reads those tokens from that launch's output (async scheduling)."""
        bs = self.config.block_size
        s = len(batch.seqs)
        self._flip ^= 1
        graph = self._bucket(s) if batch.is_decode else None
        rows = graph if graph is not None else s
        tables = [seq.block_table for seq in batch.seqs]
        width = self.max_blocks if graph is not None else max(len(t) for t in tables)
        scratch = self.cache.scratch_block
        # padding rows (graph buckets): token 0, written to the scratch block, seq_len 0 (never attended)
        block_tables = np.full((rows, width), scratch, dtype=np.int32)  # (rows, width); numpy fills rows fast
        for i, t in enumerate(tables):
            block_tables[i, :len(t)] = t
        num_new = np.asarray(batch.num_new)
        starts = np.asarray([seq.num_computed for seq in batch.seqs])
        row = np.repeat(np.arange(s), num_new)  # each new token's sequence
        query_start = np.concatenate(([0], np.cumsum(num_new)))
        positions = starts[row] + np.arange(len(row)) - query_start[:-1][row]
        tokens = [t for seq, n in zip(batch.seqs, batch.num_new) for t in seq.token_range(seq.num_computed,
                                                                                           seq.num_computed + n)]
        pad = rows - s
        src = np.full(len(tokens) + pad, -1, dtype=np.int64)  # a pending token's row in the previous output
        for i, seq in enumerate(batch.seqs):
            if seq in pending:  # its pending token is the last of its new tokens
                src[query_start[i + 1] - 1] = pending[seq]
        host = {
            "tokens": np.asarray(tokens + [0] * pad, dtype=np.int64),
            "src": src,
            "positions": np.concatenate((positions, np.zeros(pad, dtype=np.int64))),
            "slots": np.concatenate((block_tables[row, positions // bs].astype(np.int64) * bs + positions % bs,
                                     np.full(pad, scratch * bs, dtype=np.int64))),
            "block_tables": block_tables,
            "seq_lens": np.concatenate((starts + num_new, np.zeros(pad, dtype=np.int64))).astype(np.int32),
        }
        if graph is not None:  # query_start and last of a decode bucket are fixed aranges, captured as such
            g, static, logits, greedy = self.graphs[graph]
            pinned = self._pinned[graph][self._flip]  # page-locked staging: the copies do not block the host
            for name, a in host.items():
                pinned[name].numpy()[...] = a
                static[name].copy_(pinned[name], non_blocking=True)
            g.replay()  # decode_step: the argmax is in self.last already
            if all(seq.params.temperature == 0 for seq in batch.seqs):
                return self._to_host(greedy[:s], s, in_last=True)
            return self._to_host(self._sample(logits[:s], batch.seqs, greedy[:s].clone()), s)
        want = [i for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)) if seq.num_computed + n == seq.num_tokens]
        host["query_start"] = query_start.astype(np.int32)
        host["last"] = query_start[1:].astype(np.int64) - 1
        host["want"] = np.asarray(want, dtype=np.int64)
        dev = {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in host.items()}
        tokens = self._with_pending(dev["tokens"], dev["src"]) if pending else dev["tokens"]
        logits = self.model.forward_paged(tokens, batch_meta(dev, max(batch.num_new)), self.cache)
        if not want:
            return SampledTokens(None, None, s, [])
        sampled = self._sample(logits[dev["want"]], [batch.seqs[i] for i in want])
        return self._to_host(sampled, s, want, dev["want"])

    def _with_pending(self, tokens, src):
        """The step's input tokens with each pending one (src >= 0) read from the previous launch's output."""
        return torch.where(src >= 0, self.last[src.clamp(min=0)], tokens)

    def _to_host(self, sampled, size: int, rows: list[int] | None = None, index=None,
                 in_last=False) -> SampledTokens:
        """Keep sampled[j], the token of batch row rows[j] (every row 0..size-1 when rows is None; index: rows on
        the device), in self.last at that row for the next launch (unless a graph put it there: in_last) and start
        its copy to the host."""
        if not in_last:
            if rows is None:
                self.last[:size].copy_(sampled)
            else:
                self.last[index] = sampled
        host = self._host_tokens[self._flip][:len(sampled)]
        host.copy_(sampled, non_blocking=True)
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return SampledTokens(host, done, size, rows)

    def _to_device(self, values: list, dtype=torch.long) -> torch.Tensor:
        """A host list as a device tensor without waiting for the device (torch.tensor(..., device=) and indexing
        with a list both synchronize the stream, which would undo async scheduling)."""
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _sample(self, logits, seqs, greedy=None) -> torch.Tensor:
        """logits (S, V) float32 -> one token per sequence (on the device), each with its own SamplingParams.
        greedy: the logits' argmax when already computed (a decode graph's). Nothing here waits for the device."""
        out = logits.argmax(-1) if greedy is None else greedy  # greedy rows keep this
        hot = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
        if hot:
            p = [seqs[i].params for i in hot]
            temp = self._to_device([x.temperature for x in p], torch.float32)[:, None]
            probs = torch.softmax(logits[self._to_device(hot)] / temp, dim=-1)  # (H, V)
            if any(x.top_p < 1 for x in p):  # decided on the host
                probs = nucleus(probs, self._to_device([x.top_p for x in p], torch.float32)[:, None])
            shared = [j for j, x in enumerate(p) if x.seed is None]
            if shared:
                picked = torch.multinomial(probs[self._to_device(shared)], 1, generator=self.generator)[:, 0]
                out[self._to_device([hot[j] for j in shared])] = picked
            for j, x in enumerate(p):
                if x.seed is not None:
                    seq = seqs[hot[j]]
                    if seq.generator is None:
                        seq.generator = torch.Generator(device=logits.device).manual_seed(x.seed)
                    out[hot[j]] = torch.multinomial(probs[j:j + 1], 1, generator=seq.generator)[0, 0]
        return out

    # -- CUDA graphs ----------------------------------------------------------------------------------------
    def _bucket(self, s: int) -> int | None:
        for b in self.graphs:  # ascending
            if b >= s:
                return b
        return None

    def decode_buffers(self, b: int) -> dict:
        """The static inputs of a decode graph of b rows, all padding until launch() fills them."""
        dev, scratch, bs = self.device, self.cache.scratch_block, self.config.block_size
        return {
            "tokens": torch.zeros(b, dtype=torch.long, device=dev),
            "src": torch.full((b,), -1, dtype=torch.long, device=dev),
            "positions": torch.zeros(b, dtype=torch.long, device=dev),
            "slots": torch.full((b,), scratch * bs, dtype=torch.long, device=dev),
            "block_tables": torch.full((b, self.max_blocks), scratch, dtype=torch.int32, device=dev),
            "seq_lens": torch.zeros(b, dtype=torch.int32, device=dev),
            "query_start": torch.arange(b + 1, dtype=torch.int32, device=dev),
            "last": torch.arange(b, device=dev),
        }

    @torch.inference_mode()
    def _capture_graphs(self):
        """Capture a decode step for each bucket up to max_num_seqs, largest first, sharing one memory pool."""
        t0 = time.perf_counter()
        dev = self.device
        sizes = [b for b in GRAPH_BUCKETS if b <= self.config.max_num_seqs]
        if not sizes or sizes[-1] < self.config.max_num_seqs:
            sizes.append(self.config.max_num_seqs)
        pool = torch.cuda.graph_pool_handle()
        self._logits = torch.empty(sizes[-1], self.model.config.vocab_size, device=dev)
        for b in reversed(sizes):
            static = self.decode_buffers(b)
            result = []
            self.install_graph(b, capture(lambda: result.append(self.decode_step(static)), dev, pool), static,
                               *result[-1])
        torch.cuda.synchronize(dev)
        self.capture_seconds = time.perf_counter() - t0

    def decode_step(self, static: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """What a decode graph runs on its static inputs (decode_buffers): the pending tokens read from the
        previous launch's output, the model, the argmax (also left in self.last). Returns (logits, argmax)."""
        b = len(static["tokens"])
        logits = self.model.forward_paged(self._with_pending(static["tokens"], static["src"]), batch_meta(static, 1),
                                          self.cache, None if self._logits is None else self._logits[:b])
        greedy = logits.argmax(-1)
        self.last[:len(greedy)].copy_(greedy)
        return logits, greedy

    def install_graph(self, b: int, graph, static: dict, logits, greedy):
        """Make `graph` (anything with replay()) bucket b's decode step: it runs decode_step(static) and so
        writes `logits` and their argmax `greedy`. Its inputs are staged in page-locked host memory."""
        pin = self.device.type == "cuda"
        self._pinned[b] = [{name: torch.empty_like(static[name], device="cpu", pin_memory=pin)
                            for name in ("tokens", "src", "positions", "slots", "block_tables", "seq_lens")}
                           for _ in range(2)]
        self.graphs = dict(sorted({**self.graphs, b: (graph, static, logits, greedy)}.items()))


class SampledTokens:
    """A launch's sampled tokens on their way to the host (Runner.launch); result() waits for them."""

    def __init__(self, host: torch.Tensor | None, done, size: int, rows: list[int] | None):
        self.host, self.done, self.size, self.rows = host, done, size, rows  # rows None: every batch row

    def result(self) -> list[int | None]:
        """The token of each batch row that sampled, None for the others (a prefill chunk short of the end)."""
        if self.rows == []:
            return [None] * self.size
        if self.done is not None:
            self.done.synchronize()
        if self.rows is None:
            return self.host.tolist()
        out: list[int | None] = [None] * self.size
        for r, t in zip(self.rows, self.host.tolist()):
            out[r] = t
        return out


def batch_meta(t: dict, max_query_len: int) -> BatchMeta:
    """The step's BatchMeta from its tensors by name (as the runner's host, device and graph buffers hold them)."""
    return BatchMeta(t["positions"], t["slots"], t["block_tables"], t["seq_lens"], t["query_start"], t["last"],
                     max_query_len)
