"""The CLI on AutoAWQ / GPTQ directories: generate, ppl and export run as subprocesses, and the user errors.

The checkpoints are tiny random models (tests/quant_fixtures.py) with a word-level tokenizer.json beside them, so
nothing here needs the real data. Commands run two at a time in the background (each start costs ~2 s).
"""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fourbit as fb
from hf_fixtures import write_hf_checkpoint
from quant_fixtures import write_quantized_checkpoint, write_word_tokenizer
from test_cli import fourbit, one_json, one_line_error

SMALL = dict(hidden_size=128, intermediate_size=256)
PROMPT = "w5 w7 w11"


def _gen(model, *extra):
    return ("generate", model, "--prompt", PROMPT, "--temperature", 0, "--max-new-tokens", 6, "--json", *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Write the checkpoints, then run every command of this module; name -> CompletedProcess (or a dict)."""
    d = tmp_path_factory.mktemp("cli_checkpoints")
    write_quantized_checkpoint(d / "awq", "awq", seed=31, group_size=64, **SMALL)
    write_quantized_checkpoint(d / "gptq_act", "gptq", seed=32, group_size=32, act_order=True, **SMALL)
    write_hf_checkpoint(d / "hf", "llama", seed=33, **SMALL)
    write_quantized_checkpoint(d / "bits8", "gptq", seed=34, group_size=64, **SMALL)
    cfg = json.loads((d / "bits8" / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 8
    (d / "bits8" / "config.json").write_text(json.dumps(cfg))
    for name in ("awq", "gptq_act", "hf"):
        write_word_tokenizer(d / name, 101)
    words = torch.randint(3, 101, (400,), generator=torch.Generator().manual_seed(0))
    (d / "text.txt").write_text(" ".join(f"w{i}" for i in words.tolist()))
    (d / "afile").write_text("not a directory\n")

    def export_then_generate():  # AWQ -> GPTQ export, then the exported directory generates like the source
        res = {"export": fourbit("export", "awq", "--format", "gptq", "--out", "awq_as_gptq", "--json", cwd=d)}
        if res["export"].returncode == 0:
            res["generate"] = fourbit(*_gen("awq_as_gptq"), cwd=d)
        return res

    jobs = {
        "export_chain": export_then_generate,
        "generate_awq": lambda: fourbit(*_gen("awq"), cwd=d),
        "ppl_gptq_act": lambda: fourbit("ppl", "gptq_act", "--text", "text.txt", "--seq-len", 32, "--json", cwd=d),
        "export_float": lambda: fourbit("export", "hf", "--format", "awq", "--group-size", 32, "--out", "hf_awq",
                                        "--json", cwd=d),
        "err_missing": lambda: fourbit(*_gen("no_such_dir"), cwd=d),
        "err_bits8": lambda: fourbit(*_gen("bits8"), cwd=d),
        "err_out_file": lambda: fourbit("export", "awq", "--format", "awq", "--out", "afile", cwd=d),
        "err_act_order_awq": lambda: fourbit("export", "gptq_act", "--format", "awq", "--out", "act_awq", cwd=d),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(fn) for name, fn in jobs.items()}
        results = {name: f.result() for name, f in futures.items()}
    results["dir"] = d
    return results


def _api_greedy(path) -> list[int]:
    model = fb.load(path, dtype=torch.float32)
    tok = fb.Tokenizer(path)
    return fb.generate(model, [tok.encode(PROMPT, bos=True)], fb.SamplingParams(max_new_tokens=6))[0]


def test_generate_on_awq_directory(runs):
    r = one_json(runs["generate_awq"])
    assert r["prompt_tokens"] == 4  # BOS + 3 words, from the tokenizer.json found beside the checkpoint
    new = _api_greedy(runs["dir"] / "awq")
    assert r["new_tokens"] == len(new) and r["text"].split() == [f"w{i}" for i in new]


def test_ppl_on_gptq_act_order_directory(runs):
    r = one_json(runs["ppl_gptq_act"])
    path = runs["dir"] / "gptq_act"
    tok = fb.Tokenizer(path)
    ids = tok.encode((runs["dir"] / "text.txt").read_text(), bos=True)
    ref = fb.perplexity(fb.load(path, dtype=torch.float32), ids, seq_len=32)
    assert r["predictions"] == ref["predictions"] and math.isclose(r["ppl"], ref["ppl"], rel_tol=1e-6)


def test_export_awq_to_gptq_then_generate(runs):
    res = runs["export_chain"]
    r = one_json(res["export"])
    out = runs["dir"] / "awq_as_gptq"
    assert r["out"] == "awq_as_gptq" and r["format"] == "gptq" and r["tokenizer"] == "tokenizer.json"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    # same weights (fp16 floats in both), so the same greedy text
    assert one_json(res["generate"])["text"] == one_json(runs["generate_awq"])["text"]


def test_export_quantizes_a_float_model_on_load(runs):
    one_json(runs["export_float"])
    out = runs["dir"] / "hf_awq"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": None}
    assert fb.load(out).quant_config.group_size == 32


@pytest.mark.parametrize("name,match", [
    ("err_missing", "model not found: no_such_dir"),
    ("err_bits8", "8-bit GPTQ checkpoints are not supported"),
    ("err_out_file", "afile exists and is not a directory"),
    ("err_act_order_awq", "export --format gptq"),
])
def test_bad_input_is_one_line_error(runs, name, match):
    assert match in one_line_error(runs[name])
