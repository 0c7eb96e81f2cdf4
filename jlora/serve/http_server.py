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
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jlora.errors import JloraError, RequestError
from jlora.serve import openai_format as oai
from jlora.serve.async_engine import RequestStream
from jlora.serve.metrics import CONTENT_TYPE
from jlora.serve.protocol import (TooLargeError, check_output, error_message, error_status, prepare,
                                  render_chat)
from jlora.serve.service import Service

log = logging.getLogger("jlora.serve.http")

MAX_BODY_BYTES = 4 << 20
DISCONNECT_POLL_S = 0.25


async def _json_body(request: Request) -> dict:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise TooLargeError(f"request body of {size} bytes is above the limit of {MAX_BODY_BYTES}")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise TooLargeError(f"request body of {len(raw)} bytes is above the limit of {MAX_BODY_BYTES}")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
    return body


async def _final(request: Request, stream: RequestStream):
    """The request's final output; aborts it if the client disconnects first."""
    task = asyncio.ensure_future(stream.result())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                stream.abort()
        return task.result()
    finally:
        task.cancel()
        stream.abort()


async def _events(stream: RequestStream, make_events) -> AsyncIterator[bytes]:
    """SSE bytes of a stream's outputs, `data: [DONE]` last; an error mid-stream becomes an error event."""
    try:
        async for out in stream:
            try:
                check_output(out)
            except Exception as e:  # noqa: BLE001 - the status line is sent already: report in the stream
                _, status, kind = error_status(e)
                yield oai.sse(oai.error_body(error_message(e), kind, status))
                break
            for event in make_events(out):
                yield oai.sse(event)
        yield oai.sse("[DONE]")
    finally:
        stream.abort()  # a no-op once finished; frees the request if the client went away


def build_app(service: Service) -> FastAPI:
    """The FastAPI application over `service`."""
    app = FastAPI(title="jlora", docs_url=None, redoc_url=None, openapi_url=None)
    info = service.info

    @app.exception_handler(JloraError)
    async def _refused(request: Request, error: JloraError):
        _, status, kind = error_status(error)
        if status >= 500:
            log.error("HTTP %s %s failed", request.method, request.url.path, exc_info=error)
        return JSONResponse(oai.error_body(error_message(error), kind, status), status_code=status)

    @app.exception_handler(StarletteHTTPException)  # unknown routes, wrong methods
    async def _http_error(request: Request, error: StarletteHTTPException):
        message = f"{error.detail}: {request.method} {request.url.path}"
        return JSONResponse(oai.error_body(message, "invalid_request_error", error.status_code),
                            status_code=error.status_code)

    @app.exception_handler(Exception)  # a bug: Starlette logs the traceback after this response
    async def _internal(request: Request, error: Exception):
        return JSONResponse(oai.error_body(error_message(error), "internal_error", 500), status_code=500)

    @app.get("/health")
    async def health():
        ok = service.engine.accepting
        return JSONResponse({"status": "ok" if ok else "draining"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [{"id": info.name, "object": "model", "created": created, "owned_by": "jlora", "root": info.name,
                 "parent": None, "max_model_len": info.max_model_len}]
        data += [{"id": a.name, "object": "model", "created": created, "owned_by": "jlora", "root": a.path,
                  "parent": info.name, "rank_bucket": a.rank_bucket} for a in await service.list_adapters()]
        return {"object": "list", "data": data}

    async def _openai(request: Request, chat: bool):
        started = time.perf_counter()
        body = await _json_body(request)
        oai.check_supported(body)
        model = body.get("model") or info.name
        fields = dict(body)
        if chat:
            if fields.get("max_tokens") is None:
                fields["max_tokens"] = body.get("max_completion_tokens")
            completion = prepare(info, fields, prompt=render_chat(info, body.get("messages")),
                                 default_max_tokens=None, adapter=info.adapter_for(model))
        else:
            text, ids = oai.completion_prompt(body)
            completion = prepare(info, fields, prompt=text, token_ids=ids, adapter=info.adapter_for(model))
        stream = await service.start(completion)
        if not body.get("stream"):
            out = await _final(request, stream)
            check_output(out)
            service.observe("chat" if chat else "completions", started)
            return (oai.chat_body if chat else oai.completion_body)(out, model)
        created, include_usage = int(time.time()), bool((body.get("stream_options") or {}).get("include_usage"))
        first = [True]

        def events(out):
            if chat:
                yield oai.chat_chunk(out, model, created, first[0])
                first[0] = False
            else:
                yield oai.completion_chunk(out, model, created)
            if out.finished:
                service.observe("chat_stream" if chat else "completions_stream", started)
                if include_usage:
                    yield oai.usage_chunk(out, model, created, chat)

        return StreamingResponse(_events(stream, events), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _openai(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _openai(request, chat=True)

    @app.post("/generate")
    async def generate(request: Request):
        """SGLang-style: {"text" | "input_ids", "sampling_params": {..., "lora_path"}, "stream"}."""
        started = time.perf_counter()
        body = await _json_body(request)
        params = body.get("sampling_params") or {}
        if not isinstance(params, dict):
            raise RequestError(f"sampling_params must be an object, got {params!r}")
        adapter = await _adapter_of_lora_path(params.get("lora_path", body.get("lora_path")))
        completion = prepare(info, params, prompt=body.get("text"), token_ids=body.get("input_ids"),
                             adapter=adapter, max_tokens_key="max_new_tokens")
        stream = await service.start(completion)

        def result(out):
            return {"text": out.text, "output_ids": out.token_ids,
                    "meta_info": {"id": out.request_id, "prompt_tokens": len(out.prompt_token_ids),
                                  "completion_tokens": len(out.token_ids),
                                  "finish_reason": {"type": out.finish_reason} if out.finished else None,
                                  "e2e_latency": time.perf_counter() - started}}

        if body.get("stream"):
            return StreamingResponse(_events(stream, lambda out: [result(out)]), media_type="text/event-stream")
        out = await _final(request, stream)
        check_output(out)
        service.observe("generate", started)
        return result(out)

    async def _adapter_of_lora_path(value):
        """`lora_path` names a loaded adapter, by name or by its directory."""
        if value is None or value == "":
            return None
        adapter = info.adapter_for(value, "lora_path")
        if adapter is not None and isinstance(value, str) and os.sep in value:
            real = os.path.realpath(value)
            adapter = next((a.name for a in await service.list_adapters() if a.path == real), adapter)
        return adapter

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        body = await _json_body(request)
        a = await service.load_adapter(body.get("lora_name"), body.get("lora_path"))
        return {"status": "ok", "name": a.name, "path": a.path, "rank_bucket": a.rank_bucket}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        body = await _json_body(request)
        now = await service.unload_adapter(body.get("lora_name"))
        return {"status": "ok", "name": body["lora_name"], "unloaded_now": now}

    return app


class HttpServer:
    """uvicorn serving `build_app(service)` on an already bound socket (port 0 picks a free one)."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0):
        self.socket = socket.create_server((host, port), reuse_port=False)
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(build_app(service), log_level="warning", access_log=False,
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
