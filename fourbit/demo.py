"""`fourbit demo`: build a dummy model, quantize it with RTN W4A16, report the error and time one decode step.

Nothing is downloaded: the weights are seeded random numbers in the shapes of the named model.
"""
from __future__ import annotations

import json
import sys
import time
from collections import defaultdict

import torch

from .api import quantize
from .config import W4A16Config
from .models.loader import dummy_model

CONTEXT = 128  # tokens already in the KV cache when the decode step is timed


@torch.inference_mode()
def time_decode_step(model, steps: int = 10, warmup: int = 3) -> float:
    """Median seconds of one batch-1 decode step with CONTEXT tokens in the cache."""
    dev = model.device
    cache = model.new_cache(1, CONTEXT + warmup + steps)
    tokens = torch.randint(0, model.config.vocab_size, (1, CONTEXT), device=dev)
    model(tokens, cache, 0)
    token = tokens[:, -1:]
    times = []
    for i in range(warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        model(token, cache, CONTEXT + i)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times[warmup:])[steps // 2]


def weight_bytes(model) -> int:
    """Bytes of the decoder's projection weights (what a decode step must read), quantized or not."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("layers.") and "layernorm" not in name:
            total += t.numel() * t.element_size()
    return total


def run_demo(device: torch.device, preset: str | None, group_size: int, seed: int, as_json: bool):
    gpu = device.type == "cuda"
    preset = preset or ("llama-2-7b" if gpu else "tiny")
    dtype = torch.bfloat16 if gpu else torch.float32
    where = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"fourbit demo: dummy:{preset} ({str(dtype).removeprefix('torch.')}) on {where}", file=sys.stderr)
    model = dummy_model(preset, dtype, device, seed)
    base_bytes, base_time = weight_bytes(model), time_decode_step(model)

    report: dict[str, float] = {}
    config = W4A16Config(group_size=group_size)
    quantize(model, config, report=report)
    q_bytes, q_time = weight_bytes(model), time_decode_step(model)

    by_kind = defaultdict(list)  # q_proj, k_proj, ... -> relative errors over the layers
    for name, err in report.items():
        by_kind[name.rsplit(".", 1)[-1]].append(err)
    errors = {k: {"mean": sum(v) / len(v), "max": max(v), "layers": len(v)} for k, v in by_kind.items()}
    kernel = "reference (torch)"  # the Hopper kernel arrives with the W4A16 GEMM issue
    result = {"preset": preset, "device": where, "group_size": group_size, "layers_quantized": len(report),
              "rel_error": errors, "decode_step_ms": {"bf16" if gpu else "fp32": base_time * 1e3, "w4a16": q_time * 1e3},
              "weight_bytes": {"float": base_bytes, "w4a16": q_bytes}, "speedup": base_time / q_time,
              "w4a16_path": kernel}
    if as_json:
        print(json.dumps(result))
        return
    print(f"\nper-layer relative weight error ‖W − Ŵ‖/‖W‖, RTN W4A16 g{group_size} ({len(report)} layers)")
    print(f"{'layer':<10}{'mean':>10}{'max':>10}")
    for kind, e in errors.items():
        print(f"{kind:<10}{e['mean']:>10.4f}{e['max']:>10.4f}")
    base = "bf16" if gpu else "fp32"
    print(f"\nbatch-1 decode step with {CONTEXT} tokens of context ({where})")
    print(f"{'scheme':<8}{'weights':>12}{'step':>12}{'speedup':>10}")
    print(f"{base:<8}{base_bytes / 2**20:>10.1f}MB{base_time * 1e3:>10.2f}ms{1:>9.2f}x")
    print(f"{'w4a16':<8}{q_bytes / 2**20:>10.1f}MB{q_time * 1e3:>10.2f}ms{base_time / q_time:>9.2f}x")
    print(f"(w4a16 runs the {kernel} path)")
