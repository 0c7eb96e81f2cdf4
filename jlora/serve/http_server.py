"""The HTTP front end (FastAPI on uvicorn): OpenAI-compatible completions and chat with SSE streaming,
SGLang-style `/generate`, vLLM-style adapter loading, `/health` and Prometheus `/metrics`.

Every error is a JSON body `{"error": {"message", "type", "code"}}` with the status from `protocol.ERROR_TABLE`.
A client that disconnects, from a stream or while waiting, has its request aborted and its pages freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from typing import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jlora.errors import JloraError, RequestError
from jlora.serve import choices, structured_fields
from jlora.serve import openai_format as oai
from jlora.serve.async_engine import RequestStream, ServerClosedError
from jlora.serve.metrics import CONTENT_TYPE
from jlora.serve.protocol import (TooLargeError, UnsupportedMediaError, check_output, error_message,
                                  error_status, prepare, render_chat, show)
from jlora.serve.security import ForbiddenError, SecurityConfig, bearer
from jlora.serve.service import Service

log = logging.getLogger("jlora.serve.http")

MAX_BODY_BYTES = 4 << 20
MAX_INT_DIGITS = 64  # JSON integer literals longer than this are refused before Python converts them
DISCONNECT_POLL_S = 0.25
ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
OPEN_PATHS = ("/health",)


def _parse_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise RequestError(f"an integer literal of {len(text)} digits is out of range")
    return int(text)


def _no_constant(name: str):
    raise RequestError(f"{name} is not valid JSON")


async def _json_body(request: Request) -> dict:
    """The body as a JSON object, counted while it is read (a chunked body has no length to check first)."""
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
        raise TooLargeError(f"request body of {size[:20]} bytes is above the limit of {MAX_BODY_BYTES}")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > MAX_BODY_BYTES:
            raise TooLargeError(f"request body is above the limit of {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks), parse_int=_parse_int, parse_constant=_no_constant)
    except RecursionError:
        raise RequestError("malformed JSON body: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise RequestError(f"malformed JSON body: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
    return body


def _error(message: str, kind: str, status: int) -> Response:
    """An OpenAI-style error body, ASCII-escaped (a client's lone surrogate in a message cannot break it)."""
    return Response(json.dumps(oai.error_body(message, kind, status)), status_code=status,
                    media_type="application/json")


class Guard:
    """ASGI middleware in front of every route: the Host name, then the API key, then (for callers without a
    key) the browser cross-origin check; adapter loads and unloads need a JSON body, which a browser cannot
    send cross-origin without a preflight this server never grants."""

    def __init__(self, app, security: SecurityConfig):
        self.app, self.security = app, security

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.decode("latin-1").lower(), []).append(v.decode("latin-1"))
        one = {k: v[0] for k, v in headers.items()}
        path, method, sec = scope["path"], scope["method"], self.security
        try:
            if len(headers.get("host", [])) != 1 or not sec.host_allowed(one["host"]):
                raise ForbiddenError("the Host header names no host this server answers to (see --allowed-hosts)")
            if path not in OPEN_PATHS:
                admin = path in ADMIN_PATHS
                keyed = sec.check_key(bearer(one.get("authorization")), admin)
                if not keyed:
                    sec.check_browser(method, one)
                if admin and method == "POST" and \
                        one.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                    raise UnsupportedMediaError("adapter loads and unloads take a JSON body "
                                                "(Content-Type: application/json)")
        except JloraError as e:
            _, status, kind = error_status(e)
            return await _error(error_message(e), kind, status)(scope, receive, send)
        return await self.app(scope, receive, send)


async def _finals(request: Request, streams: list[RequestStream]) -> list:
    """The final outputs of `streams`; aborts them all if the client disconnects first."""
    task = asyncio.ensure_future(asyncio.gather(*(s.result() for s in streams)))
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                for stream in streams:
                    stream.abort()
        return task.result()
    finally:
        task.cancel()
        for stream in streams:
            stream.abort()


async def _events(items: AsyncIterator, make_events, close) -> AsyncIterator[bytes]:
    """SSE bytes of (choice, output) items, `data: [DONE]` last; an error mid-stream becomes an error event.
    `close()` runs at the end: a no-op once finished, it frees the requests if the client went away."""
    try:
        async for k, out in items:
            try:
                check_output(out)
            except Exception as e:  # noqa: BLE001 - the status line is sent already: report in the stream
                _, status, kind = error_status(e)
                yield oai.sse(oai.error_body(error_message(e), kind, status))
                break
            for event in make_events(k, out):
                yield oai.sse(event)
        yield oai.sse("[DONE]")
    finally:
        await close()


async def _one(stream: RequestStream):
    async for out in stream:
        yield 0, out


def build_app(service: Service, security: SecurityConfig = SecurityConfig()) -> FastAPI:
    """The FastAPI application over `service`, behind `Guard(security)`."""
    app = FastAPI(title="jlora", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, security=security)
    info = service.info

    @app.exception_handler(JloraError)
    async def _refused(request: Request, error: JloraError):
        _, status, kind = error_status(error)
        if isinstance(error, ServerClosedError):  # expected while draining
            log.info("HTTP %s %s refused: %s", request.method, request.url.path, error)
        elif status >= 500:
            log.error("HTTP %s %s failed", request.method, request.url.path, exc_info=error)
        return _error(error_message(error), kind, status)

    @app.exception_handler(StarletteHTTPException)  # unknown routes, wrong methods
    async def _http_error(request: Request, error: StarletteHTTPException):
        message = f"{error.detail}: {request.method} {show(request.url.path)[1:-1]}"
        return _error(message, "invalid_request_error", error.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        return _error("malformed request", "invalid_request_error", 400)

    @app.exception_handler(Exception)  # a bug: Starlette logs the traceback after this response
    async def _internal(request: Request, error: Exception):
        return _error(error_message(error), "internal_error", 500)

    @app.get("/health")
    async def health():
        ok, status = service.engine.health()
        return JSONResponse({"status": status}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [{"id": info.name, "object": "model", "created": created, "owned_by": "jlora", "root": info.name,
                 "parent": None, "max_model_len": info.max_model_len}]
        data += [{"id": a.name, "object": "model", "created": created, "owned_by": "jlora", "root": a.name,
                  "parent": info.name, "rank_bucket": a.rank_bucket} for a in await service.list_adapters()]
        return {"object": "list", "data": data}

    def _prepare_openai(body: dict, chat: bool):
        """Checks and tokenizes an OpenAI body (on the prepare pool): (completions, one per prompt; their
        prompt groups; what the body wants to see; model)."""
        oai.check_supported(body)
        want = choices.wants(body, chat)
        model = body.get("model") or info.name
        fields = dict(body)
        counts = dict(logprobs=want.logprobs, prompt_logprobs=want.prompt_logprobs,
                      structured=structured_fields.openai(body))
        if chat:
            if fields.get("max_tokens") is None:
                fields["max_tokens"] = body.get("max_completion_tokens")
            completions = [prepare(info, fields, prompt=render_chat(info, body.get("messages")),
                                   default_max_tokens=None, adapter=info.adapter_for(model), **counts)]
            groups = [choices.PromptGroup()]
        else:
            prompts = oai.completion_prompts(body)
            completions = [prepare(info, fields, prompt=text, token_ids=ids, adapter=info.adapter_for(model),
                                   zero_tokens_ok=want.echo, **counts) for text, ids in prompts]
            groups = [choices.PromptGroup(text if text is not None or info.tokenizer is None
                                          else info.tokenizer.decode(ids)) for text, ids in prompts]
        choices.check_choices(completions, bool(body.get("stream")))
        return completions, groups, want, model

    async def _openai(request: Request, chat: bool):
        started = time.perf_counter()
        body = await _json_body(request)
        completions, groups, want, model = await service.prepare(_prepare_openai, body, chat)
        prompt_tokens = sum(len(c.prompt_ids) for c in completions)
        n = completions[0].sampling.n
        started_groups = await choices.start_choices(service, completions)
        streams = [s for g in started_groups for s in g]
        if not body.get("stream"):
            outs = await _finals(request, streams)
            for out in outs:
                check_output(out)
            picked, views, k = [], [], 0
            for i, (group, prompt_group) in enumerate(zip(started_groups, groups)):
                mine = outs[k:k + len(group)]
                k += len(group)
                for j, out in enumerate(choices.best(mine, n, prompt_group)):
                    picked.append(out)
                    views.append(choices.ChoiceView(i * n + j, want, info.tokenizer, prompt_group))
            service.observe("chat" if chat else "completions", started)
            return choices.body(picked, views, model, chat, prompt_tokens)
        created, include_usage = int(time.time()), bool((body.get("stream_options") or {}).get("include_usage"))
        views = [choices.ChoiceView(k, want, info.tokenizer, groups[k // n]) for k in range(len(streams))]
        rid, finals = streams[0].request_id, {}

        def events(k, out):
            yield choices.chunk(out, views[k], rid, model, created)
            if out.finished:
                finals[k] = out
                if len(finals) == len(streams):
                    service.observe("chat_stream" if chat else "completions_stream", started)
                    if include_usage:
                        yield choices.usage_chunk(list(finals.values()), rid, model, created, chat, prompt_tokens)

        async def close():
            for stream in streams:
                stream.abort()

        return StreamingResponse(_events(choices.merged(streams), events, close), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _openai(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _openai(request, chat=True)

    @app.post("/generate")
    async def generate(request: Request):
        """SGLang-style: {"text" | "input_ids", "sampling_params": {..., "lora_path", "regex" | "json_schema" |
        "ebnf"}, "stream"}."""
        started = time.perf_counter()
        body = await _json_body(request)
        params = body.get("sampling_params") or {}
        if not isinstance(params, dict):
            raise RequestError(f"sampling_params must be an object, got {params!r}")
        for key in ("n", "best_of"):
            if params.get(key) not in (None, 1):
                raise RequestError(f"{key}={show(params[key])} is not supported on /generate (one completion a "
                                   "request); /v1/completions takes it")
        adapter = await _adapter_of_lora_path(params.get("lora_path", body.get("lora_path")))
        completion = await service.prepare(prepare, info, params, prompt=body.get("text"),
                                           token_ids=body.get("input_ids"), adapter=adapter,
                                           max_tokens_key="max_new_tokens", min_tokens_key="min_new_tokens",
                                           structured=structured_fields.generate(params))
        stream = await service.start(completion)

        def result(out):
            return {"text": out.text, "output_ids": out.token_ids,
                    "meta_info": {"id": out.request_id, "prompt_tokens": len(out.prompt_token_ids),
                                  "completion_tokens": len(out.token_ids),
                                  "finish_reason": {"type": out.finish_reason} if out.finished else None,
                                  "e2e_latency": time.perf_counter() - started}}

        if body.get("stream"):
            async def close():
                stream.abort()

            return StreamingResponse(_events(_one(stream), lambda k, out: [result(out)], close),
                                     media_type="text/event-stream")
        out, = await _finals(request, [stream])
        check_output(out)
        service.observe("generate", started)
        return result(out)

    async def _adapter_of_lora_path(value):
        """`lora_path` names a loaded adapter, by name or by its directory."""
        if value is None or value == "":
            return None
        adapter = info.adapter_for(value, "lora_path")
        if adapter is not None and os.sep in adapter and "\0" not in adapter:
            adapter = await service.find_adapter_by_path(adapter) or adapter
        return adapter

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        body = await _json_body(request)
        a = await service.load_adapter(body.get("lora_name"), body.get("lora_path"))
        return {"status": "ok", "name": a.name, "path": a.path, "rank_bucket": a.rank_bucket}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        body = await _json_body(request)
        name = body.get("lora_name")
        now = await service.unload_adapter(name)
        return {"status": "ok", "name": name, "unloaded_now": now}

    return app


class HttpServer:
    """uvicorn serving `build_app(service)` on an already bound socket (port 0 picks a free one)."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0,
                 security: SecurityConfig | None = None):
        try:
            self.socket = socket.create_server((host, port), reuse_port=False)
        except OSError as e:
            raise OSError(f"the HTTP server could not listen on {host}:{port}: {e.strerror}") from None
        self.port = self.socket.getsockname()[1]
        security = security or SecurityConfig.for_bind(host)
        config = uvicorn.Config(build_app(service, security), log_level="warning", access_log=False,
                                timeout_graceful_shutdown=30, lifespan="off")
        self.server = uvicorn.Server(config)
        self.server.capture_signals = contextlib.nullcontext  # the serving process owns SIGTERM and SIGINT
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self.server.serve(sockets=[self.socket]))
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises the start-up error
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stops listening and waits for open responses to finish."""
        self.server.should_exit = True
        if self._task is not None:
            await self._task
