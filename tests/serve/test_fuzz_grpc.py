"""Hypothesis over the gRPC request schema (every field of GenerateRequest and the adapter calls, raw bytes that do
not decode): each case gets OK or a clear non-INTERNAL status, and afterwards a canary returns its known text."""

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jlora.serve.proto import jlora_pb2 as pb
from jlora.serve.proto import jlora_pb2_grpc as pb_grpc

CANARY = pb.GenerateRequest(prompt="canary", adapter="beta", sampling=pb.SamplingParams(temperature=0, max_tokens=4))
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# Protobuf strings must be valid UTF-8 to encode: lone surrogates go in as raw bytes (test_fuzz_raw).
text = st.one_of(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30),
                 st.sampled_from(["", "\x00", "x" * 300, "\U0010ffff"]))
int32 = st.one_of(st.integers(-3, 300), st.sampled_from([-(1 << 31), (1 << 31) - 1]))
int64 = st.one_of(int32, st.sampled_from([1 << 32, (1 << 63) - 1, -(1 << 63), (1 << 32) - 1]))
double = st.one_of(st.floats(), st.sampled_from([0.0, 1.0, 1e-300, 1e300]))


@st.composite
def sampling(draw):
    sp = pb.SamplingParams(stop=draw(st.lists(text, max_size=20)), stop_token_ids=draw(st.lists(int32, max_size=5)),
                           ignore_eos=draw(st.booleans()))
    for field, strategy in (("temperature", double), ("top_p", double), ("top_k", int32), ("seed", int64),
                            ("max_tokens", st.integers(-2, 8))):
        if draw(st.booleans()):
            setattr(sp, field, draw(strategy))
    return sp


@st.composite
def requests(draw):
    kind = draw(st.sampled_from(["prompt", "ids", "messages", "mixed"]))
    req = pb.GenerateRequest(adapter=draw(st.one_of(st.sampled_from(["", "alpha", "gamma", "nope", "tiny"]), text)),
                             sampling=draw(sampling()))
    if kind in ("prompt", "mixed"):
        req.prompt = draw(text)
    if kind in ("ids", "mixed"):
        req.prompt_token_ids.extend(draw(st.lists(int32, max_size=6)))
    if kind in ("messages", "mixed"):
        req.messages.extend(pb.ChatMessage(role=draw(st.one_of(st.just("user"), text)), content=draw(text))
                            for _ in range(draw(st.integers(0, 3))))
    return req


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served.grpc_target) as ch:
        yield pb_grpc.JloraStub(ch), ch


@pytest.fixture(scope="module")
def canary(stub):
    return stub[0].Generate(CANARY, timeout=300).text


def _call(fn):
    try:
        fn()
    except grpc.RpcError as e:
        assert e.code() in REFUSALS, (e.code(), e.details())
        assert e.details()


def _check_canary(stub, canary):
    assert stub[0].Generate(CANARY, timeout=300).text == canary


@FUZZ
@given(req=requests(), streamed=st.booleans())
def test_fuzz_generate(stub, canary, req, streamed):
    rpc = stub[0]
    _call((lambda: list(rpc.GenerateStream(req, timeout=300))) if streamed else (lambda: rpc.Generate(req, timeout=300)))
    _check_canary(stub, canary)


@settings(FUZZ, max_examples=30)
@given(raw=st.one_of(st.binary(max_size=64), st.sampled_from([
    b"\x0a\x03\xed\xa0\x80",  # prompt = a UTF-8-encoded lone surrogate
    b"\x0a\xff\xff\xff\xff\x0f",  # a length past the end
    b"\x12\x05\x01\x02",  # packed ids cut short
])), method=st.sampled_from(["Generate", "LoadAdapter", "UnloadAdapter", "ListAdapters"]))
def test_fuzz_raw(stub, canary, raw, method):
    call = stub[1].unary_unary(f"/jlora.v1.Jlora/{method}", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
    _call(lambda: call(raw, timeout=300))
    _check_canary(stub, canary)


@settings(FUZZ, max_examples=30)
@given(name=text, path=st.one_of(text, st.sampled_from(["/", "/etc", ".."])))
def test_fuzz_adapter_calls(stub, canary, served, name, path):
    rpc = stub[0]
    with pytest.raises(grpc.RpcError) as e:
        rpc.LoadAdapter(pb.LoadAdapterRequest(name=name, path=path), timeout=300)
    assert e.value.code() in REFUSALS and served.root not in e.value.details()
    _call(lambda: rpc.UnloadAdapter(pb.UnloadAdapterRequest(name=name), timeout=300))
    _check_canary(stub, canary)
