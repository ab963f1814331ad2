"""The `fourbit` command line, run as a subprocess (`python -m fourbit.cli ...`) on the real llama2.c model.

Each CLI start costs ~2 s (torch import), so the commands are declared once as named jobs and the module
fixture `cli` runs the jobs of the selected tests two at a time in the background, longest first; each test
then waits for its own results. Real data comes from ../shared/realdata (read in place, never copied):
tests that need it skip when it is absent.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# beside the checkout (<root>/main, <root>/shared/realdata); FOURBIT_REALDATA overrides it, as in conftest.py
REALDATA = Path(os.environ.get("FOURBIT_REALDATA") or Path(__file__).resolve().parents[2] / "shared" / "realdata")
BIN, TOK, GREEDY, TEXT = "stories260K.bin", "tok512.model", "stories260K.greedy.txt", "tinystories_val_head794k.txt"
HAVE_REALDATA = all((REALDATA / f).is_file() for f in (BIN, TOK, GREEDY, TEXT))
TEXT_TOKENS = 393_013  # README: tinystories_val_head794k.txt with tok512.model, BOS included
WORKERS = 2
TIMEOUT = 300  # seconds per command: a hang fails the test instead of stalling the run


def fourbit(*args, cwd: Path) -> subprocess.CompletedProcess:
    """Run `python -m fourbit.cli ARGS` in cwd; stdout and stderr captured separately, as bytes."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"  # WORKERS commands run at once: one thread each fills the cores without thrashing
    return subprocess.run([sys.executable, "-m", "fourbit.cli", *map(str, args)], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=TIMEOUT)


def model_args(*extra):
    return (REALDATA / BIN, "--tokenizer", REALDATA / TOK, *extra)


def out(p: subprocess.CompletedProcess) -> str:
    return p.stdout.decode("utf-8")


def err(p: subprocess.CompletedProcess) -> str:
    return p.stderr.decode("utf-8", errors="replace")


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{out(p)[-2000:]}\nstderr:\n{err(p)[-4000:]}"
    assert "Traceback" not in err(p), err(p)
    return p


def one_json(p: subprocess.CompletedProcess) -> dict:
    """stdout must be exactly one JSON object on one line (progress bars belong on stderr)."""
    ok(p)
    lines = out(p).splitlines()
    assert len(lines) == 1, f"expected one line of JSON on stdout, got {len(lines)}:\n{out(p)[:2000]}"
    d = json.loads(lines[0])
    assert isinstance(d, dict)
    return d


def one_line_error(p: subprocess.CompletedProcess) -> str:
    """A user error: exit 1 and exactly one non-empty stderr line `fourbit: error: ...`, nothing on stdout."""
    e = err(p)
    assert "Traceback" not in e, f"traceback instead of a one-line error:\n{e[-3000:]}"
    lines = [line for line in e.splitlines() if line.strip()]  # splitlines also splits tqdm's \r
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{e[-3000:]}"
    assert lines[0].startswith("fourbit: error: ") and len(lines[0]) > len("fourbit: error: ") + 5, lines[0]
    assert p.returncode == 1, f"exit {p.returncode}, expected 1: {lines[0]}"
    assert out(p) == "", f"stdout should be empty on error, got {out(p)[:500]!r}"
    return lines[0]


# ---------------------------------------------------------------- jobs: every CLI command this module runs

JOBS = {}  # name -> (function(workdir) -> result, needs realdata, rough cost in seconds for scheduling)


def job(name, cost=3, realdata=True):
    def deco(fn):
        JOBS[name] = (fn, realdata, cost)
        return fn
    return deco


def needs(*names):
    """Declare the jobs a test reads (so the fixture starts them ahead); a callable gets the test's params."""
    def deco(fn):
        fn._cli_jobs = names[0] if len(names) == 1 and callable(names[0]) else names
        return fn
    return deco


@job("greedy200", cost=3)
def _(d):
    return fourbit("generate", *model_args("--temperature", 0, "--max-new-tokens", 200, "--scheme", "fp32"), cwd=d)


@job("greedy199", cost=3)
def _(d):
    return fourbit("generate", *model_args("--temperature", 0, "--max-new-tokens", 199, "--scheme", "fp32"), cwd=d)


PROMPT = "Once upon a time, there was a"


@job("prompt_a")
def _(d):
    return fourbit("generate", *model_args("--prompt", PROMPT, "--temperature", 0, "--max-new-tokens", 12,
                                           "--json"), cwd=d)


@job("prompt_b")
def _(d):  # the same run, streamed as text instead of --json
    return fourbit("generate", *model_args("--prompt", PROMPT, "--temperature", 0, "--max-new-tokens", 12), cwd=d)


def _sample(d, seed):
    return fourbit("generate", *model_args("--temperature", 1, "--top-p", 0.95, "--seed", seed,
                                           "--max-new-tokens", 30, "--json"), cwd=d)


@job("seed1_a")
def _(d):
    return _sample(d, 1)


@job("seed1_b")
def _(d):
    return _sample(d, 1)


@job("seed2")
def _(d):
    return _sample(d, 2)


def _ppl(d, *extra, max_tokens=20000):
    return fourbit("ppl", *model_args("--text", REALDATA / TEXT, "--seq-len", 512, "--max-tokens", max_tokens,
                                      "--json", *extra), cwd=d)


@job("ppl_fp32", cost=5)
def _(d):
    return _ppl(d, "--scheme", "fp32")


@job("ppl_g32", cost=5)
def _(d):
    return _ppl(d, "--scheme", "w4a16", "--algo", "rtn", "--group-size", 32)


@job("ppl_gm1", cost=5)
def _(d):
    return _ppl(d, "--scheme", "w4a16", "--algo", "rtn", "--group-size", -1)


@job("quantized", cost=12)
def _(d):
    """quantize, then use the checkpoint: without --tokenizer, and with the tokenizer file it wrote."""
    ckpt = d / "ckpt"
    res = {"dir": ckpt, "quantize": fourbit("quantize", *model_args("--scheme", "w4a16", "--group-size", 64,
                                                                   "--out", ckpt), cwd=d)}
    if res["quantize"].returncode != 0:
        return res
    res["generate_no_tokenizer"] = fourbit("generate", ckpt, "--temperature", 0, "--max-new-tokens", 20, cwd=d)
    written = sorted(ckpt.glob("*.model")) + sorted(ckpt.glob("tokenizer.json"))
    if written:  # the tokenizer file the checkpoint carries, named explicitly (works around a missing default)
        tok = written[0]
        res["generate"] = fourbit("generate", ckpt, "--tokenizer", tok, "--temperature", 0,
                                  "--max-new-tokens", 20, cwd=d)
        res["ppl"] = fourbit("ppl", ckpt, "--tokenizer", tok, "--text", REALDATA / TEXT, "--max-tokens", 5000,
                             "--json", cwd=d)
    return res


@job("quantize_on_load")
def _(d):
    return fourbit("generate", *model_args("--scheme", "w4a16", "--group-size", 64, "--temperature", 0,
                                           "--max-new-tokens", 20), cwd=d)


@job("demo", cost=4, realdata=False)
def _(d):
    return fourbit("demo", "--json", "--device", "cpu", cwd=d)


# Bad input: each should exit 1 with one `fourbit: error:` line. name -> job; the message must contain `match`.
ERRORS = {}


def error_job(name, match, realdata=True):
    def deco(fn):
        ERRORS[name] = match
        return job("err:" + name, cost=2, realdata=realdata)(fn)
    return deco


@error_job("truncated_bin", "truncated")
def _(d):
    (d / "truncated.bin").write_bytes((REALDATA / BIN).read_bytes()[:50000])
    return fourbit("generate", "truncated.bin", "--tokenizer", REALDATA / TOK, cwd=d)


@error_job("missing_tokenizer_file", "not found")
def _(d):
    return fourbit("generate", REALDATA / BIN, "--tokenizer", d / "nope" / "tokenizer.model", cwd=d)


@error_job("no_tokenizer_beside_bin", "--tokenizer")
def _(d):
    (d / BIN).symlink_to(REALDATA / BIN)  # a folder with the model but no tokenizer.model / tokenizer.json
    return fourbit("generate", BIN, "--max-new-tokens", 5, cwd=d)


@error_job("unknown_preset", "nope", realdata=False)
def _(d):
    return fourbit("generate", "dummy:nope", cwd=d)


@error_job("group_size_above_dim", "128")
def _(d):
    return fourbit("generate", *model_args("--scheme", "w4a16", "--group-size", 128, "--max-new-tokens", 5), cwd=d)


@error_job("group_size_48", "48")
def _(d):
    return fourbit("generate", *model_args("--scheme", "w4a16", "--group-size", 48, "--max-new-tokens", 5), cwd=d)


@error_job("missing_text", "--text")
def _(d):
    return fourbit("ppl", *model_args("--text", d / "missing.txt"), cwd=d)


@error_job("bench", "bench", realdata=False)
def _(d):
    return fourbit("bench", "gemm", cwd=d)  # this machine has no GPU


@error_job("quantize_out_is_a_file", "afile")
def _(d):
    (d / "afile").write_text("not a directory\n")
    return fourbit("quantize", *model_args("--group-size", 64, "--out", "afile"), cwd=d)


@error_job("ppl_batch_size_0", "batch")
def _(d):
    (d / "small.txt").write_text((REALDATA / TEXT).read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return fourbit("ppl", *model_args("--text", "small.txt", "--seq-len", 64, "--batch-size", 0), cwd=d)


@error_job("ppl_negative_max_tokens", "max-tokens")
def _(d):
    (d / "small.txt").write_text((REALDATA / TEXT).read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return fourbit("ppl", *model_args("--text", "small.txt", "--seq-len", 64, "--max-tokens", -5), cwd=d)


class CLIJobs:
    """Futures of the jobs the selected tests need, started two at a time; other jobs run on demand."""

    def __init__(self, tmp_path_factory, names):
        self.tmp = tmp_path_factory
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="fourbit-cli")
        order = sorted(names, key=lambda n: -JOBS[n][2])  # longest first: the shortest makespan
        self.futures = {n: self._submit(n) for n in order}

    def _submit(self, name):
        # the folder is made here, on the main thread: pytest's TempPathFactory is not thread-safe
        folder = self.tmp.mktemp(name.replace(":", "_"))
        return self.pool.submit(JOBS[name][0], folder)

    def __getitem__(self, name):
        if name not in self.futures:
            self.futures[name] = self._submit(name)
        return self.futures[name].result()

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def cli(request, tmp_path_factory):
    names = set()
    for item in request.session.items:
        if getattr(item, "module", None) is not request.module:
            continue
        wanted = getattr(getattr(item, "function", None), "_cli_jobs", ())
        if callable(wanted):
            wanted = wanted(item.callspec.params)
        names.update(wanted)
    if not HAVE_REALDATA:
        names = {n for n in names if not JOBS[n][1]}
    jobs = CLIJobs(tmp_path_factory, names)
    yield jobs
    jobs.close()


@pytest.fixture
def realdata():
    if not HAVE_REALDATA:
        pytest.skip(f"real data not found in {REALDATA} (needs {BIN}, {TOK}, {GREEDY}, {TEXT}); "
                    f"see shared/realdata/README.md")
    return REALDATA


# ---------------------------------------------------------------- generate

@needs("greedy200")
def test_generate_greedy_reproduces_llama2c(realdata, cli):
    p = ok(cli["greedy200"])
    expected = (realdata / GREEDY).read_bytes()
    assert p.stdout == expected, (f"stdout differs from {GREEDY}:\n got: {p.stdout[:300]!r}...{p.stdout[-80:]!r}\n"
                                  f"want: {expected[:300]!r}...{expected[-80:]!r}")


@needs("greedy199")
def test_generate_greedy_199_tokens_stops_one_short(realdata, cli):
    p = ok(cli["greedy199"])
    expected = (realdata / GREEDY).read_bytes()
    assert expected.endswith(b" she")
    assert p.stdout == expected[:-len(b" she")]


@needs("prompt_a", "prompt_b")
def test_generate_json_prompt_continuation(realdata, cli):
    a = one_json(cli["prompt_a"])
    assert set(a) >= {"text", "new_tokens", "prompt_tokens"}
    assert a["new_tokens"] == 12 and a["prompt_tokens"] > 1  # BOS + the prompt's pieces
    text = a["text"]
    # Only the continuation, with its leading space kept (SentencePiece would strip it when decoded alone).
    assert text.startswith(" ") and not text.startswith("  "), repr(text)
    assert not text.lstrip().startswith("Once upon"), repr(text)
    # Greedy from this prefix follows the reference story ("... there was a little girl named Lily. ...").
    reference = (realdata / GREEDY).read_text(encoding="utf-8")
    assert reference.startswith(PROMPT + text), repr(text)
    # A second run, streamed: the same text (deterministic), leading space included, nothing else on stdout.
    assert ok(cli["prompt_b"]).stdout.decode("utf-8") == text


@needs("seed1_a", "seed1_b", "seed2")
def test_generate_sampling_is_seeded(realdata, cli):
    a, b, c = one_json(cli["seed1_a"]), one_json(cli["seed1_b"]), one_json(cli["seed2"])
    for d in (a, b, c):
        assert 0 < d["new_tokens"] <= 30 and d["text"].strip(), d
    assert a["text"] == b["text"] and a["new_tokens"] == b["new_tokens"], "same --seed, different samples"
    assert a["text"] != c["text"], "--seed 1 and --seed 2 sampled the same 30 tokens"


# ---------------------------------------------------------------- ppl

@needs("ppl_fp32")
def test_ppl_fp32(realdata, cli):
    r = one_json(cli["ppl_fp32"])
    assert r["tokens"] == TEXT_TOKENS  # the whole text's ids (BOS included), before --max-tokens
    assert r["seq_len"] == 512 and r["windows"] == 20000 // 512
    assert r["predictions"] == r["windows"] * 511
    assert 3 < r["ppl"] < 8, r
    assert math.isclose(r["ppl"], math.exp(r["nll"]), rel_tol=1e-9)


@pytest.mark.parametrize("group", ["32", "-1"])
@needs(lambda params: ("ppl_fp32", {"32": "ppl_g32", "-1": "ppl_gm1"}[params["group"]]))
def test_ppl_w4a16_close_to_fp32(realdata, cli, group):
    base = one_json(cli["ppl_fp32"])
    q = one_json(cli[{"32": "ppl_g32", "-1": "ppl_gm1"}[group]])
    assert q["tokens"] == base["tokens"] and q["predictions"] == base["predictions"]
    # 4-bit RTN costs some perplexity on this tiny model, but not much
    assert base["ppl"] < q["ppl"] < 1.15 * base["ppl"], (base["ppl"], q["ppl"])


@needs("ppl_g32", "ppl_gm1")
def test_ppl_group_size_is_applied(realdata, cli):
    assert one_json(cli["ppl_g32"])["ppl"] != one_json(cli["ppl_gm1"])["ppl"]


# ---------------------------------------------------------------- quantize -> checkpoint

@needs("quantized")
def test_quantize_writes_checkpoint(realdata, cli):
    res = cli["quantized"]
    ok(res["quantize"])
    ckpt = res["dir"]
    meta = json.loads((ckpt / "config.json").read_text())
    qc = meta["quantization_config"]
    assert qc["group_size"] == 64 and qc["scheme"] == "w4a16" and qc["sym"] is False and qc["algo"] == "rtn"
    assert (ckpt / "model.safetensors").stat().st_size > 0
    tok_bytes = (realdata / TOK).read_bytes()
    assert any(f.read_bytes() == tok_bytes for f in ckpt.iterdir() if f.suffix == ".model"), \
        f"the tokenizer was not written into {sorted(f.name for f in ckpt.iterdir())}"


@needs("quantized", "quantize_on_load")
def test_quantized_checkpoint_generates_like_quantize_on_load(realdata, cli):
    res = cli["quantized"]
    ok(res["quantize"])
    assert "generate" in res, "quantize wrote no tokenizer file"
    from_ckpt, on_load = ok(res["generate"]).stdout, ok(cli["quantize_on_load"]).stdout
    assert from_ckpt.startswith(b"Once upon a time"), from_ckpt
    assert from_ckpt == on_load


@needs("quantized")
def test_quantized_checkpoint_ppl(realdata, cli):
    res = cli["quantized"]
    ok(res["quantize"])
    assert "ppl" in res, "quantize wrote no tokenizer file"
    r = one_json(res["ppl"])
    assert r["tokens"] == TEXT_TOKENS and r["windows"] == 5000 // 512 and r["predictions"] == r["windows"] * 511
    assert 3 < r["ppl"] < 8, r


@needs("quantized", "quantize_on_load")
def test_quantized_checkpoint_finds_its_own_tokenizer(realdata, cli):
    res = cli["quantized"]
    ok(res["quantize"])
    assert ok(res["generate_no_tokenizer"]).stdout == ok(cli["quantize_on_load"]).stdout


# ---------------------------------------------------------------- demo

@needs("demo")
def test_demo_json(cli):
    r = one_json(cli["demo"])
    assert r["preset"] == "tiny" and r["device"] == "CPU"
    assert r["layers_quantized"] == 4 * 7  # tiny: 4 layers x q, k, v, o, gate, up, down
    assert set(r["rel_error"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for kind, e in r["rel_error"].items():
        assert e["layers"] == 4, (kind, e)
        assert 0 < e["mean"] <= e["max"] < 0.2, (kind, e)
    steps = r["decode_step_ms"]  # {scheme: {timing mode: ms}}: eager on a CPU (CUDA graphs too on a GPU)
    assert set(steps) == {"fp32", "w4a16"}, steps
    for scheme, times in steps.items():
        assert "eager" in times and all(isinstance(v, (int, float)) and v > 0 for v in times.values()), steps
    assert r["speedup"] > 0 and math.isclose(r["speedup"], steps["fp32"]["eager"] / steps["w4a16"]["eager"])
    assert set(r["weight_bytes"]) == {"fp32", "w4a16"}, r["weight_bytes"]
    assert r["weight_bytes"]["w4a16"] < 0.2 * r["weight_bytes"]["fp32"], r["weight_bytes"]


# ---------------------------------------------------------------- bad input: one line, no traceback

@pytest.mark.parametrize("case", list(ERRORS))
@needs(lambda params: ("err:" + params["case"],))
def test_bad_input_is_one_line_error(cli, case):
    if JOBS["err:" + case][1] and not HAVE_REALDATA:
        pytest.skip(f"real data not found in {REALDATA}")
    line = one_line_error(cli["err:" + case])
    assert ERRORS[case] in line, line


def test_generate_hf_directory_finds_tokenizer_json(tmp_path):
    """An HF directory (config.json + safetensors + tokenizer.json) runs with no --tokenizer; greedy text equals the API's."""
    import torch
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    import fourbit as fb
    from hf_fixtures import write_hf_checkpoint

    cfg = write_hf_checkpoint(tmp_path / "hf", "llama", seed=3)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, cfg["vocab_size"])}}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))

    r = one_json(run := fourbit("generate", tmp_path / "hf", "--prompt", "w5 w7", "--temperature", 0,
                                 "--max-new-tokens", 6, "--scheme", "fp32", "--json", cwd=tmp_path))
    model = fb.load(tmp_path / "hf", dtype=torch.float32)
    t = fb.Tokenizer(tmp_path / "hf")
    new = fb.generate(model, [t.encode("w5 w7", bos=True)], fb.SamplingParams(max_new_tokens=6))[0]
    assert run.returncode == 0 and r["prompt_tokens"] == 3 and r["new_tokens"] == len(new)
    assert r["text"].split() == [f"w{i}" for i in new]
