"""OpenAI-compatible HTTP server over an AsyncLLM: /v1/completions, /v1/chat/completions, /v1/models, /health.

    serve(AsyncLLM(LLM("model_dir"), "my-model"), port=8000)
    curl localhost:8000/v1/completions -d '{"prompt": "Once upon a time", "max_tokens": 32, "stream": true}'

The server only uses the engine's async interface (generate / start / shutdown, encode / encode_chat, tokenizer,
max_model_len); the engine batches concurrent requests. Where OpenAI's API leaves room, the choices made here:
- One prompt per request: a list of several prompts gets 400 (send one request per prompt; the engine batches
  them anyway). n must be 1. echo, logprobs, best_of, suffix, logit_bias, penalties and tools get 400 naming the
  field unless left at their neutral value: a request is never answered as if they had been honoured.
- "model" may be left out; a name other than the served model's gets 404 (code "model_not_found"), as OpenAI.
- A full engine (max_queued requests in flight) answers 503 with Retry-After: 1: it is the server's capacity, not
  the client's rate (429); OpenAI's SDKs retry both.
- max_tokens: completions default to 16 (OpenAI's default), chats to the end of the context; a prompt plus
  max_tokens beyond max_model_len gets 400 (code "context_length_exceeded"), as OpenAI.
- Extension (as vLLM's): "ignore_eos": true generates max_tokens whatever the model says (benchmarks).
- finish_reason: "stop" (EOS or a stop string), "length" (max_tokens or the context end), "abort" (the engine
  shut down mid-request).
- Chat messages render with the tokenizer's chat template, else its plain "Role: content" format (see
  models/tokenizer.py); several text parts of one message join with newlines.
A client that disconnects, streaming or not, has its request aborted in the engine (its KV blocks freed).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
from dataclasses import dataclass

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..config import SamplingParams
from ..errors import FourbitError
from ..models.tokenizer import TextStream
from .llm import EngineError, QueueFull

ROLES = ("system", "developer", "user", "assistant", "tool")
# field -> the value that asks for nothing: clients send these defaults, so they pass; anything else is refused
_UNSUPPORTED = {"echo": False, "logprobs": False, "top_logprobs": 0, "best_of": 1, "suffix": "", "logit_bias": {},
                "presence_penalty": 0, "frequency_penalty": 0, "tools": [], "functions": []}


def build_app(engine) -> Starlette:
    """The ASGI app serving `engine` (an AsyncLLM): engine.start() at startup, engine.shutdown() at shutdown."""
    if engine.tokenizer is None:
        raise FourbitError("serving needs the model's tokenizer: pass one (--tokenizer FILE, tokenizer.model or "
                           "tokenizer.json), or put it beside the checkpoint")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = Starlette(
        routes=[Route("/health", health), Route("/v1/models", list_models), Route("/v1/models/{model:path}", get_model),
                Route("/v1/completions", completions, methods=["POST"]),
                Route("/v1/chat/completions", chat_completions, methods=["POST"])],
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan)
    app.state.engine = engine
    app.state.created = int(time.time())
    return app


def serve(engine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", grace_s: float = 5.0):
    """Serve until Ctrl-C / SIGTERM. Then no new connections are accepted, requests in flight get grace_s seconds to
    finish before they are cancelled (and aborted in the engine), and the engine shuts down."""
    import uvicorn

    uvicorn.run(build_app(engine), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace_s)


# -- errors ----------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _ClientGone(APIError):
    def __init__(self):
        super().__init__(499, "the client closed the connection", code="client_closed_request")


async def _api_error(request, exc: APIError):
    return JSONResponse(exc.body(), exc.status, headers=exc.headers)


async def _http_error(request, exc: HTTPException):  # unknown routes (404), wrong methods (405)
    message = (f"no route {request.method} {request.url.path}: the API lives under /v1 (GET /v1/models, POST "
               f"/v1/completions, POST /v1/chat/completions)") if exc.status_code in (404, 405) else exc.detail
    error = APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)
    return JSONResponse(error.body(), exc.status_code, headers=exc.headers)


async def _server_error(request, exc: Exception):  # a bug: uvicorn logs the traceback after this response
    return JSONResponse(APIError(500, f"internal server error ({type(exc).__name__}): see the server log",
                                 type="server_error").body(), 500)


# -- endpoints -------------------------------------------------------------------------------------------------
async def health(request: Request):
    return JSONResponse({"status": "ok", "requests_in_flight": request.app.state.engine.num_in_flight})


def _model_card(app) -> dict:
    engine = app.state.engine
    return {"id": engine.model_name, "object": "model", "created": app.state.created, "owned_by": "fourbit",
            "max_model_len": engine.max_model_len}


async def list_models(request: Request):
    return JSONResponse({"object": "list", "data": [_model_card(request.app)]})


async def get_model(request: Request):
    _check_model(request.path_params["model"], request.app.state.engine)
    return JSONResponse(_model_card(request.app))


async def completions(request: Request):
    engine = request.app.state.engine
    body = await _json_body(request)
    _check_model(_get(body, "model", str), engine)
    job = _job(body, engine, _completion_prompt(body, engine), "prompt", "max_tokens", default_max=16)
    return await _respond(request, engine, job, _CompletionShape(engine.model_name, job.include_usage))


async def chat_completions(request: Request):
    engine = request.app.state.engine
    body = await _json_body(request)
    _check_model(_get(body, "model", str), engine)
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    job = _job(body, engine, _chat_prompt(body, engine), "messages", limit, default_max=None)
    return await _respond(request, engine, job, _ChatShape(engine.model_name, job.include_usage))


async def _respond(request: Request, engine, job: "_Job", shape: "_CompletionShape"):
    gen = _Generation(engine, job)
    try:
        # before any header goes out: a full queue or a rejected prompt must become a 503 / 400, not a broken stream
        await _unless_disconnected(request, gen.open)
        if job.stream:
            return _EventStream(_events(gen, shape), gen)
        text = await _unless_disconnected(request, gen.collect)
    except BaseException:
        await gen.aclose()
        raise
    await gen.aclose()
    return JSONResponse(shape.full(text, gen.finish_reason, gen.usage()))


async def _unless_disconnected(request: Request, fn):
    """await fn(), cancelled (which aborts the engine request) if the client disconnects first: _ClientGone."""
    gone, result, error = False, None, None
    async with anyio.create_task_group() as tg:
        async def watch():
            nonlocal gone
            # the body is read, so the next ASGI message is the disconnect (it never comes if the client waits)
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone = True
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result = await fn()
        except Exception as e:  # raised from inside the task group, anyio would wrap it in an ExceptionGroup
            error = e
        tg.cancel_scope.cancel()
    if gone:
        raise _ClientGone()
    if error is not None:
        raise error
    return result


# -- request parsing -------------------------------------------------------------------------------------------
@dataclass
class _Job:
    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "an array",
          dict: "an object"}


def _get(body: dict, name: str, kind: type, default=None):
    """body[name] checked to be of kind (null = absent = default); a wrong type is a 400 naming the field."""
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    if kind is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok:
        raise APIError(400, f"'{name}' must be {_KINDS[kind]}, got {json.dumps(v)[:60]}", param=name)
    return float(v) if kind is float else v


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}): send a JSON object") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _check_model(model: str | None, engine) -> None:
    if model is not None and model != engine.model_name:
        raise APIError(404, f"the model '{model}' does not exist: this server serves '{engine.model_name}' "
                            f"(GET /v1/models)", param="model", code="model_not_found")


def _completion_prompt(body: dict, engine) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        try:
            return engine.encode(prompt)  # BOS as LLM.generate adds it
        except FourbitError as e:  # e.g. a dummy model's id tokenizer given words
            raise APIError(400, str(e), param="prompt") from None
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
        raise APIError(400, f"'prompt' holds {len(prompt)} prompts; this server takes one per request: send one "
                            f"request per prompt (concurrent requests are batched together)", param="prompt")
    raise APIError(400, "'prompt' is required: a string, or a list of token ids (integers >= 0)", param="prompt")


def _chat_prompt(body: dict, engine) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' is required: a non-empty list of {\"role\": ..., \"content\": ...} objects",
                       param="messages")
    chat = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"{where} must be an object with a 'role' (one of {', '.join(ROLES)}) and a "
                                f"'content' string", param=where)
        chat.append({"role": m["role"], "content": _text_content(m.get("content"), f"{where}.content")})
    try:
        return engine.encode_chat(chat)
    except FourbitError as e:  # the template refused the chat (raise_exception), or jinja2 is missing
        raise APIError(400, str(e), param="messages") from None


def _text_content(content, where: str) -> str:
    if content is None:  # an assistant turn that only called tools
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(400, f"{where}[{j}] is a {kind!r} part; only text parts ({{\"type\": \"text\", "
                                    f"\"text\": ...}}) are supported", param=f"{where}[{j}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise APIError(400, f"{where} must be a string or a list of text parts", param=where)


def _job(body: dict, engine, prompt_ids: list[int], prompt_param: str, limit_param: str, default_max) -> _Job:
    for name, neutral in _UNSUPPORTED.items():
        v = body.get(name)
        if v is not None and not (v == neutral and isinstance(v, bool) == isinstance(neutral, bool)):
            raise APIError(400, f"'{name}' is not supported by this server: leave it out", param=name)
    if _get(body, "n", int, 1) != 1:
        raise APIError(400, "'n' must be 1 here: send several requests (with different seeds) for several choices",
                       param="n")
    temperature = _get(body, "temperature", float, 1.0)
    if temperature < 0:
        raise APIError(400, f"'temperature' must be >= 0 (0 = greedy), got {temperature}", param="temperature")
    top_p = _get(body, "top_p", float, 1.0)
    if not 0 < top_p <= 1:
        raise APIError(400, f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, "'stop' must be a non-empty string or a list of them", param="stop")
    options = _get(body, "stream_options", dict, {})
    include_usage = _get(options, "include_usage", bool, False)

    if not prompt_ids:
        raise APIError(400, "the prompt is empty: send some text, or at least one token id", param=prompt_param)
    n, context = len(prompt_ids), engine.max_model_len
    room = context - n  # the engine needs room for at least one new token
    if room < 1:
        raise APIError(400, f"the prompt has {n} tokens but this model's context is {context} tokens (prompt + "
                            f"output): shorten the prompt", param=prompt_param, code="context_length_exceeded")
    max_tokens = _get(body, limit_param, int)
    if max_tokens is None:
        max_tokens = room if default_max is None else min(default_max, room)
    elif max_tokens < 0:
        raise APIError(400, f"'{limit_param}' must be >= 0, got {max_tokens}", param=limit_param)
    elif max_tokens > room:
        raise APIError(400, f"the prompt ({n} tokens) plus {limit_param}={max_tokens} exceed this model's context of "
                            f"{context} tokens: ask for at most {room}", param=limit_param,
                       code="context_length_exceeded")
    params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            seed=_get(body, "seed", int), stop_at_eos=not _get(body, "ignore_eos", bool, False))
    return _Job(prompt_ids, params, stop, _get(body, "stream", bool, False), include_usage)


# -- generation as text ----------------------------------------------------------------------------------------
class _Generation:
    """One engine request seen as text deltas, stop strings applied. aclose() aborts it if it is still running."""

    def __init__(self, engine, job: _Job):
        self._outputs = engine.generate(job.prompt_ids, job.params)
        self._text = TextStream(engine.tokenizer, job.prompt_ids, job.stop)
        self.prompt_tokens, self.completion_tokens, self.cached_tokens = len(job.prompt_ids), 0, 0
        self.finish_reason: str | None = None
        self._first = None

    async def open(self) -> None:
        """Wait for the engine's first output: the engine raises its errors here, before anything is sent."""
        try:
            self._first = await anext(self._outputs)
        except QueueFull as e:
            raise APIError(503, f"the server is busy ({e})", code="queue_full", type="server_error",
                           headers={"Retry-After": "1"}) from None
        except EngineError as e:  # not the request's fault
            raise APIError(500, str(e), type="server_error") from None
        except FourbitError as e:
            raise APIError(400, str(e)) from None

    async def deltas(self):
        out, self._first = self._first, None
        while True:
            self.completion_tokens += len(out.new_tokens)
            self.cached_tokens = out.cached_tokens
            finish = out.finish_reason
            delta = self._text.add(out.new_tokens, final=finish is not None)
            if self._text.stopped:  # a stop string ended the text (the caller's aclose() then aborts the engine)
                finish = "stop"
            self.finish_reason = finish
            if delta:
                yield delta
            if finish is not None:
                return
            try:
                out = await anext(self._outputs)
            except FourbitError as e:  # after open(), only the engine itself fails
                raise APIError(500, f"the engine failed: {e}", type="server_error") from None

    async def collect(self) -> str:
        return "".join([d async for d in self.deltas()])

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    async def aclose(self) -> None:
        # shielded: this runs while the request is being cancelled, and the abort must still reach the engine
        with anyio.CancelScope(shield=True):
            await self._outputs.aclose()


# -- response bodies -------------------------------------------------------------------------------------------
class _CompletionShape:
    """The JSON of /v1/completions: one full response, or stream chunks."""
    object, prefix = "text_completion", "cmpl"

    def __init__(self, model: str, include_usage: bool):
        self.id, self.created, self.model = f"{self.prefix}-{uuid.uuid4().hex}", int(time.time()), model
        self.include_usage = include_usage

    def _wrap(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def _choice(self, text: str, finish: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def full(self, text: str, finish: str, usage: dict) -> dict:
        return self._wrap(self.object, [self._choice(text, finish)], usage=usage)

    def first(self) -> list[dict]:
        return []

    def chunk(self, text: str, finish: str | None = None) -> dict:
        # with include_usage, OpenAI sends "usage": null on every chunk but the last
        return self._wrap(self.object, [self._choice(text, finish)], **({"usage": None} if self.include_usage else {}))

    def usage_chunk(self, usage: dict) -> dict:
        return self._wrap(self.object, [], usage=usage)


class _ChatShape(_CompletionShape):
    object, prefix = "chat.completion", "chatcmpl"

    def full(self, text, finish, usage):
        return self._wrap(self.object, [{"index": 0, "message": {"role": "assistant", "content": text},
                                         "logprobs": None, "finish_reason": finish}], usage=usage)

    def first(self):  # the first chunk names the role
        return [self._delta({"role": "assistant", "content": ""}, None)]

    def chunk(self, text, finish=None):
        return self._delta({"content": text} if text else {}, finish)

    def _delta(self, delta, finish):
        return self._wrap("chat.completion.chunk", [{"index": 0, "delta": delta, "logprobs": None,
                                                     "finish_reason": finish}],
                          **({"usage": None} if self.include_usage else {}))

    def usage_chunk(self, usage):
        return self._wrap("chat.completion.chunk", [], usage=usage)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(gen: _Generation, shape: _CompletionShape):
    """Server-sent events: the text deltas, a last chunk with finish_reason, usage if asked, then [DONE]."""
    for chunk in shape.first():
        yield _sse(chunk)
    try:
        async for delta in gen.deltas():
            yield _sse(shape.chunk(delta))
    except APIError as e:  # the engine failed mid-request: the status is sent already, so say it in the stream
        yield _sse(e.body())
    else:
        yield _sse(shape.chunk("", gen.finish_reason))
        if shape.include_usage:
            yield _sse(shape.usage_chunk(gen.usage()))
    yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """text/event-stream whose engine request is aborted however the response ends: finished, client gone (Starlette
    cancels the stream), or cancelled at shutdown. A body iterator cancelled at a yield is not closed by Starlette,
    so the generation is closed here."""

    def __init__(self, events, gen: _Generation):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._gen = gen

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            await self._gen.aclose()
