"""`fourbit bench e2e`: end-to-end serving benchmarks on a GPU, fourbit's engine in bf16 and W4A16 against
Hugging Face transformers bf16 `generate`, on dummy (seeded random) Llama models.

(a) decode: batch-1 decode tokens/s (prompt 128, 256 new tokens), and its fraction of the HBM floor:
    floor tokens/s = copy bandwidth / bytes a decode step must read (all weights but the embedding table).
(b) throughput: prompts of 1024 random tokens, 512 new tokens each, all submitted at once, for batches 32, 64
    and the largest (up to 512) whose KV cache fits the memory left beside the weights (QServe's setup: a
    smaller model leaves room for a larger batch). Throughput = generated tokens / wall time, prefill included.
    transformers runs batch 64, or 32 where 64 does not fit (its own generate, default dynamic cache, SDPA).
(c) serving: `fourbit serve` in a subprocess; clients send streaming /v1/completions at Poisson request rates
    (prompt 512, 128 new tokens); TTFT, TPOT and throughput per rate (`--sweep`).
EOS never stops a sequence here (random weights), so every request produces its full length.
"""
from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch

from .bench import _ceilings, result_stem, run_meta
from .config import EngineConfig, SamplingParams, W4A16Config

DECODE_PROMPT, DECODE_NEW = 128, 256
TP_PROMPT, TP_NEW, PEER_BATCHES = 1024, 512, (64, 32)  # the peer runs the first batch that fits


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def _read_bytes(model) -> int:
    """Bytes a decode step reads: every parameter and buffer but the embedding table (one row of it is read)."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    total = sum(t.numel() * t.element_size() for n, t in tensors.items() if n != "embed_tokens.weight")
    if model.lm_head is None:  # tied: the classifier reads the embedding table
        total += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def _run(llm, prompts, params) -> dict:
    """Submit all prompts at once and step until done: wall time, first-token time, tokens."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    seqs = [llm.add_request(p, params) for p in prompts]
    first = None
    while llm.has_work():
        events = llm.step()
        if first is None and events:
            first = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    new = sum(len(s.output) for s in seqs)
    return {"batch": len(prompts), "wall_s": wall, "first_token_s": first, "new_tokens": new,
            "tokens_per_s": new / wall}


def bench_engine(preset: str, scheme: str, bandwidth: float, seed: int = 0) -> dict:
    from .api import quantize_
    from .engine.llm import LLM
    from .models.loader import dummy_model

    model = dummy_model(preset, torch.bfloat16, "cuda", seed)
    if scheme == "w4a16":
        quantize_(model, W4A16Config(group_size=128), progress=False)
    gc.collect()
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated()
    max_len = TP_PROMPT + TP_NEW
    config = EngineConfig(max_model_len=max_len, max_num_seqs=512, max_num_batched_tokens=8192)
    t0 = time.perf_counter()
    llm = LLM(model, config=config, seed=seed)
    setup = time.perf_counter() - t0
    warmup = llm.warmup(progress=False)  # kernel compiles for each prefill size class, as `fourbit serve` does
    vocab = model.config.vocab_size
    greedy = dict(temperature=0.0, stop_at_eos=False)
    out = {"preset": preset, "scheme": scheme, "weight_GB": weights / 1e9, "kv_blocks": llm.runner.num_blocks,
           "engine_setup_s": setup, "graph_capture_s": llm.runner.capture_seconds, "warmup_s": warmup}

    # (a) batch-1 decode: time per token after the first
    llm.generate(_prompts(1, DECODE_PROMPT, vocab, seed), SamplingParams(8, **greedy), progress=False)  # warm
    seq = llm.add_request(_prompts(1, DECODE_PROMPT, vocab, seed + 1)[0], SamplingParams(DECODE_NEW, **greedy))
    while not seq.output:
        llm.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while llm.has_work():
        llm.step()
    decode_s = (time.perf_counter() - t0) / (len(seq.output) - 1)
    read = _read_bytes(model)
    out["decode"] = {"tokens_per_s": 1 / decode_s, "ms_per_token": 1e3 * decode_s, "bytes_per_step": read,
                     "floor_tokens_per_s": bandwidth / read, "fraction_of_floor": read / bandwidth / decode_s}

    # (b) throughput at batch 64 and at the largest batch the cache holds
    blocks_per_seq = -(-max_len // config.block_size)
    largest = min(config.max_num_seqs, llm.runner.num_blocks // blocks_per_seq)
    params = SamplingParams(TP_NEW, **greedy)
    out["throughput"] = []
    for batch in sorted({min(b, largest) for b in PEER_BATCHES} | {largest}):
        stats0 = dict(llm.stats)
        r = _run(llm, _prompts(batch, TP_PROMPT, vocab, seed + 2), params)
        r["preempted"] = llm.stats["preempted"] - stats0["preempted"]
        out["throughput"].append(r)
    out["largest_batch"] = largest
    del llm, model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def bench_transformers(preset: str, seed: int = 0) -> dict:
    """Hugging Face transformers bf16 generate on the same shapes (random weights): batch 64, 1024 -> +512."""
    import transformers

    from .models.loader import PRESETS

    c = PRESETS[preset]
    cfg = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
                                   num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                                   num_key_value_heads=c.n_kv_heads, rope_theta=c.rope_theta,
                                   max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
                                   tie_word_embeddings=c.tie_embeddings)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    out = {"preset": preset, "scheme": "transformers bf16", "transformers": transformers.__version__,
           "throughput": [], "out_of_memory": []}
    for batch in PEER_BATCHES:
        ids = torch.tensor(_prompts(batch, TP_PROMPT, c.vocab_size, seed + 2), device="cuda")
        try:
            with torch.inference_mode():
                warm = ids[:2, :64]
                model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, min_new_tokens=4, **kw)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                res = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=TP_NEW,
                                     min_new_tokens=TP_NEW, **kw)
            torch.cuda.synchronize()
        except torch.OutOfMemoryError:  # its cache does not fit: say so, try the next smaller batch
            out["out_of_memory"].append(batch)
            del ids
            gc.collect()
            torch.cuda.empty_cache()
            continue
        wall = time.perf_counter() - t0
        new = (res.shape[1] - TP_PROMPT) * batch
        out["throughput"].append({"batch": batch, "wall_s": wall, "new_tokens": new, "tokens_per_s": new / wall})
        break
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def run_e2e_bench(presets, schemes=("bf16", "w4a16"), peer: bool = True, out_dir=None, seed: int = 0) -> dict:
    bandwidth, _ = _ceilings()
    meta = run_meta(measured_copy_bandwidth_TBps=bandwidth / 1e12,
                    decode=f"batch 1, prompt {DECODE_PROMPT}, {DECODE_NEW} new tokens",
                    throughput=f"prompt {TP_PROMPT}, {TP_NEW} new tokens, all requests at once")
    rows = []
    for preset in presets:
        runs = [lambda s=s: bench_engine(preset, s, bandwidth, seed) for s in schemes]
        for run in runs + ([lambda: bench_transformers(preset, seed)] if peer else []):
            try:
                rows.append(run())
            except Exception as e:  # noqa: BLE001  report it, measure the rest
                print(f"{preset}: a run failed: {e!r}", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
                continue
            print(_line(rows[-1]), flush=True)
            if out_dir is not None:  # after every row: a later failure keeps what was measured
                write_e2e(Path(out_dir), meta, rows)
    return {"meta": meta, "rows": rows}


def _line(r: dict) -> str:
    d = r.get("decode")
    head = f"{r['preset']:>12} {r['scheme']:<18}"
    if d:
        head += f" decode {d['tokens_per_s']:7.1f} tok/s ({100 * d['fraction_of_floor']:.0f}% of floor)"
    return head + "  " + "  ".join(f"B={t['batch']}: {t['tokens_per_s']:8.0f} tok/s" for t in r["throughput"])


def write_e2e(out_dir: Path, meta: dict, rows: list):
    """<gpu>-e2e.json and .md; rows (preset, scheme) this run did not measure are kept from the previous file,
    with the date they were measured on."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result_stem(meta["gpu"], "e2e")
    path = out_dir / f"{stem}.json"
    rows = [{"date": meta["date"], **r} for r in rows]
    ran = {(r["preset"], r["scheme"]) for r in rows}
    if path.is_file():
        old = json.loads(path.read_text())
        kept = [{"date": old["meta"]["date"], **r} for r in old["rows"] if (r["preset"], r["scheme"]) not in ran]
        rows = sorted(kept + rows, key=lambda r: (r["preset"], r["scheme"] != "bf16", r["scheme"] != "w4a16"))
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# End-to-end serving on {meta['gpu']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}; dummy (random-weight) models, greedy, EOS ignored. "
             f"Copy bandwidth measured here: {meta['measured_copy_bandwidth_TBps']:.2f} TB/s.", "",
             f"## Batch-1 decode ({meta['decode']})", "",
             "| model | scheme | tokens/s | ms/token | floor tokens/s | % of HBM floor |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "decode" in r:
            d = r["decode"]
            lines.append(f"| {r['preset']} | {r['scheme']} | {d['tokens_per_s']:.1f} | {d['ms_per_token']:.2f} | "
                         f"{d['floor_tokens_per_s']:.1f} | {100 * d['fraction_of_floor']:.0f}% |")
    lines += ["", f"## Throughput ({meta['throughput']})", "",
              "Generated tokens per second, prefill included; the last batch of each engine row is the largest whose "
              "KV cache fits beside its weights.", "",
              "| model | scheme | weights (GB) | batch | tokens/s | vs bf16 engine, same batch | wall (s) |",
              "|---|---|---|---|---|---|---|"]
    base = {(r["preset"], t["batch"]): t["tokens_per_s"] for r in rows if r["scheme"] == "bf16"
            for t in r["throughput"]}
    for r in rows:
        for t in r["throughput"]:
            ref = base.get((r["preset"], t["batch"]))
            ratio = f"{t['tokens_per_s'] / ref:.2f}x" if ref else "–"
            weights = f"{r['weight_GB']:.1f}" if "weight_GB" in r else "–"
            lines.append(f"| {r['preset']} | {r['scheme']} | {weights} | {t['batch']} | {t['tokens_per_s']:.0f} | "
                         f"{ratio} | {t['wall_s']:.1f} |")
    for r in rows:
        if r.get("out_of_memory"):
            lines.append(f"\n{r['scheme']} ran out of GPU memory on {r['preset']} at batch "
                         f"{', '.join(map(str, r['out_of_memory']))}.")
    older = sorted({(r["date"], r["preset"], r["scheme"]) for r in rows if r["date"] != meta["date"]})
    if older:
        lines.append("\nRows kept from earlier runs: " + "; ".join(f"{p} {s} ({d})" for d, p, s in older) + ".")
    best = {(r["preset"], r["scheme"]): max(t["tokens_per_s"] for t in r["throughput"]) for r in rows
            if r["scheme"] in ("bf16", "w4a16")}
    for preset in dict.fromkeys(p for p, _ in best):
        if (preset, "bf16") in best and (preset, "w4a16") in best:
            lines.append(f"\nMax throughput, {preset}: w4a16 / bf16 = "
                         f"{best[preset, 'w4a16'] / best[preset, 'bf16']:.2f}x (each at its largest batch).")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")


# -- (c) request-rate sweep against `fourbit serve` --------------------------------------------------------------
SWEEP_PROMPT, SWEEP_NEW, SWEEP_REQUESTS, SWEEP_RATES = 512, 128, 128, (2.0, 8.0, 32.0, float("inf"))


async def _client(url: str, prompts, rate: float, seed: int) -> dict:
    """Send the prompts as streaming completions, arrivals Poisson at `rate` per second (inf: all at once)."""
    import asyncio
    import random

    import httpx

    rng = random.Random(seed)
    results = []

    async def one(client, prompt, delay):
        await asyncio.sleep(delay)
        body = {"prompt": prompt, "max_tokens": SWEEP_NEW, "temperature": 0, "stream": True,
                "ignore_eos": True}
        t0 = time.perf_counter()
        stamps = []
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"server answered {r.status_code}: {await r.aread()}")
            async for line in r.aiter_lines():  # one stamp per chunk that carries text (a token or more)
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
        # EOS ignored: every stream carries SWEEP_NEW tokens, however the server grouped them into chunks
        results.append({"ttft": stamps[0] - t0, "tpot": (stamps[-1] - stamps[0]) / (SWEEP_NEW - 1),
                        "chunks": len(stamps), "end": stamps[-1]})

    delays, t = [], 0.0
    for _ in prompts:
        delays.append(t)
        t += 0 if rate == float("inf") else rng.expovariate(rate)
    start = time.perf_counter()
    limits = httpx.Limits(max_connections=len(prompts) + 8)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await asyncio.gather(*(one(client, p, d) for p, d in zip(prompts, delays)))
    wall = max(r["end"] for r in results) - start
    ttft = sorted(r["ttft"] for r in results)
    tpot = sorted(r["tpot"] for r in results)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"rate": rate, "requests": len(results), "wall_s": wall, "tokens_per_s": SWEEP_NEW * len(results) / wall,
            "ttft_ms_median": 1e3 * pct(ttft, 0.5), "ttft_ms_p99": 1e3 * pct(ttft, 0.99),
            "tpot_ms_median": 1e3 * pct(tpot, 0.5), "tpot_ms_p99": 1e3 * pct(tpot, 0.99)}


def _serve(preset: str, scheme: str, port: int, max_model_len: int = SWEEP_PROMPT + SWEEP_NEW):
    """`fourbit serve dummy:<preset>` in a subprocess; returns it once /health answers."""
    import subprocess
    import sys
    import tempfile

    import httpx

    cmd = [sys.executable, "-m", "fourbit.cli", "serve", f"dummy:{preset}", "--scheme", scheme, "--port", str(port),
           "--max-model-len", str(max_model_len), "--max-num-batched-tokens", "8192"]
    log = tempfile.TemporaryFile("w+")  # the server's log (a line per request): shown only if it fails
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode}:\n{log.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError("the server did not come up in 10 minutes")


def run_sweep(presets, schemes=("bf16", "w4a16"), out_dir=None, port: int = 8713, seed: int = 0) -> list:
    import asyncio

    from .models.loader import PRESETS

    rows = []
    for preset in presets:
        for scheme in schemes:
            proc = _serve(preset, scheme, port)
            try:
                prompts = _prompts(SWEEP_REQUESTS, SWEEP_PROMPT, PRESETS[preset].vocab_size, seed)
                for rate in SWEEP_RATES:
                    r = asyncio.run(_client(f"http://127.0.0.1:{port}", prompts, rate, seed))
                    rows.append({"preset": preset, "scheme": scheme, **r})
                    print(f"{preset:>12} {scheme:<6} rate {rate:>5}/s: {r['tokens_per_s']:7.0f} tok/s, TTFT median "
                          f"{r['ttft_ms_median']:.0f} ms (p99 {r['ttft_ms_p99']:.0f}), TPOT median "
                          f"{r['tpot_ms_median']:.1f} ms (p99 {r['tpot_ms_p99']:.1f})", flush=True)
            finally:
                proc.terminate()
                proc.wait(60)
    if out_dir is not None:
        _write_sweep(Path(out_dir), rows)
    return rows


def _write_sweep(out_dir: Path, rows: list):
    meta = run_meta(setup=f"`fourbit serve dummy:<preset>`, {SWEEP_REQUESTS} streaming /v1/completions per rate, "
                          f"prompt {SWEEP_PROMPT} random tokens, {SWEEP_NEW} new tokens, Poisson arrivals")
    gpu = meta["gpu"]
    stem = result_stem(gpu, "e2e-sweep")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Serving sweep on {gpu}, {meta['date']}", "", meta["setup"] + f"; torch {meta['torch']}.", "",
             "| model | scheme | rate (req/s) | tokens/s | TTFT median (ms) | TTFT p99 | TPOT median (ms) | TPOT p99 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['scheme']} | {r['rate']} | {r['tokens_per_s']:.0f} | "
                     f"{r['ttft_ms_median']:.0f} | {r['ttft_ms_p99']:.0f} | {r['tpot_ms_median']:.1f} | "
                     f"{r['tpot_ms_p99']:.1f} |")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
