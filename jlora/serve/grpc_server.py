"""The gRPC front end (`grpc.aio`): the `jlora.v1.Jlora` service, the standard health service and reflection.

A client's deadline becomes the request's engine deadline, and a cancelled RPC (deadline passed, client gone)
aborts its request, so its KV pages and adapter reference are freed at once.
"""

from __future__ import annotations

import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jlora.serve.proto import jlora_pb2, jlora_pb2_grpc
from jlora.serve.protocol import check_output, error_message, error_status, prepare
from jlora.serve.service import AdapterInfo, Service

log = logging.getLogger("jlora.serve.grpc")

MAX_RECEIVE_BYTES = 4 << 20  # a request: prompts of a few hundred thousand tokens at most
MAX_SEND_BYTES = 16 << 20
SERVICE_NAME = jlora_pb2.DESCRIPTOR.services_by_name["Jlora"].full_name
_SAMPLING_OPTIONAL = ("temperature", "top_p", "top_k", "max_tokens", "seed")


def _sampling_fields(sp: jlora_pb2.SamplingParams) -> dict:
    fields = {k: getattr(sp, k) for k in _SAMPLING_OPTIONAL if sp.HasField(k)}
    fields.update(stop=list(sp.stop), stop_token_ids=list(sp.stop_token_ids), ignore_eos=sp.ignore_eos)
    return fields


def _adapter_info(a: AdapterInfo) -> jlora_pb2.AdapterInfo:
    return jlora_pb2.AdapterInfo(name=a.name, path=a.path, rank_bucket=a.rank_bucket)


class JloraServicer(jlora_pb2_grpc.JloraServicer):
    def __init__(self, service: Service):
        self.service = service

    async def _fail(self, context: grpc.aio.ServicerContext, error: BaseException):
        code, _, _ = error_status(error)
        if code == "INTERNAL":
            log.error("gRPC request failed", exc_info=error)
        await context.abort(grpc.StatusCode[code], error_message(error))

    async def _start(self, request: jlora_pb2.GenerateRequest, context):
        """Validates and queues a request; aborts the RPC with the error's code if it is refused."""
        info = self.service.info
        try:
            completion = prepare(info, _sampling_fields(request.sampling), prompt=request.prompt or None,
                                 token_ids=list(request.prompt_token_ids) or None,
                                 messages=[{"role": m.role, "content": m.content} for m in request.messages] or None,
                                 adapter=info.adapter_for(request.adapter, "adapter"))
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            return await self.service.start(completion, deadline=deadline)
        except Exception as e:  # noqa: BLE001 - every refusal becomes a status code with its message
            await self._fail(context, e)

    async def Generate(self, request, context):
        started = time.perf_counter()
        stream = await self._start(request, context)
        error = None
        try:
            out = await stream.result()
            check_output(out)
        except Exception as e:  # noqa: BLE001
            error = e
        finally:
            stream.abort()  # a no-op once finished; frees everything if the RPC was cancelled
        if error is not None:
            await self._fail(context, error)
        self.service.observe("grpc", started)
        return jlora_pb2.GenerateResponse(
            request_id=out.request_id, text=out.text, token_ids=out.token_ids, finish_reason=out.finish_reason,
            usage=jlora_pb2.Usage(prompt_tokens=len(out.prompt_token_ids), completion_tokens=len(out.token_ids)))

    async def GenerateStream(self, request, context):
        started = time.perf_counter()
        stream = await self._start(request, context)
        sent = 0
        try:
            async for out in stream:
                error = None
                try:
                    check_output(out)
                except Exception as e:  # noqa: BLE001
                    error = e
                if error is not None:
                    await self._fail(context, error)
                msg = jlora_pb2.GenerateStreamResponse(request_id=out.request_id, text=out.delta,
                                                       token_ids=out.token_ids[sent:], finished=out.finished)
                sent = len(out.token_ids)
                if out.finished:
                    msg.finish_reason = out.finish_reason
                    msg.usage.prompt_tokens = len(out.prompt_token_ids)
                    msg.usage.completion_tokens = len(out.token_ids)
                yield msg
        finally:
            stream.abort()
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

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0):
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                                               ("grpc.max_send_message_length", MAX_SEND_BYTES)])
        jlora_pb2_grpc.add_JloraServicer_to_server(JloraServicer(service), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"gRPC server could not bind {host}:{port}")

    async def start(self) -> None:
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        """Reports NOT_SERVING, then lets RPCs in flight finish for up to `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
