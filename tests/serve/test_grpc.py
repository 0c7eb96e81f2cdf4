"""Every RPC through the generated client; every bad input gets its status code and says what was wrong."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serve_helpers import steps_wait_for_a_command

from jlora.serve.proto import jlora_pb2 as pb
from jlora.serve.proto import jlora_pb2_grpc as pb_grpc

GREEDY = pb.SamplingParams(temperature=0, max_tokens=6)


@pytest.fixture(scope="module")
def channel(served):
    with grpc.insecure_channel(served.grpc_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.JloraStub(channel)


def still_serves(stub, served):
    out = stub.Generate(pb.GenerateRequest(prompt="ok", adapter="alpha", sampling=GREEDY), timeout=60)
    assert out.finish_reason in ("stop", "length") and out.usage.prompt_tokens == 2
    served.wait_idle()


def test_generate_and_stream_agree(stub, served):
    req = pb.GenerateRequest(prompt="hello there", adapter="beta", sampling=GREEDY)
    full = stub.Generate(req, timeout=60)
    assert full.finish_reason in ("stop", "length") and full.usage.completion_tokens == len(full.token_ids) >= 1
    parts = list(stub.GenerateStream(req, timeout=60))
    assert parts[-1].finished and parts[-1].finish_reason == full.finish_reason
    assert not any(p.finished for p in parts[:-1])
    assert "".join(p.text for p in parts) == full.text
    assert [t for p in parts for t in p.token_ids] == list(full.token_ids)
    assert parts[-1].usage.completion_tokens == full.usage.completion_tokens


def test_prompt_token_ids_and_chat_messages(stub):
    by_ids = stub.Generate(pb.GenerateRequest(prompt_token_ids=[5, 6, 7], sampling=GREEDY), timeout=60)
    assert by_ids.usage.prompt_tokens == 3
    chat = stub.Generate(pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")], adapter="gamma",
                                            sampling=GREEDY), timeout=60)
    assert chat.usage.prompt_tokens > 2


def test_adapters_adapter_outputs_differ_from_base(stub):
    outs = {a: stub.Generate(pb.GenerateRequest(prompt="hello there", adapter=a, sampling=GREEDY), timeout=60)
            for a in ("", "alpha", "gamma")}
    assert len({tuple(o.token_ids) for o in outs.values()}) == 3


def test_list_load_unload(stub, served):
    listed = stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30)
    assert listed.base_model == "tiny"
    assert {a.name: a.rank_bucket for a in listed.adapters} == {"alpha": 8, "beta": 8, "gamma": 16}
    loaded = stub.LoadAdapter(pb.LoadAdapterRequest(name="spare-grpc", path=served.spare), timeout=30)
    assert loaded.adapter.name == "spare-grpc" and loaded.adapter.rank_bucket == 8
    assert stub.Generate(pb.GenerateRequest(prompt="hi", adapter="spare-grpc", sampling=GREEDY), timeout=60).text \
        is not None
    assert stub.UnloadAdapter(pb.UnloadAdapterRequest(name="spare-grpc"), timeout=30).unloaded_now
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(pb.GenerateRequest(prompt="hi", adapter="spare-grpc", sampling=GREEDY), timeout=60)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        stub.UnloadAdapter(pb.UnloadAdapterRequest(name="spare-grpc"), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "'spare-grpc' is not loaded" in e.value.details()


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "jlora.v1.Jlora"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10))
    names = {s.name for s in reply.list_services_response.service}
    assert {"jlora.v1.Jlora", "grpc.health.v1.Health"} <= names


BAD_REQUESTS = [
    (dict(prompt="hi", adapter="nope"), grpc.StatusCode.NOT_FOUND, "adapter 'nope' is not loaded"),
    (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    (dict(prompt="x" * 300), grpc.StatusCode.INVALID_ARGUMENT, "prompt of 300 tokens is too long"),
    (dict(prompt="hi", sampling=pb.SamplingParams(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT,
     "temperature must be a finite number in [0, 10000]"),
    (dict(prompt="hi", sampling=pb.SamplingParams(top_p=0)), grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1]"),
    (dict(prompt="hi", sampling=pb.SamplingParams(top_p=1.01)), grpc.StatusCode.INVALID_ARGUMENT,
     "top_p must be in (0, 1]"),
    (dict(prompt="hi", sampling=pb.SamplingParams(max_tokens=0)), grpc.StatusCode.INVALID_ARGUMENT,
     "max_tokens must be an integer >= 1"),
    (dict(prompt="hi", sampling=pb.SamplingParams(max_tokens=10_000)), grpc.StatusCode.INVALID_ARGUMENT,
     "max_tokens 10000 is above the context length 256"),
    (dict(prompt="hi", prompt_token_ids=[1]), grpc.StatusCode.INVALID_ARGUMENT, "exactly one of"),
]


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("fields, code, message", BAD_REQUESTS, ids=[m for _, _, m in BAD_REQUESTS])
def test_bad_request(stub, served, streaming, fields, code, message):
    req = pb.GenerateRequest(**fields)
    with pytest.raises(grpc.RpcError) as e:
        if streaming:
            list(stub.GenerateStream(req, timeout=30))
        else:
            stub.Generate(req, timeout=30)
    assert e.value.code() == code and message in e.value.details()
    still_serves(stub, served)


def test_load_outside_root_is_permission_denied(stub, served):
    with pytest.raises(grpc.RpcError) as e:
        stub.LoadAdapter(pb.LoadAdapterRequest(name="evil", path=served.outside), timeout=30)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "outside the allowed adapter roots" in \
        e.value.details()
    still_serves(stub, served)


def test_load_malformed_adapter_is_a_clear_error(stub, served):
    with pytest.raises(grpc.RpcError) as e:
        stub.LoadAdapter(pb.LoadAdapterRequest(name="broken", path=served.malformed), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "safetensors" in e.value.details()
    assert "broken" not in {a.name for a in stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30).adapters}
    still_serves(stub, served)


def test_oversized_message_is_refused(stub, served):
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(pb.GenerateRequest(prompt="x" * (5 << 20)), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in e.value.details()
    still_serves(stub, served)


LONG = pb.SamplingParams(temperature=0, max_tokens=240, ignore_eos=True)


def test_deadline_aborts_the_request_and_frees_its_pages(stub, served):
    before = served.service.engine.stats()["finished"].get("abort", 0)
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(pb.GenerateRequest(prompt="long", sampling=LONG), timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stats = served.wait_idle()
    assert stats["finished"]["abort"] == before + 1
    still_serves(stub, served)


def test_cancel_mid_stream_frees_pages(stub, served, monkeypatch):
    steps_wait_for_a_command(served, monkeypatch)  # the stream cannot end before the cancel lands
    before = served.service.engine.stats()["finished"].get("abort", 0)
    call = stub.GenerateStream(pb.GenerateRequest(prompt="long", adapter="gamma", sampling=LONG), timeout=60)
    first = next(call)
    assert not first.finished
    call.cancel()
    stats = served.wait_idle()  # also checks that every KV page is free again
    assert stats["finished"]["abort"] == before + 1
    monkeypatch.undo()
    still_serves(stub, served)
