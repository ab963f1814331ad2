"""`fourbit serve` as a user runs it: a subprocess on the real stories260K model, queried over HTTP, stopped with
SIGTERM (graceful: the app's shutdown runs, then uvicorn re-raises the signal, as it does since 0.29); bad engine flags fail before the model loads, with one line naming the fix."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_and_shuts_down_gracefully(realdata, tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "fourbit.cli", "serve", str(realdata / "stories260K.bin"), "--tokenizer",
           str(realdata / "tok512.model"), "--device", "cpu", "--port", str(port), "--max-num-seqs", "8",
           "--served-model-name", "stories"]
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "stories"
        r = httpx.post(url + "/v1/completions", json={"model": "stories", "prompt": "Once upon a time",
                                                       "max_tokens": 20, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20
        assert r.json()["choices"][0]["text"].startswith(", there was")  # what stories260K says greedily
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": -1})
        assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    text = (tmp_path / "serve.log").read_text()
    assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in text, text


@pytest.mark.parametrize("flags, message", [
    (["--block-size", "12"], "block_size must be a power of two"),
    (["--max-num-seqs", "0"], "max_num_seqs must be >= 1"),
    (["--kv-cache-fraction", "1.5"], "kv_cache_fraction must be in (0, 1]"),
])
def test_serve_bad_engine_flags(flags, message):
    r = subprocess.run([sys.executable, "-m", "fourbit.cli", "serve", "dummy:tiny", "--device", "cpu", *flags],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and message in r.stderr and r.stderr.startswith("fourbit: error:"), r.stderr
