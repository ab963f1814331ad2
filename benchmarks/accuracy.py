"""Accuracy of W4A16 RTN, AWQ and GPTQ (± act-order) on a real model: stories260K perplexity on TinyStories val and
WikiText-2 test, at group sizes 32, 64 and per-channel. Regenerates benchmarks/results/accuracy.md and .json.

    PYTHONPATH=. python benchmarks/accuracy.py            # ~30 minutes on one CPU core (3 calibration seeds)

Calibration text must not overlap the evaluated text, and both evaluated files are scored whole. The real-data
folder holds no third text (no TinyStories train split), so the calibration batch is text the fp32 model writes
itself: nsamples sequences of BOS + (seqlen - 1) tokens sampled at temperature 1 (seeded; EOS/BOS do not stop
a sequence, so a row runs on into the next story as the training data did). It is in the model's own domain,
like training data, and disjoint from both evaluated files by construction. (Self-generated calibration data is
used e.g. by LLM-QAT; GPTQ and AWQ are usually calibrated on C4 or the Pile.)

Perplexity: the whole file, one BOS, non-overlapping 512-token windows (fourbit.perplexity), fp32 activations
on the CPU reference path, as in README.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fourbit  # noqa: E402
from fourbit.config import W4A16Config  # noqa: E402

REALDATA = Path(os.environ.get("FOURBIT_REALDATA") or ROOT.parent / "shared" / "realdata")
TEXTS = {"tinystories": "tinystories_val_head794k.txt", "wikitext2": "wiki.test.raw"}
METHODS = [("RTN", "rtn", False), ("AWQ", "awq", False), ("GPTQ", "gptq", False), ("GPTQ act-order", "gptq", True)]
GROUPS = [32, 64, -1]


def self_generated_calibration(model, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(nsamples, seqlen) ids: BOS + seqlen - 1 tokens sampled from the model at temperature 1."""
    bos = model.config.bos_id
    params = fourbit.SamplingParams(max_new_tokens=seqlen - 1, temperature=1.0, top_p=1.0, stop_at_eos=False)
    rows = fourbit.generate(model, [[bos]] * nsamples, params, seed=seed)
    return torch.tensor([[bos] + row for row in rows])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="calibration sampling seeds: AWQ and GPTQ rows are averaged over them")
    p.add_argument("--max-tokens", type=int, help="score only this prefix of each text (quick runs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the model is tiny: 1 is fastest)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accuracy"),
                   help="writes OUT.md and OUT.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model_path = REALDATA / "stories260K.bin"
    tok = fourbit.Tokenizer(REALDATA / "tok512.model")
    texts = {name: tok.encode((REALDATA / f).read_text(encoding="utf-8"), bos=True) for name, f in TEXTS.items()}
    rows = []

    def evaluate(label, group_size, config=None, calib=None, seed=None):
        model = fourbit.load(model_path)
        t = time.perf_counter()
        if config is not None:
            fourbit.quantize_(model, config, calib=calib, progress=False)
        seconds = time.perf_counter() - t
        ppl = {name: fourbit.perplexity(model, ids, 512, max_tokens=args.max_tokens, progress=False)["ppl"]
               for name, ids in texts.items()}
        rows.append({"method": label, "group_size": group_size, "seed": seed, "quantize_s": round(seconds, 1), **ppl})
        print(f"{label:>15} g{group_size} seed {seed}: " + "  ".join(f"{n} {v:.4f}" for n, v in ppl.items())
              + f"  ({seconds:.1f} s)", file=sys.stderr)

    evaluate("fp32", None)
    for gs in GROUPS:
        evaluate("RTN", gs, W4A16Config(group_size=gs))
    overlap = {}
    for seed in args.seeds:
        calib = self_generated_calibration(fourbit.load(model_path), args.nsamples, args.seqlen, seed)
        overlap[seed] = _shared_runs(calib, texts, tok)
        for gs in GROUPS:
            for label, algo, act_order in METHODS[1:]:
                evaluate(label, gs, W4A16Config(group_size=gs, algo=algo, act_order=act_order), calib, seed)
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "cpu": platform.processor()
            or platform.machine(), "threads": args.threads, "model": "stories260K.bin",
            "calibration": {"source": "self-generated (fp32 model, temperature 1)", "nsamples": args.nsamples,
                            "seqlen": args.seqlen, "seeds": args.seeds, "shared_32grams_with_eval_text": overlap},
            "max_tokens": args.max_tokens, "seq_len": 512, "command": "PYTHONPATH=. python benchmarks/accuracy.py"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def _shared_runs(calib: torch.Tensor, texts: dict, tok, n: int = 32) -> dict:
    """Per evaluated text: how many of its n-token windows (n = 32) occur verbatim in the calibration batch, of
    how many, and the first such run decoded (generated text can still repeat the stock phrases of its domain)."""
    grams = {tuple(row[i:i + n]) for row in calib.tolist() for i in range(len(row) - n + 1)}
    out = {}
    for name, ids in texts.items():
        hits = [i for i in range(len(ids) - n + 1) if tuple(ids[i:i + n]) in grams]
        out[name] = {"shared": len(hits), "windows": len(ids) - n + 1,
                     "example": tok.decode(ids[hits[0]:hits[0] + n]) if hits else None}
    return out


def markdown(meta: dict, rows: list[dict]) -> str:
    fp = next(r for r in rows if r["method"] == "fp32")
    rtn = {r["group_size"]: r for r in rows if r["method"] == "RTN"}
    c = meta["calibration"]
    seeds = c["seeds"]
    span = "whole file" if meta["max_tokens"] is None else f"first {meta['max_tokens']} tokens"
    shared = {}
    for per_seed in c["shared_32grams_with_eval_text"].values():
        for name, v in per_seed.items():
            best = shared.setdefault(name, v)
            if v["shared"] > best["shared"]:
                shared[name] = v
    counts = "; ".join(f"{n}: at most {v['shared']:,} of {v['windows']:,}"
                       + (f" (e.g. \"{v['example'].strip()}\")" if v["example"] else "") for n, v in shared.items())
    lines = [
        "# stories260K W4A16 accuracy: RTN, AWQ, GPTQ",
        "",
        f"{meta['date']}, CPU ({meta['cpu']}), torch {meta['torch']}, fp32 activations (reference path). "
        f"Perplexity over the {span} of each text, one BOS, non-overlapping {meta['seq_len']}-token windows. "
        "Asymmetric uint4 codes, fp16 scales. Lower is better; \"vs RTN\" compares with RTN at the same group size.",
        "",
        f"Calibration (AWQ, GPTQ): {c['nsamples']} × {c['seqlen']} tokens sampled from the fp32 model itself "
        "(BOS, then temperature 1), not taken from either evaluated file: the data folder has no other text to "
        f"calibrate on. Each AWQ/GPTQ row is the mean over {len(seeds)} calibration batches (sampling seeds "
        f"{', '.join(map(str, seeds))}), with the range over them in brackets; \"below RTN\" counts the seeds "
        "that beat RTN. 32-token windows of the evaluated texts that also occur verbatim in a calibration batch: "
        f"{counts}" + (": stock phrases the model reproduces, not copied passages." if any(
            v["shared"] for v in shared.values()) else "."),
        "",
        "| method | group | TinyStories val PPL | vs fp32 | vs RTN | below RTN | WikiText-2 PPL | vs fp32 | vs RTN "
        "| below RTN | quantize (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["group_size"]), []).append(r)
    rank = [label for label, _, _ in METHODS]
    groups = dict(sorted(groups.items(), key=lambda kv: (-1, 0) if kv[0][0] == "fp32" else
                         (GROUPS.index(kv[0][1]), rank.index(kv[0][0]))))
    losses = []
    for (method, gs), runs in groups.items():
        group = "—" if gs is None else ("per-channel" if gs == -1 else str(gs))
        calibrated = method not in ("fp32", "RTN")
        cells = []
        for name in TEXTS:
            vals = [r[name] for r in runs]
            mean = sum(vals) / len(vals)
            fmt = (lambda v: f"{v:.4f}") if name == "tinystories" else (lambda v: f"{v:.2f}")
            cells.append(fmt(mean) + (f" [{fmt(min(vals))}–{fmt(max(vals))}]" if len(vals) > 1 else ""))
            cells.append("—" if method == "fp32" else f"{100 * (mean / fp[name] - 1):+.1f}%")
            if calibrated:
                base = rtn[gs][name]
                below = sum(v < base for v in vals)
                cells += [f"{100 * (mean / base - 1):+.1f}%", f"{below}/{len(vals)}"]
                if mean >= base:
                    losses.append(f"{method} {group} on {name} (mean)")
                elif below < len(vals):
                    losses.append(f"{method} {group} on {name} ({len(vals) - below} of {len(vals)} seeds)")
            else:
                cells += ["—", "—"]
        seconds = f"{sum(r['quantize_s'] for r in runs) / len(runs):.1f}" if calibrated else "—"
        lines.append(f"| {method} | {group} | " + " | ".join(cells) + f" | {seconds} |")
    lines += ["", "Every AWQ and GPTQ row is below RTN on both texts, for every calibration seed." if not losses else
              "Not below RTN: " + "; ".join(losses) + ".", "",
              f"Regenerate: `{meta['command']}` (quantize times: one CPU thread; AWQ's cost here is the attention "
              "forward it runs for each of its 21 scale candidates).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
