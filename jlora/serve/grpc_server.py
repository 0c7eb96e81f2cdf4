"""The gRPC front end (`grpc.aio`): the `jlora.v1.Jlora` service, the standard health service and reflection.

A client's deadline becomes the request's engine deadline, and a cancelled RPC (deadline passed, client gone)
aborts its request, so its KV pages and adapter reference are freed at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jlora.serve import choices
from jlora.serve.async_engine import ServerClosedError
from jlora.serve.proto import jlora_pb2, jlora_pb2_grpc
from jlora.serve.protocol import check_output, error_message, error_status, prepare
from jlora.serve.security import AuthError, SecurityConfig, bearer
from jlora.serve.service import AdapterInfo, Service
from jlora.structured import StructuredOutput

log = logging.getLogger("jlora.serve.grpc")

MAX_RECEIVE_BYTES = 4 << 20  # a request: prompts of a few hundred thousand tokens at most
MAX_SEND_BYTES = 16 << 20
SERVICE_NAME = jlora_pb2.DESCRIPTOR.services_by_name["Jlora"].full_name
_SAMPLING_OPTIONAL = ("temperature", "top_p", "top_k", "max_tokens", "seed", "min_p", "presence_penalty",
                      "frequency_penalty", "repetition_penalty", "min_tokens", "n", "best_of")
ADMIN_METHODS = (f"/{SERVICE_NAME}/LoadAdapter", f"/{SERVICE_NAME}/UnloadAdapter")
WATCHDOG_POLL_S = 0.5


def _sampling_fields(sp: jlora_pb2.SamplingParams) -> dict:
    fields = {k: getattr(sp, k) for k in _SAMPLING_OPTIONAL if sp.HasField(k)}
    fields.update(stop=list(sp.stop), stop_token_ids=list(sp.stop_token_ids), ignore_eos=sp.ignore_eos,
                  logit_bias={str(k): v for k, v in sp.logit_bias.items()})
    return fields


def _structured(sp: jlora_pb2.SamplingParams) -> StructuredOutput | None:
    """The `structured` oneof: json_schema, json_object (true), regex or grammar; None when unset."""
    which = sp.WhichOneof("structured")
    if which is None or (which == "json_object" and not sp.json_object):
        return None
    return StructuredOutput("json_object") if which == "json_object" else StructuredOutput(which, getattr(sp, which))


class _Undecodable:
    """Stands for a request message that did not parse; the handler answers INVALID_ARGUMENT."""

    def __init__(self, error: Exception):
        self.error = error


def _decoding(deserializer):
    def decode(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, or invalid UTF-8 in a string field
            return _Undecodable(e)
    return decode


def _guarded(behavior, security: SecurityConfig, admin: bool, streams_out: bool):
    """`behavior` behind the API key check and the decode check."""

    async def refuse(request, context):
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request message does not decode: {str(request.error)[:200]}")
        metadata = dict((k.lower(), v) for k, v in context.invocation_metadata() or ())
        try:
            security.check_key(bearer(metadata.get("authorization")), admin)
        except AuthError as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))

    if streams_out:
        async def handler(request, context):
            await refuse(request, context)
            async for item in behavior(request, context):
                yield item
    else:
        async def handler(request, context):
            await refuse(request, context)
            return await behavior(request, context)
    return handler


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Every method of every service but health: the API key (the admin key for adapter load/unload) must come
    as `authorization: Bearer <key>` metadata, and a unary request message that does not decode is
    INVALID_ARGUMENT (gRPC would say UNKNOWN)."""

    def __init__(self, security: SecurityConfig):
        self.security = security

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(f"/{health.SERVICE_NAME}/"):
            return handler
        admin = details.method in ADMIN_METHODS
        kw = dict(request_deserializer=_decoding(handler.request_deserializer),
                  response_serializer=handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _guarded(handler.unary_unary, self.security, admin, False), **kw)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _guarded(handler.unary_stream, self.security, admin, True), **kw)
        if handler.stream_stream:  # reflection: the key only, checked once per call
            return grpc.stream_stream_rpc_method_handler(
                _keyed_stream(handler.stream_stream, self.security), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler


def _keyed_stream(behavior, security: SecurityConfig):
    async def handler(request_iterator, context):
        metadata = dict((k.lower(), v) for k, v in context.invocation_metadata() or ())
        try:
            security.check_key(bearer(metadata.get("authorization")), False)
        except AuthError as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        async for item in behavior(request_iterator, context):
            yield item
    return handler


def _logprobs(entries, ids=None) -> list[jlora_pb2.TokenLogprob]:
    """Engine logprob entries as messages; None entries (the prompt's first token) take their id from `ids`."""
    return [jlora_pb2.TokenLogprob(token_id=ids[i]) if e is None else jlora_pb2.TokenLogprob(
        token_id=e["token"], logprob=e["logprob"],
        top=[jlora_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in e["top"].items()])
        for i, e in enumerate(entries)]


def _adapter_info(a: AdapterInfo) -> jlora_pb2.AdapterInfo:
    return jlora_pb2.AdapterInfo(name=a.name, path=a.path, rank_bucket=a.rank_bucket)


class JloraServicer(jlora_pb2_grpc.JloraServicer):
    def __init__(self, service: Service):
        self.service = service

    async def _fail(self, context: grpc.aio.ServicerContext, error: BaseException):
        code, _, _ = error_status(error)
        if isinstance(error, ServerClosedError):  # expected while draining
            log.info("gRPC request refused: %s", error)
        elif code == "INTERNAL":
            log.error("gRPC request failed", exc_info=error)
        await context.abort(grpc.StatusCode[code], error_message(error))

    def _prepare(self, request: jlora_pb2.GenerateRequest):
        info, sp = self.service.info, request.sampling
        counts = {k: getattr(sp, k) if sp.HasField(k) else None for k in ("logprobs", "prompt_logprobs")}
        return prepare(info, _sampling_fields(sp), prompt=request.prompt or None,
                       token_ids=list(request.prompt_token_ids) or None,
                       messages=[{"role": m.role, "content": m.content} for m in request.messages] or None,
                       adapter=info.adapter_for(request.adapter, "adapter"),
                       zero_tokens_ok=counts["prompt_logprobs"] is not None, structured=_structured(sp), **counts)

    async def _start(self, request: jlora_pb2.GenerateRequest, context, stream: bool):
        """Validates and queues a request's choices; (their streams, the completion). Aborts the RPC with the
        error's code if it is refused."""
        try:
            completion = await self.service.prepare(self._prepare, request)
            choices.check_choices([completion], stream)
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            group, = await choices.start_choices(self.service, [completion], deadline=deadline)
            return group, completion
        except Exception as e:  # noqa: BLE001 - every refusal becomes a status code with its message
            await self._fail(context, e)

    async def Generate(self, request, context):
        started = time.perf_counter()
        streams, completion = await self._start(request, context, stream=False)
        error = None
        try:
            outs = await asyncio.gather(*(s.result() for s in streams))
            for out in outs:
                check_output(out)
        except Exception as e:  # noqa: BLE001
            error = e
        finally:
            for s in streams:
                s.abort()  # a no-op once finished; frees everything if the RPC was cancelled
        if error is not None:
            await self._fail(context, error)
        self.service.observe("grpc", started)
        sp, group = completion.sampling, choices.PromptGroup()
        picked = choices.best(outs, sp.n, group)  # keeps the first choice's prompt logprobs in `group`

        def lps(out):  # logprobs that best_of alone asked for are not shown
            return _logprobs(out.logprobs or []) if sp.logprobs is not None else []

        listed = [jlora_pb2.Choice(index=j, text=o.text, token_ids=o.token_ids, finish_reason=o.finish_reason,
                                   logprobs=lps(o), cumulative_logprob=o.cumulative_logprob)
                  for j, o in enumerate(picked)]
        top = picked[0]
        return jlora_pb2.GenerateResponse(
            request_id=top.request_id, text=top.text, token_ids=top.token_ids, finish_reason=top.finish_reason,
            usage=jlora_pb2.Usage(prompt_tokens=len(top.prompt_token_ids),
                                  completion_tokens=sum(len(o.token_ids) for o in picked)),
            logprobs=lps(top), cumulative_logprob=top.cumulative_logprob, choices=listed,
            prompt_logprobs=_logprobs(group.prompt_logprobs or [], top.prompt_token_ids))

    async def GenerateStream(self, request, context):
        started = time.perf_counter()
        streams, _ = await self._start(request, context, stream=True)
        sent, sent_lp, opened = [0] * len(streams), [0] * len(streams), set()
        try:
            async for k, out in choices.merged(streams):
                error = None
                try:
                    check_output(out)
                except Exception as e:  # noqa: BLE001
                    error = e
                if error is not None:
                    await self._fail(context, error)
                msg = jlora_pb2.GenerateStreamResponse(request_id=out.request_id, text=out.delta,
                                                       token_ids=out.token_ids[sent[k]:], finished=out.finished,
                                                       logprobs=_logprobs((out.logprobs or [])[sent_lp[k]:]),
                                                       index=k)
                if k not in opened and out.prompt_logprobs:
                    msg.prompt_logprobs.extend(_logprobs(out.prompt_logprobs, out.prompt_token_ids))
                opened.add(k)
                sent[k], sent_lp[k] = len(out.token_ids), len(out.logprobs or [])
                if out.finished:
                    msg.finish_reason = out.finish_reason
                    msg.usage.prompt_tokens = len(out.prompt_token_ids)
                    msg.usage.completion_tokens = len(out.token_ids)
                yield msg
        finally:
            for s in streams:
                s.abort()
        self.service.observe("grpc_stream", started)

    async def ListAdapters(self, request, context):
        try:
            adapters = await self.service.list_adapters()
        except Exception as e:  # noqa: BLE001
            await self._fail(context, e)
        return jlora_pb2.ListAdaptersResponse(base_model=self.service.info.name,
                                              adapters=[_adapter_info(a) for a in adapters])

    async def LoadAdapter(self, request, context):
        try:
            adapter = await self.service.load_adapter(request.name, request.path)
        except Exception as e:  # noqa: BLE001
            await self._fail(context, e)
        return jlora_pb2.LoadAdapterResponse(adapter=_adapter_info(adapter))

    async def UnloadAdapter(self, request, context):
        try:
            now = await self.service.unload_adapter(request.name)
        except Exception as e:  # noqa: BLE001
            await self._fail(context, e)
        return jlora_pb2.UnloadAdapterResponse(unloaded_now=now)


class GrpcServer:
    """A `grpc.aio` server on `host:port` (port 0 picks a free one; `port` holds the bound one after `start`)."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0,
                 security: SecurityConfig | None = None):
        self.service = service
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                                               ("grpc.max_send_message_length", MAX_SEND_BYTES)],
                                      interceptors=[GuardInterceptor(security or SecurityConfig())])
        self._watchdog: asyncio.Task | None = None
        jlora_pb2_grpc.add_JloraServicer_to_server(JloraServicer(service), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.server)
        try:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError(f"the gRPC server could not listen on {host}:{port} (is the port in use?)")

    async def start(self) -> None:
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._watchdog = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        """Mirrors `AsyncEngine.health` into the health service: NOT_SERVING while a step hangs or the engine
        thread is gone, SERVING again once it recovers (after a graceful shutdown the service ignores sets)."""
        serving = True
        while True:
            ok, _ = self.service.engine.health()
            if ok != serving:
                serving = ok
                status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
                for name in ("", SERVICE_NAME):
                    await self.health.set(name, status)
            await asyncio.sleep(WATCHDOG_POLL_S)

    async def stop(self, grace: float) -> None:
        """Reports NOT_SERVING, then lets RPCs in flight finish for up to `grace` seconds."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
