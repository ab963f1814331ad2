"""Wall time and peak GPU memory of AWQ and GPTQ on dummy:llama-2-7b (seeded random weights, nothing downloaded) with
random-token calibration, 128 sequences × 512 tokens. Target (issue 4): each ≤ 10 minutes and ≤ 24 GB on one H100.

    python benchmarks/time_quantize.py                 # CUDA: writes benchmarks/results/<gpu>-quantize-time.md|json
    python benchmarks/time_quantize.py --algos awq     # one algorithm: rows of the others already there are kept
    OMP_NUM_THREADS=1 python benchmarks/time_quantize.py --preset tiny --device cpu --dtype fp32 --nsamples 4 \
        --seqlen 64 --out /tmp                      # CPU smoke test, ~6 s

Each algorithm gets a freshly loaded model (quantization works in place). The peak is
torch.cuda.max_memory_allocated() from right after the model is loaded to the end of quantization, so it
includes the model's own weights (13.5 GB for Llama-2-7B in bf16); "model" is what the loaded model held.
Random ids are what a dummy model can be calibrated on; the cost does not depend on the text.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fourbit  # noqa: E402
from fourbit.bench import result_stem  # noqa: E402
from fourbit.config import W4A16Config  # noqa: E402
from fourbit.nn.linear import W4A16Linear  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGET_S, TARGET_GB = 600, 24


def run(preset, dtype, device, algo, act_order, group_size, nsamples, seqlen, seed) -> dict:
    cuda = device.type == "cuda"
    model = fourbit.load(f"dummy:{preset}", dtype=dtype, device=device, seed=seed)
    calib = fourbit.calib_tokens(None, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                 vocab_size=model.config.vocab_size)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        model_bytes = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    fourbit.quantize_(model, W4A16Config(group_size=group_size, algo=algo, act_order=act_order), calib=calib)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    quantized = sum(isinstance(m, W4A16Linear) for m in model.modules())
    with torch.no_grad():  # the quantized model still runs and gives finite logits
        logits = model(calib[:1, :16].to(device))
    finite = bool(torch.isfinite(logits).all())
    del model, logits
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"algo": algo + (" act-order" if act_order else ""), "group_size": group_size, "seconds": round(seconds, 1),
            "peak_gb": None if peak is None else round(peak / 1e9, 2),
            "model_gb": None if not cuda else round(model_bytes / 1e9, 2), "layers_quantized": quantized,
            "finite_logits": finite}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--algos", nargs="+", default=["awq", "gptq"], choices=["awq", "gptq", "gptq-act-order"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the .md and .json")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available: run on a GPU, or pass --device cpu --preset tiny for a smoke test")
    rows = []
    for name in args.algos:
        algo, act_order = name.removesuffix("-act-order"), name.endswith("-act-order")
        rows.append(run(args.preset, DTYPES[args.dtype], device, algo, act_order, args.group_size, args.nsamples,
                        args.seqlen, args.seed))
        print(json.dumps(rows[-1]), flush=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    meta = {"device": gpu, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "preset": args.preset,
            "dtype": args.dtype, "nsamples": args.nsamples, "seqlen": args.seqlen,
            "command": "python benchmarks/time_quantize.py " + " ".join(sys.argv[1:])}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    stem = result_stem(gpu, "quantize-time")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = _keep_other_rows(out / f"{stem}.json", meta, rows)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# AWQ / GPTQ quantization time on {gpu}, {meta['date']}", "",
             f"dummy:{args.preset} in {args.dtype}, random-token calibration {args.nsamples} × {args.seqlen}, "
             f"torch {meta['torch']}" + (f", triton {meta['triton']}" if "triton" in meta else "") + ". "
             f"Peak = torch.cuda.max_memory_allocated() during quantization, model weights included. "
             f"Target: ≤ {TARGET_S} s and ≤ {TARGET_GB} GB each.", "",
             "| algorithm | group | wall time (s) | peak GPU memory (GB) | model after load (GB) | target met |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        met = r["seconds"] <= TARGET_S and (r["peak_gb"] is None or r["peak_gb"] <= TARGET_GB) and r["finite_logits"]
        lines.append(f"| {r['algo']} | {r['group_size']} | {r['seconds']} | {r['peak_gb']} | {r['model_gb']} | "
                     f"{'yes' if met else 'NO'} |")
    lines += ["", f"Last command: `{meta['command']}`; each run replaces only the rows of the algorithms it ran, "
              f"so the rows can come from one process each.", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def _keep_other_rows(path: Path, meta: dict, rows: list[dict]) -> list[dict]:
    """Rows of other algorithms from an earlier run with the same model and calibration, then these rows, so
    that each algorithm can run in its own process (one GPU job may be limited to 10 minutes)."""
    if not path.exists():
        return rows
    old = json.loads(path.read_text())
    same = all(old["meta"].get(k) == meta[k] for k in ("device", "preset", "dtype", "nsamples", "seqlen"))
    new = {(r["algo"], r["group_size"]) for r in rows}
    kept = [r for r in old["rows"] if (r["algo"], r["group_size"]) not in new] if same else []
    return kept + rows


if __name__ == "__main__":
    main()
