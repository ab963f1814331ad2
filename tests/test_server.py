"""The OpenAI-compatible server (fourbit/engine/server.py), run by uvicorn on 127.0.0.1 in a background thread and
spoken to over HTTP by httpx, with a fake engine (tests/fake_engine.py) that echoes prompts; and the tokenizer's
chat templates.

Most tests use a byte-level tokenizer made here (one token per UTF-8 byte, so characters split over tokens) with a
chat template; the SentencePiece ones read the real tok512.model in place.
"""
from __future__ import annotations

import asyncio
import json
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from fake_engine import FakeAsyncLLM

from fourbit.engine.server import build_app
from fourbit.errors import FourbitError
from fourbit.models.tokenizer import IdTokenizer, Tokenizer, prompt_ids

TEMPLATE = ("{% if messages[0]['role'] == 'tool' %}{{ raise_exception('tool messages need a call first') }}{% endif %}"
            "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def byte_tokenizer(folder, chat_template: str | None = TEMPLATE, bos: bool = True) -> Tokenizer:
    """A tokenizer.json with one token per byte (ids 2..257) and <s> = 0, </s> = 1, plus tokenizer_config.json
    (naming <s> as the BOS unless bos=False)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<s>", "</s>"])
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>"} if bos else {"eos_token": "</s>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer(folder)


class Server:
    """uvicorn serving build_app(engine) on a free port of 127.0.0.1, in a thread (as `with Server(...) as s`)."""

    def __init__(self, engine, grace_s: float = 5.0):
        self.engine = engine
        config = uvicorn.Config(build_app(engine), host="127.0.0.1", port=0, log_level="warning",
                                timeout_graceful_shutdown=grace_s)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self):
        self.server.should_exit = True  # what uvicorn's SIGINT / SIGTERM handler does

    def __exit__(self, *exc):
        self.stop()
        self.thread.join(15)
        assert not self.thread.is_alive(), "uvicorn did not shut down"


def wait_until(predicate, timeout=3.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def sse(response) -> tuple[list[dict], bool]:
    """The JSON events of a streamed response, and whether it ended with data: [DONE]."""
    events, done = [], False
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: ") and not done, line
        if line == "data: [DONE]":
            done = True
        else:
            events.append(json.loads(line[len("data: "):]))
    return events, done


def stream(client, path, body) -> tuple[list[dict], bool]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse(r)


def completion_text(events) -> str:
    return "".join(e["choices"][0]["text"] for e in events if e["choices"])


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return byte_tokenizer(tmp_path_factory.mktemp("bytetok"))


@pytest.fixture(scope="module")
def server(tok):
    with Server(FakeAsyncLLM(tok)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


@pytest.fixture()
def engine(server):
    yield server.engine
    # every test leaves the engine idle: no request leaked by the server
    assert wait_until(lambda: server.engine.num_in_flight == 0), "a request is still in flight in the engine"


# -- endpoints -------------------------------------------------------------------------------------------------
def test_models_health_and_unknown_routes(client, engine):
    assert engine.started
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["fake-model"]
    assert models["data"][0]["object"] == "model" and models["data"][0]["max_model_len"] == 2048
    assert client.get("/v1/models/fake-model").json()["id"] == "fake-model"
    r = client.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    health = client.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "requests_in_flight": 0}
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and "/v1/completions" in r.json()["error"]["message"]
    r = client.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_completion(client, engine):
    prompt = "Héllo, wörld ☃ 日本!"
    n = len(prompt.encode())
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": prompt, "max_tokens": n})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "fake-model" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": prompt, "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": n + 1, "completion_tokens": n, "total_tokens": 2 * n + 1,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    ids, params = engine.requests[-1]
    assert ids == [engine.tokenizer.bos_id] + engine.tokenizer.encode(prompt)  # BOS prepended to text prompts
    assert (params.max_new_tokens, params.temperature, params.top_p, params.seed) == (n, 1.0, 1.0, None)
    # defaults as OpenAI: 16 tokens; the output echoes the prompt cyclically
    r = client.post("/v1/completions", json={"prompt": "abcdefghij"}).json()
    assert r["choices"][0]["text"] == "abcdefghijabcdef" and r["usage"]["completion_tokens"] == 16


def test_sampling_fields_reach_the_engine(client, engine):
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "temperature": 0, "top_p": 0.5,
                                             "seed": 7, "n": 1, "echo": False, "logprobs": None,
                                             "presence_penalty": 0.0, "user": "someone"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "xxx"
    _, params = engine.requests[-1]
    assert (params.max_new_tokens, params.temperature, params.top_p, params.seed) == (3, 0.0, 0.5, 7)


def test_prompt_as_token_ids_and_batches_of_one(client, engine, tok):
    ids = tok.encode("token ids")
    for prompt in (ids, [ids], ["token ids"]):
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": len(ids)})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "token ids", prompt
    assert engine.requests[-3][0] == ids and engine.requests[-2][0] == ids  # token ids go in as they are


def test_stream_matches_non_streaming(client, engine):
    prompt = "Grüße — ☃ 日本語 🙂 done"
    body = {"prompt": prompt, "max_tokens": 40, "temperature": 0}
    full = client.post("/v1/completions", json=body).json()
    events, done = stream(client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert done
    pieces = [e["choices"][0]["text"] for e in events if e["choices"] and e["choices"][0]["text"]]
    # characters are split over byte tokens delivered in uneven groups; no piece may carry half of one, but the
    # 40th byte cuts "ß" in two, and the end gives out what there is
    assert all("\ufffd" not in p for p in pieces[:-1]) and pieces[-1].endswith("\ufffd") and len(pieces) > 5
    assert "".join(pieces) == full["choices"][0]["text"] == (prompt.encode() * 2)[:40].decode("utf-8", "replace")
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert events[-1]["choices"] == [] and events[-1]["usage"] == full["usage"]  # include_usage: a last chunk
    assert all(e["usage"] is None for e in events[:-1]) and len({e["id"] for e in events}) == 1
    events, done = stream(client, "/v1/completions", body)  # without include_usage: no usage anywhere
    assert done and all("usage" not in e for e in events)


def test_stop_strings(client, engine):
    body = {"prompt": "abc, def. ghi", "max_tokens": 13, "stop": [". ", "zzz"]}
    r = client.post("/v1/completions", json=body).json()
    assert r["choices"][0]["text"] == "abc, def" and r["choices"][0]["finish_reason"] == "stop"
    events, _ = stream(client, "/v1/completions", body)
    assert completion_text(events) == "abc, def" and events[-1]["choices"][0]["finish_reason"] == "stop"
    # the engine request is ended as soon as the stop string shows: the echo would have gone on
    r = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 1000, "stop": "bab"}).json()
    assert r["choices"][0]["text"] == "a" and r["usage"]["completion_tokens"] < 20
    # a tail that only begins a stop string is held back while it might complete, then given out
    body = {"prompt": "hello wor", "max_tokens": 9, "stop": "world"}
    r = client.post("/v1/completions", json=body).json()
    assert r["choices"][0]["text"] == "hello wor" and r["choices"][0]["finish_reason"] == "length"
    events, _ = stream(client, "/v1/completions", body)
    assert completion_text(events) == "hello wor"
    # EOS (here in the prompt, so the echo reaches it) finishes with "stop" and is not in the text
    r = client.post("/v1/completions", json={"prompt": "hi</s>there", "max_tokens": 50}).json()
    assert r["choices"][0]["text"] == "hi" and r["choices"][0]["finish_reason"] == "stop"


def test_chat_with_template(client, engine, tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi ☃"}, {"type": "text", "text": "there"}]}]
    rendered = "<|system|>Be brief.\n<|user|>Hi ☃\nthere\n<|assistant|>"
    assert tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hi ☃\nthere"}]) == "<s>" + rendered
    n = len(rendered.encode())
    r = client.post("/v1/chat/completions", json={"model": "fake-model", "messages": messages,
                                                  "max_completion_tokens": n})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": rendered},
                                "logprobs": None, "finish_reason": "length"}]
    assert engine.requests[-1][0] == [tok.bos_id] + tok.encode(rendered)  # "<s>" in the template became BOS
    assert body["usage"]["prompt_tokens"] == n + 1

    events, done = stream(client, "/v1/chat/completions", {"messages": messages, "max_tokens": n,
                                                          "stream_options": {"include_usage": True}})
    assert done and all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == rendered
    assert events[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert events[-1]["usage"] == body["usage"]

    r = client.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "42"}]})
    assert r.status_code == 400 and "tool messages need a call first" in r.json()["error"]["message"]


def test_chat_defaults_to_the_end_of_the_context(tok):
    with Server(FakeAsyncLLM(tok, max_model_len=64)) as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hey"}]})
        usage = r.json()["usage"]
        assert r.json()["choices"][0]["finish_reason"] == "length" and usage["total_tokens"] == 64


# -- bad requests ----------------------------------------------------------------------------------------------
COMPLETE, CHAT = "/v1/completions", "/v1/chat/completions"
BAD = [  # path, body, status, words in the message, param
    (COMPLETE, b"{not json", 400, "not valid JSON", None),
    (COMPLETE, b"[1, 2]", 400, "JSON object", None),
    (COMPLETE, {"max_tokens": 5}, 400, "'prompt' is required", "prompt"),
    (COMPLETE, {"prompt": 123}, 400, "'prompt' is required", "prompt"),
    (COMPLETE, {"prompt": ["one", "two"]}, 400, "one request per prompt", "prompt"),
    (COMPLETE, {"prompt": [], "max_tokens": 1}, 400, "the prompt is empty", "prompt"),
    (COMPLETE, {"prompt": "x", "model": "gpt-4"}, 404, "does not exist", "model"),
    (COMPLETE, {"prompt": "x", "model": 3}, 400, "'model' must be a string", "model"),
    (COMPLETE, {"prompt": "x", "max_tokens": -1}, 400, "'max_tokens' must be >= 0", "max_tokens"),
    (COMPLETE, {"prompt": "x", "max_tokens": "5"}, 400, "'max_tokens' must be an integer", "max_tokens"),
    (COMPLETE, {"prompt": "x", "max_tokens": 2.5}, 400, "must be an integer", "max_tokens"),
    (COMPLETE, {"prompt": "x", "temperature": -0.5}, 400, "'temperature' must be >= 0", "temperature"),
    (COMPLETE, {"prompt": "x", "temperature": "hot"}, 400, "'temperature' must be a number", "temperature"),
    (COMPLETE, {"prompt": "x", "top_p": 0}, 400, "'top_p' must be in (0, 1]", "top_p"),
    (COMPLETE, {"prompt": "x", "top_p": 1.5}, 400, "'top_p' must be in (0, 1]", "top_p"),
    (COMPLETE, {"prompt": "x", "n": 2}, 400, "'n' must be 1", "n"),
    (COMPLETE, {"prompt": "x", "logprobs": 0}, 400, "'logprobs' is not supported", "logprobs"),
    (COMPLETE, {"prompt": "x", "echo": True}, 400, "'echo' is not supported", "echo"),
    (COMPLETE, {"prompt": "x", "best_of": 3}, 400, "'best_of' is not supported", "best_of"),
    (COMPLETE, {"prompt": "x", "stop": 5}, 400, "'stop' must be", "stop"),
    (COMPLETE, {"prompt": "x", "stop": ["a", ""]}, 400, "'stop' must be", "stop"),
    (COMPLETE, {"prompt": "x", "stream": "yes"}, 400, "'stream' must be true or false", "stream"),
    (COMPLETE, {"prompt": "x" * 2048}, 400, "2049 tokens but this model's context is 2048", "prompt"),
    (COMPLETE, {"prompt": "x" * 2000, "max_tokens": 100}, 400, "ask for at most 47", "max_tokens"),
    (COMPLETE, {"prompt": [5, 999], "max_tokens": 1}, 400, "token ids must be in [0, 258)", None),  # the engine's
    (CHAT, {"max_tokens": 1}, 400, "'messages' is required", "messages"),
    (CHAT, {"messages": []}, 400, "'messages' is required", "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "one of system, developer", "messages[0]"),
    (CHAT, {"messages": [{"role": "user", "content": 7}]}, 400, "string or a list of text parts",
     "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "'image_url' part", "messages[0].content[0]"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3}, 400,
     "'max_completion_tokens' must be >= 0", "max_completion_tokens"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "'logprobs' is not supported",
     "logprobs"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "model": "llama"}, 404, "serves 'fake-model'", "model"),
]


@pytest.mark.parametrize("path, body, status, words, param", BAD, ids=[f"{p[1:]}-{i}" for i, (p, *_) in enumerate(BAD)])
def test_bad_requests(client, engine, path, body, status, words, param):
    before = len(engine.requests)
    r = client.post(path, content=body) if isinstance(body, bytes) else client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["param"] == param, error
    assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}
    assert len(engine.requests) == before  # nothing reached the engine
    if status == 404:
        assert error["code"] == "model_not_found"


# -- disconnects, concurrency, back-pressure, shutdown ---------------------------------------------------------
def test_client_disconnect_mid_stream_aborts(client, engine):
    aborted = engine.aborted
    with client.stream("POST", "/v1/completions", json={"prompt": "abc", "max_tokens": 2000, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert engine.num_in_flight == 1
    # the client is gone after a few tokens of 2000: the engine request must be aborted, not run to the end
    assert wait_until(lambda: engine.aborted == aborted + 1 and engine.num_in_flight == 0, timeout=2)


def test_client_disconnect_while_waiting_aborts(client, engine):
    aborted = engine.aborted
    with pytest.raises(httpx.ReadTimeout):
        client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2000}, timeout=0.3)
    assert wait_until(lambda: engine.aborted == aborted + 1 and engine.num_in_flight == 0, timeout=2)


def test_64_concurrent_streams(server, engine):
    prompts = [f"client {i}: {'☃' * (i % 5)} {i * 7919}" for i in range(64)]

    async def one(c, prompt):
        async with c.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 30, "stream": True,
                                                              "temperature": 0}) as r:
            assert r.status_code == 200
            text = ""
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
            return text

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    engine.peak_in_flight = 0
    texts = asyncio.run(run())
    assert texts == [(p.encode() * 3)[:30].decode("utf-8", "replace") for p in prompts]
    assert engine.peak_in_flight > 16  # they really ran together


def test_queue_full_gives_503(tok):
    engine = FakeAsyncLLM(tok, max_queued=2, delay=0.02)
    with Server(engine) as s, httpx.Client(base_url=s.url, timeout=10) as c1, httpx.Client(base_url=s.url) as c2:
        body = {"prompt": "long", "max_tokens": 1000, "stream": True}
        with c1.stream("POST", "/v1/completions", json=body) as r1, \
                c2.stream("POST", "/v1/completions", json=body) as r2:
            lines = r1.iter_lines(), r2.iter_lines()  # kept: dropping a line iterator closes its connection
            next(lines[0]), next(lines[1])
            assert engine.num_in_flight == 2
            r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "one more"})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full" and "max_queued=2" in r.json()["error"]["message"]
        assert wait_until(lambda: engine.num_in_flight == 0)
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "room again", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "room"


def test_graceful_shutdown(tok):
    engine = FakeAsyncLLM(tok, delay=0.01)
    results = {}

    def consume(name, max_tokens):
        try:
            with httpx.stream("POST", f"{s.url}/v1/completions", timeout=10,
                              json={"prompt": "abcd", "max_tokens": max_tokens, "stream": True}) as r:
                results[name] = sse(r)
        except httpx.HTTPError as e:  # the connection dropped mid-stream
            results[name] = e

    s = Server(engine, grace_s=1.0)
    with s:
        short = threading.Thread(target=consume, args=("short", 60))
        long = threading.Thread(target=consume, args=("long", 2000))
        short.start(), long.start()
        assert wait_until(lambda: engine.num_in_flight == 2)
        s.stop()  # as SIGTERM / Ctrl-C
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # no new connections once shutting down
            httpx.get(f"{s.url}/health")
        assert not engine.shut_down  # still serving the requests in flight
        short.join(5), long.join(5)
    # the short request completed; the long one was cut after the grace period and aborted in the engine
    events, done = results["short"]
    assert done and completion_text(events) == ("abcd" * 15)
    assert not isinstance(results["long"], tuple) or not results["long"][1]
    assert engine.aborted == 1 and engine.num_in_flight == 0 and engine.shut_down


def test_engine_failure_mid_request(tok):
    engine = FakeAsyncLLM(tok)
    engine.fail_after = 5
    with Server(engine) as s, httpx.Client(base_url=s.url, timeout=10) as c:
        r = c.post("/v1/completions", json={"prompt": "abcdefgh", "max_tokens": 20})
        assert r.status_code == 500 and "illegal memory access" in r.json()["error"]["message"]
        events, done = stream(c, "/v1/completions", {"prompt": "abcdefgh", "max_tokens": 20})
        # the 200 went out with the first tokens: the failure comes as an error event, then [DONE]
        assert completion_text(events[:-1]) == "abcdef" and "illegal memory access" in events[-1]["error"]["message"]
        assert done and engine.num_in_flight == 0
    engine = FakeAsyncLLM(tok)
    engine.dead = True  # an engine that failed earlier: a server error (500), not the client's (400)
    with Server(engine) as s, httpx.Client(base_url=s.url, timeout=10) as c:
        r = c.post("/v1/completions", json={"prompt": "abcdefgh", "max_tokens": 20})
        assert r.status_code == 500 and "stopped after an error" in r.json()["error"]["message"]
    with pytest.raises(FourbitError, match="tokenizer"):
        build_app(FakeAsyncLLM(None))


# -- tokenizer chat templates ----------------------------------------------------------------------------------
def test_plain_chat_format_without_template(tmp_path):
    tok = byte_tokenizer(tmp_path, chat_template=None)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert tok.chat_template is None
    assert tok.apply_chat_template(chat) == "System: Be brief.\nUser: Hi!\nAssistant:"
    assert tok.encode_chat(chat) == tok.encode("System: Be brief.\nUser: Hi!\nAssistant:", bos=True)


def test_plain_chat_gets_the_bos_of_a_text_prompt(tmp_path):
    # A tokenizer that names no BOS: a text prompt starts with the model's (prompt_ids), and so does a chat in
    # the plain format, as rendered for the same model; without a model BOS, neither has one.
    tok = byte_tokenizer(tmp_path, chat_template=None, bos=False)
    chat = [{"role": "user", "content": "Hi!"}]
    text = tok.apply_chat_template(chat)
    assert tok.bos_id is None
    assert tok.encode_chat(chat, default_bos=7) == prompt_ids(tok, text, 7) == [7] + tok.encode(text)
    assert tok.encode_chat(chat) == prompt_ids(tok, text, None) == tok.encode(text)
    ids = IdTokenizer(100, bos_id=None, eos_id=2)
    assert ids.encode_chat([{"role": "user", "content": "5 6"}], default_bos=1) == [1, 5, 6]


def test_chat_template_sources(tmp_path):
    tok = byte_tokenizer(tmp_path, chat_template=[{"name": "tool_use", "template": "T"},
                                                  {"name": "default", "template": "D{{ messages[0].content }}"}])
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "Dx"
    (tmp_path / "chat_template.jinja").write_text("J{{ eos_token }}")  # newer repos: this file wins
    assert Tokenizer(tmp_path).apply_chat_template([]) == "J</s>"


def test_chat_template_errors(tmp_path, monkeypatch):
    tok = byte_tokenizer(tmp_path / "a", chat_template="{% for m in messages %}{{ m.content }")
    with pytest.raises(FourbitError, match="not valid Jinja"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok = byte_tokenizer(tmp_path / "b", chat_template="{{ messages | length }} (a template compiled only here)")
    monkeypatch.setitem(sys.modules, "jinja2", None)  # as if not installed
    with pytest.raises(FourbitError, match="pip install jinja2"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_sentencepiece_template_specials_become_ids(tmp_path, realdata):
    (tmp_path / "tokenizer.model").symlink_to(realdata / "tok512.model")  # read in place
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}{{ bos_token }}[{{ m.content }}]{{ eos_token }}{% endfor %}"}))
    tok = Tokenizer(tmp_path)
    ids = tok.encode_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert ids == [tok.bos_id] + tok.encode("[a]") + [tok.eos_id, tok.bos_id] + tok.encode("[b]") + [tok.eos_id]


# -- SentencePiece through the server --------------------------------------------------------------------------
def test_sentencepiece_leading_spaces_and_plain_chat(realdata):
    tok = Tokenizer(realdata / "tok512.model")
    assert tok.chat_template is None
    with Server(FakeAsyncLLM(tok)) as s, httpx.Client(base_url=s.url, timeout=10) as c:
        prompt = "Once upon a time, there was a little girl."
        n = len(tok.encode(prompt))
        body = {"prompt": prompt, "max_tokens": n}
        text = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
        # the first word is decoded after the prompt's last token, so it keeps the space a reply would have
        assert text == " " + prompt
        assert completion_text(stream(c, "/v1/completions", body)[0]) == text

        chat = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi there"}]
        rendered = "System: Be nice.\nUser: Hi there\nAssistant:"
        n = len(tok.encode(rendered))
        r = c.post("/v1/chat/completions", json={"messages": chat, "max_tokens": n}).json()
        assert r["choices"][0]["message"]["content"] == " " + rendered and r["usage"]["prompt_tokens"] == n + 1


# -- the real engine -------------------------------------------------------------------------------------------
def test_real_engine_stories260k(realdata):
    """The server over fourbit's AsyncLLM on the tiny stories260K model: greedy text equals the offline engine's,
    streamed or not, alone or concurrently, and a client that leaves frees its request."""
    from fourbit.config import EngineConfig, SamplingParams
    from fourbit.engine.llm import LLM, AsyncLLM

    llm = LLM(realdata / "stories260K.bin", tokenizer=realdata / "tok512.model", config=EngineConfig(cuda_graphs=False))
    prompts = ["Once upon a time", "Tom and Lily went to the park", "The cat", "One day, a big dog"]
    offline = [c.text for c in llm.generate(prompts, SamplingParams(max_new_tokens=40), progress=False)]
    engine = AsyncLLM(llm, "stories260K")
    with Server(engine) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        body = {"prompt": prompts[0], "max_tokens": 40, "temperature": 0}
        r = c.post("/v1/completions", json=body).json()
        assert r["choices"][0]["text"] == offline[0] and r["usage"]["completion_tokens"] == 40
        assert completion_text(stream(c, "/v1/completions", body)[0]) == r["choices"][0]["text"]

        async def one(ac, prompt):
            r = await ac.post("/v1/completions", json={"prompt": prompt, "max_tokens": 40, "temperature": 0})
            return r.json()["choices"][0]["text"]

        async def run():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as ac:
                return await asyncio.gather(*(one(ac, p) for p in prompts * 4))

        assert asyncio.run(run()) == offline * 4

        with c.stream("POST", "/v1/completions", json={"prompt": "The end", "max_tokens": 400, "stream": True}) as r:
            lines = r.iter_lines()
            next(lines)
        assert wait_until(lambda: engine.num_in_flight == 0, timeout=5)
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Tell me a story"}],
                                                 "max_tokens": 8, "stop": "\nUser:"}).json()
        assert r["usage"]["prompt_tokens"] == len(llm.tokenizer.encode_chat(
            [{"role": "user", "content": "Tell me a story"}])) and r["choices"][0]["message"]["content"]
