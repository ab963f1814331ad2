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
from .graphs import capture
from .models.loader import dummy_model

CONTEXT = 128  # tokens already in the KV cache when the decode step is timed


@torch.inference_mode()
def time_decode_step(model, steps: int = 20) -> dict:
    """Median milliseconds of one batch-1 decode step with CONTEXT tokens in the cache.

    {"eager": ...} always; on CUDA also {"graph": ...}, the step captured once as a CUDA graph and replayed,
    which removes the per-kernel launch cost that dominates an eager Python decode step.
    """
    dev = model.device
    cache = model.new_cache(1, CONTEXT + 1)
    tokens = torch.randint(0, model.config.vocab_size, (1, CONTEXT + 1), device=dev)
    model(tokens[:, :CONTEXT], cache, 0)
    token = tokens[:, CONTEXT:]
    step = lambda: model(token, cache, CONTEXT)  # noqa: E731  (rewrites the same cache slot each time)
    if dev.type != "cuda":
        times = []
        for _ in range(steps + 3):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return {"eager": 1e3 * sorted(times[3:])[steps // 2]}
    from triton.testing import do_bench

    eager = do_bench(step, warmup=25, rep=200, return_mode="median")
    graph = capture(step, dev)
    return {"eager": eager, "graph": do_bench(graph.replay, warmup=25, rep=200, return_mode="median")}


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
    base_bytes, base_ms = weight_bytes(model), time_decode_step(model)

    report: dict[str, float] = {}
    quantize(model, W4A16Config(group_size=group_size), report=report)
    q_bytes, q_ms = weight_bytes(model), time_decode_step(model)

    by_kind = defaultdict(list)  # q_proj, k_proj, ... -> relative errors over the layers
    for name, err in report.items():
        by_kind[name.rsplit(".", 1)[-1]].append(err)
    errors = {k: {"mean": sum(v) / len(v), "max": max(v), "layers": len(v)} for k, v in by_kind.items()}
    mode = "graph" if gpu else "eager"
    base = "bf16" if gpu else "fp32"
    kernel = "reference (torch)"
    if gpu:  # the kernel a batch-1 decode runs
        from .kernels.w4a16_gemm import kernel_for

        kernel = kernel_for(device, 1, model.config.dim, model.config.dim)
    result = {"preset": preset, "device": where, "group_size": group_size, "layers_quantized": len(report),
              "rel_error": errors, "decode_step_ms": {base: base_ms, "w4a16": q_ms},
              "weight_bytes": {base: base_bytes, "w4a16": q_bytes}, "speedup": base_ms[mode] / q_ms[mode],
              "w4a16_path": kernel}
    if as_json:
        print(json.dumps(result))
        return
    print(f"\nper-layer relative weight error ‖W − Ŵ‖/‖W‖, RTN W4A16 g{group_size} ({len(report)} layers)")
    print(f"{'layer':<10}{'mean':>10}{'max':>10}")
    for kind, e in errors.items():
        print(f"{kind:<10}{e['mean']:>10.4f}{e['max']:>10.4f}")
    print(f"\nbatch-1 decode step, {CONTEXT} tokens of context, {where}"
          + (" (CUDA graph; eager Python in brackets)" if gpu else ""))
    print(f"{'scheme':<8}{'weights':>12}{'step':>12}{'speedup':>10}")
    for name, nbytes, ms in ((base, base_bytes, base_ms), ("w4a16", q_bytes, q_ms)):
        eager = f"  [{ms['eager']:.2f}ms]" if gpu else ""
        print(f"{name:<8}{nbytes / 2**20:>10.1f}MB{ms[mode]:>10.2f}ms{base_ms[mode] / ms[mode]:>9.2f}x{eager}")
    print(f"(w4a16 runs {kernel})")
