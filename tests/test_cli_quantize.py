"""`fourbit quantize --algo awq|gptq` end to end on the real stories260K model (small calibration, to stay fast),
the checkpoints it writes read back by `fourbit ppl` / `fourbit generate`, and its one-line errors.

The end-to-end commands run as subprocesses, started at once by the module fixture (two at a time), as in
test_cli.py; the error cases, which fail before any work, run in this process (fourbit.cli.main) to save the
~2 s torch import each subprocess costs.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from fourbit.cli import main
from test_cli import BIN, HAVE_REALDATA, REALDATA, TEXT, TOK, fourbit, one_json

WIKI = "wiki.test.raw"


def real(*extra):
    return (REALDATA / BIN, "--tokenizer", REALDATA / TOK, *extra)


def calib(text=WIKI, nsamples=8, seqlen=128):  # calibrate on WikiText, evaluate on TinyStories: disjoint texts
    return ("--calib", REALDATA / text, "--nsamples", nsamples, "--seqlen", seqlen)


def _quantize_then_use(d, *flags, generate=False):
    ckpt = d / "ckpt"
    res = {"dir": ckpt, "quantize": fourbit("quantize", *real(*flags, "--out", ckpt, "--json"), cwd=d)}
    if res["quantize"].returncode == 0:
        res["ppl"] = fourbit("ppl", ckpt, "--text", REALDATA / TEXT, "--max-tokens", 5000, "--json", cwd=d)
        if generate:
            res["generate"] = fourbit("generate", ckpt, "--prompt", "Once upon a time", "--temperature", 0,
                                      "--max-new-tokens", 16, "--json", cwd=d)
    return res


JOBS = {
    "gptq": lambda d: _quantize_then_use(d, "--algo", "gptq", "--act-order", "--group-size", 32, *calib(),
                                         generate=True),
    "awq": lambda d: _quantize_then_use(d, "--algo", "awq", "--group-size", 64, *calib()),
    "rtn_ppl": lambda d: fourbit("ppl", *real("--text", REALDATA / TEXT, "--max-tokens", 5000, "--json",
                                              "--scheme", "w4a16", "--group-size", 32), cwd=d),
}

# name -> (flags after `fourbit quantize MODEL --tokenizer TOK`, text the one-line error must contain)
ERRORS = {
    "no_calib": (("--algo", "gptq"), "--calib"),
    "act_order_awq": (("--algo", "awq", "--act-order", *calib()), "--act-order"),
    "nsamples_0": (("--algo", "gptq", *calib(nsamples=0)), "--nsamples"),
    "seqlen_0": (("--algo", "awq", *calib(seqlen=0)), "--seqlen"),
    "seqlen_over_context": (("--algo", "gptq", *calib(seqlen=513)), "--seqlen"),
    "calib_missing": (("--algo", "gptq", "--calib", "nope.txt"), "nope.txt"),
    "calib_too_short": (("--algo", "gptq", "--calib", "short.txt", "--seqlen", 64), "--seqlen"),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    if not HAVE_REALDATA:
        pytest.skip(f"real data not found in {REALDATA}")
    order = sorted(JOBS, key=lambda n: n.startswith("err:"))  # the long jobs first
    folders = {n: tmp_path_factory.mktemp(n.replace(":", "_")) for n in order}  # on the main thread
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {n: pool.submit(JOBS[n], folders[n]) for n in order}
        yield {n: f.result() for n, f in futures.items()}


@pytest.mark.parametrize("algo", ["gptq", "awq"])
def test_quantize_calibrated_checkpoint(cli, algo):
    res = cli[algo]
    info = one_json(res["quantize"])
    qc = json.loads((res["dir"] / "config.json").read_text())["quantization_config"]
    assert qc["algo"] == algo and qc["act_order"] == (algo == "gptq")
    assert qc["group_size"] == {"gptq": 32, "awq": 64}[algo]
    assert info["tokenizer"]  # the checkpoint carries its tokenizer, so ppl and generate need no --tokenizer
    ppl, rtn = one_json(res["ppl"]), one_json(cli["rtn_ppl"])
    assert ppl["tokens"] == rtn["tokens"] and ppl["predictions"] == rtn["predictions"]
    # 8 x 128 tokens of out-of-domain calibration text: close to RTN at least (the full comparison, with
    # in-domain calibration, is benchmarks/accuracy.py)
    assert 3 < ppl["ppl"] < 1.05 * rtn["ppl"], (ppl, rtn)
    if "generate" in res:
        gen = one_json(res["generate"])
        assert gen["new_tokens"] > 0 and gen["text"].strip()


def test_quantize_dummy_calibrates_on_random_ids(tmp_path, capsys):
    main(["quantize", "dummy:tiny", "--algo", "gptq", "--group-size", "64", "--nsamples", "2", "--seqlen", "16",
          "--device", "cpu", "--out", str(tmp_path / "ckpt"), "--json"])
    assert json.loads(capsys.readouterr().out)["tokenizer"] is None
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]["algo"] == "gptq"


@pytest.mark.parametrize("case", list(ERRORS))
def test_quantize_errors_are_one_line(case, tmp_path, monkeypatch, capsys):
    if not HAVE_REALDATA:
        pytest.skip(f"real data not found in {REALDATA}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "short.txt").write_text("Once upon a time there was a cat.\n", encoding="utf-8")
    flags, match = ERRORS[case]
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", *map(str, real("--group-size", 32, *flags, "--out", tmp_path / "out"))])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert exit_.value.code == 1 and captured.out == "" and len(lines) == 1, captured
    assert lines[0].startswith("fourbit: error: ") and match in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
