"""The engine thread never dies, and health (HTTP and gRPC) turns unhealthy while a step hangs."""

import contextlib
import threading
import time

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jlora.serve.proto import jlora_pb2 as pb
from jlora.serve.proto import jlora_pb2_grpc as pb_grpc

GREEDY = pb.SamplingParams(temperature=0, max_tokens=6)


@contextlib.contextmanager
def patched_step(served, step):
    """Replaces the served engine's `step` (on its own thread, between steps) and restores it."""
    engine = served.service.engine
    original = engine.engine.step
    engine.call(lambda e: setattr(e, "step", step(original))).result(timeout=30)
    try:
        yield
    finally:
        engine.call(lambda e: e.__dict__.pop("step", None)).result(timeout=60)


def test_a_step_that_raises_fails_its_requests_and_the_thread_lives_on(served):
    raised = threading.Event()

    def once(original):
        def step():
            if not raised.is_set():
                raised.set()
                raise RuntimeError("a bug in the step")
            return original()
        return step

    with grpc.insecure_channel(served.grpc_target) as ch:
        stub = pb_grpc.JloraStub(ch)
        with patched_step(served, once):
            try:
                stub.Generate(pb.GenerateRequest(prompt="hi", sampling=GREEDY), timeout=60)
                raise AssertionError("the request in the failed step succeeded")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INTERNAL and "RuntimeError: a bug in the step" in e.details()
        assert raised.is_set() and served.service.engine._thread.is_alive()
        out = stub.Generate(pb.GenerateRequest(prompt="hi", sampling=GREEDY), timeout=60)
        assert out.finish_reason in ("stop", "length") and len(out.token_ids) >= 1
    assert served.service.engine.health() == (True, "ok")
    served.wait_idle()


def test_a_hanging_step_turns_health_unhealthy_until_it_returns(served):
    engine = served.service.engine
    release = threading.Event()

    def hang(original):
        def step():
            release.wait(30)
            return original()
        return step

    limit = engine.step_timeout_s
    engine.step_timeout_s = 0.3
    try:
        with grpc.insecure_channel(served.grpc_target) as ch, \
                httpx.Client(base_url=served.http_url, timeout=30) as http:
            health = health_pb2_grpc.HealthStub(ch)
            stub = pb_grpc.JloraStub(ch)
            with patched_step(served, hang):
                call = stub.Generate.future(pb.GenerateRequest(prompt="hi", sampling=GREEDY), timeout=60)
                end = time.monotonic() + 20
                while engine.health()[0] and time.monotonic() < end:
                    time.sleep(0.05)
                r = http.get("/health")
                assert r.status_code == 503 and "engine step has run for" in r.json()["status"], r.text
                end = time.monotonic() + 10  # the gRPC watchdog polls twice a second
                while time.monotonic() < end:
                    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                    if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
                    time.sleep(0.1)
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
                release.set()
                assert call.result().finish_reason in ("stop", "length")
            end = time.monotonic() + 10
            while time.monotonic() < end:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                time.sleep(0.1)
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert http.get("/health").json() == {"status": "ok"}
    finally:
        release.set()
        engine.step_timeout_s = limit
    served.wait_idle()
