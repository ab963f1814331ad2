"""Soak test of `fourbit serve` at saturation: python benchmarks/soak_serve.py [--minutes 10] [--preset llama-2-7b]
[--scheme w4a16] [--clients 96] [--out benchmarks/results].

Starts the server on a dummy model, keeps `clients` concurrent clients busy for the whole time (random prompt and
output lengths, streaming and not, one request in ten dropped mid-stream so that aborts are exercised), and
samples the GPU memory in use every 15 s. Passes when every request that was not dropped on purpose got a full,
well-formed answer and the memory in use after the first minute stays within 1% of its first sample.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import time
from pathlib import Path

import httpx

from fourbit.bench import result_stem, run_meta
from fourbit.bench_e2e import _serve


def gpu_memory_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


async def soak(url: str, minutes: float, clients: int, vocab: int) -> dict:
    deadline = time.monotonic() + 60 * minutes
    stats = {"ok": 0, "dropped": 0, "errors": [], "tokens": 0}
    memory: list[tuple[float, int]] = []
    t0 = time.monotonic()

    async def worker(seed: int, client: httpx.AsyncClient):
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            n_out = rng.randrange(16, 256)
            body = {"prompt": [rng.randrange(3, vocab) for _ in range(rng.randrange(16, 768))], "max_tokens": n_out,
                    "temperature": rng.choice([0, 0.8]), "ignore_eos": True, "stream": rng.random() < 0.5}
            drop = rng.random() < 0.1
            try:
                if body["stream"]:
                    text = []
                    async with client.stream("POST", url + "/v1/completions", json=body) as r:
                        if r.status_code != 200:
                            raise RuntimeError(f"status {r.status_code}: {(await r.aread())[:200]!r}")
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                text.append(json.loads(line[6:])["choices"][0]["text"])
                                if drop and len(text) > 3:
                                    break  # leave mid-stream: the server must abort the request
                    if drop:
                        stats["dropped"] += 1
                        continue
                    words = "".join(text).split()
                else:
                    r = await client.post(url + "/v1/completions", json=body)
                    if r.status_code != 200:
                        raise RuntimeError(f"status {r.status_code}: {r.text[:200]}")
                    words = r.json()["choices"][0]["text"].split()
                if len(words) != n_out:  # a dummy model's text is one word per token
                    raise RuntimeError(f"asked for {n_out} tokens, got {len(words)}")
                stats["ok"] += 1
                stats["tokens"] += n_out
            except Exception as e:  # noqa: BLE001  every failure is counted and reported
                stats["errors"].append(repr(e)[:300])

    async def sampler():
        while time.monotonic() < deadline:
            memory.append((time.monotonic() - t0, gpu_memory_mib()))
            await asyncio.sleep(15)

    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        await asyncio.gather(sampler(), *(worker(i, client) for i in range(clients)))
    health = httpx.get(url + "/health").json()
    settled = [m for t, m in memory if t >= 60] or [m for _, m in memory]
    return {**stats, "errors": stats["errors"][:20], "error_count": len(stats["errors"]), "memory_mib": memory,
            "memory_drift": (max(settled) - settled[0]) / settled[0], "in_flight_after": health["requests_in_flight"],
            "seconds": time.monotonic() - t0}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--scheme", default="w4a16", choices=("bf16", "w4a16"))
    p.add_argument("--clients", type=int, default=96)
    p.add_argument("--port", type=int, default=8714)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    from fourbit.models.loader import PRESETS

    proc = _serve(args.preset, args.scheme, args.port, max_model_len=1024)
    try:
        r = asyncio.run(soak(f"http://127.0.0.1:{args.port}", args.minutes, args.clients,
                             PRESETS[args.preset].vocab_size))
    finally:
        proc.terminate()
        proc.wait(60)
    passed = r["error_count"] == 0 and r["memory_drift"] <= 0.01 and r["in_flight_after"] == 0
    r.update(run_meta(preset=args.preset, scheme=args.scheme, clients=args.clients, passed=passed))
    gpu = r["gpu"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = result_stem(gpu, "soak")
    (out / f"{stem}.json").write_text(json.dumps(r, indent=1) + "\n")
    mem = [m for _, m in r["memory_mib"]]
    (out / f"{stem}.md").write_text(
        f"# Serving soak on {gpu}, {r['date']}\n\n`fourbit serve dummy:{args.preset} --scheme {args.scheme}`, "
        f"{args.clients} concurrent clients for {r['seconds'] / 60:.1f} min (random prompts 16-767 tokens, 16-255 new "
        f"tokens, half streaming, one in ten dropped mid-stream).\n\n"
        f"| requests answered | dropped on purpose | errors | tokens | GPU memory MiB (first, min, max) | "
        f"drift after 1 min | in flight after | passed |\n|---|---|---|---|---|---|---|---|\n"
        f"| {r['ok']} | {r['dropped']} | {r['error_count']} | {r['tokens']} | {mem[0]}, {min(mem)}, {max(mem)} | "
        f"{100 * r['memory_drift']:.2f}% | {r['in_flight_after']} | {'yes' if passed else 'no'} |\n")
    print(json.dumps({k: v for k, v in r.items() if k != "memory_mib"}, indent=1))


if __name__ == "__main__":
    main()
