"""Safe defaults: API keys on both front ends, an admin key for adapter loads, Host and cross-origin checks, no
server paths in responses, adapter files inside the roots, sizes checked before reading, 400s for hostile input."""

import json
import os
import struct

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import write_adapter
from serve_helpers import CONFIG, Served

from jlora.serve.proto import jlora_pb2 as pb
from jlora.serve.proto import jlora_pb2_grpc as pb_grpc
from jlora.serve.server import BackgroundServer, ServeConfig, build_service

USER, ADMIN = "user-key-1", "admin-key-2"
GREEDY = {"max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def keyed(served, tmp_path_factory):
    """A second server over the same model with both keys, any adapter path allowed."""
    config = ServeConfig(model=served.model_dir, served_model_name="tiny", max_loras_per_batch=2, max_lora_rank=16,
                         num_pages=64, page_size=16, allow_any_lora_path=True, api_key=USER, admin_api_key=ADMIN)
    server = BackgroundServer(build_service(config))
    yield Served(server, served.model_dir, "", served.outside, served.malformed, served.spare, {})
    server.stop()


def _auth(key):
    return {"authorization": f"Bearer {key}"} if key else {}


def test_http_keys_guard_every_endpoint_but_health(keyed):
    with httpx.Client(base_url=keyed.http_url, timeout=60) as http:
        assert http.get("/health").status_code == 200
        for method, path, body in (("GET", "/v1/models", None), ("GET", "/metrics", None),
                                   ("POST", "/v1/completions", {"prompt": "hi", **GREEDY}),
                                   ("POST", "/generate", {"text": "hi"})):
            for key in (None, "wrong"):
                r = http.request(method, path, json=body, headers=_auth(key))
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (path, r.text)
            for key in (USER, ADMIN):
                assert http.request(method, path, json=body, headers=_auth(key)).status_code == 200, path
        load = {"lora_name": "k1", "lora_path": keyed.spare}
        assert http.post("/v1/load_lora_adapter", json=load, headers=_auth(USER)).status_code == 401
        r = http.post("/v1/load_lora_adapter", json=load, headers=_auth(ADMIN))
        assert r.status_code == 200 and r.json()["path"] == "", r.text  # outside any root: no path shown
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "k1"}, headers=_auth(USER))
        assert r.status_code == 401
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "k1"},
                         headers=_auth(ADMIN)).status_code == 200


def test_grpc_keys_guard_every_method_but_health(keyed):
    with grpc.insecure_channel(keyed.grpc_target) as ch:
        stub = pb_grpc.JloraStub(ch)
        req = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=0, max_tokens=3))
        for call in (lambda md: stub.Generate(req, timeout=60, metadata=md),
                     lambda md: list(stub.GenerateStream(req, timeout=60, metadata=md)),
                     lambda md: stub.ListAdapters(pb.ListAdaptersRequest(), timeout=60, metadata=md)):
            for md in ((), (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as e:
                    call(md)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            call((("authorization", f"Bearer {USER}"),))
        load = pb.LoadAdapterRequest(name="k2", path=keyed.spare)
        with pytest.raises(grpc.RpcError) as e:
            stub.LoadAdapter(load, timeout=60, metadata=(("authorization", f"Bearer {USER}"),))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        out = stub.LoadAdapter(load, timeout=60, metadata=(("authorization", f"Bearer {ADMIN}"),))
        assert out.adapter.name == "k2" and not os.path.isabs(out.adapter.path)
        stub.UnloadAdapter(pb.UnloadAdapterRequest(name="k2"), timeout=60,
                           metadata=(("authorization", f"Bearer {ADMIN}"),))
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_foreign_host_and_cross_origin_posts_are_refused(served):
    port = served.server.server.http_port
    with httpx.Client(base_url=served.http_url, timeout=60) as http:
        r = http.get("/v1/models", headers={"host": "attacker.example"})
        assert r.status_code == 403 and "Host" in r.json()["error"]["message"]
        assert http.get("/v1/models", headers={"host": f"localhost:{port}"}).status_code == 200
        body = {"model": "alpha", "prompt": "hi", **GREEDY}
        for headers in ({"origin": "http://attacker.example"}, {"sec-fetch-site": "cross-site"},
                        {"origin": "null"}):
            r = http.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 403 and "cross-origin" in r.json()["error"]["message"], headers
        assert http.post("/v1/completions", json=body,
                         headers={"origin": f"http://127.0.0.1:{port}"}).status_code == 200
        # A browser's no-preflight "simple" POST cannot load an adapter.
        r = http.post("/v1/load_lora_adapter", headers={"content-type": "text/plain"},
                      content=json.dumps({"lora_name": "simple", "lora_path": served.spare}))
        assert r.status_code == 415
        names = {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert "simple" not in names
    served.wait_idle()


def test_no_server_paths_in_responses(served, tmp_path):
    with httpx.Client(base_url=served.http_url, timeout=60) as http:
        listing = http.get("/v1/models").text
        assert served.root not in listing and served.model_dir not in listing
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": served.outside})
        assert r.status_code == 403 and served.root not in r.text  # the client's own path only
        # A missing path, a directory that is no adapter, and a file say the same.
        file_path = os.path.join(served.root, "alpha", "adapter_config.json")
        said = set()
        for path in (served.root + "/missing", served.root, file_path):
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "probe", "lora_path": path})
            assert r.status_code == 400, r.text
            said.add(r.json()["error"]["message"].replace(repr(path), "PATH"))
        assert len(said) == 1, said
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "spare-p", "lora_path": served.spare})
        assert r.status_code == 200 and r.json()["path"] == "spare"
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "spare-p"}).status_code == 200


def test_a_symlinked_file_inside_the_root_cannot_reach_outside(served):
    sneaky = os.path.join(served.root, "sneaky-file")
    os.makedirs(sneaky, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        target = os.path.join(served.outside, name)
        link = os.path.join(sneaky, name)
        if not os.path.lexists(link):
            os.symlink(target, link) if name.endswith("safetensors") else \
                open(link, "w").write(open(target).read())
    with httpx.Client(base_url=served.http_url, timeout=60) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "sneaky", "lora_path": sneaky})
        assert r.status_code == 403 and "resolves outside" in r.json()["error"]["message"], r.text
        assert served.outside not in r.text


def test_runtime_loads_are_off_without_roots(served):
    service = served.service
    service.runtime_loads = False
    try:
        with httpx.Client(base_url=served.http_url, timeout=60) as http:
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": served.spare})
            assert r.status_code == 403 and "--lora-root" in r.json()["error"]["message"]
    finally:
        service.runtime_loads = True


def test_chunked_body_over_the_limit_is_413_while_read(served):
    sent = [0]

    def chunks():
        yield b'{"prompt": "'
        for _ in range(64):  # 8 MiB in all, twice the limit
            sent[0] += 1
            yield b"x" * (128 << 10)
        yield b'"}'

    with httpx.Client(base_url=served.http_url, timeout=60) as http:
        try:
            r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
            assert r.status_code == 413, r.text
        except httpx.HTTPError:  # the server may answer and close before the client finished sending
            pass
        assert http.get("/health").status_code == 200


@pytest.mark.parametrize("raw, message", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "integer literal of 5000 digits"),
    (b'{"prompt": "hi \\ud800 there"}', "lone surrogate"),
    (b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "lone surrogate"),
    (b'{"prompt": "hi", "seed": 4294967296}', "seed must be an integer in [0, 2^32)"),
    (b'{"prompt": "hi", "top_k": 2147483648}', "top_k must be an integer in [-1, 2147483647]"),
    (b'{"prompt": "hi", "temperature": NaN}', "NaN is not valid JSON"),
])
def test_hostile_bodies_are_400(served, raw, message):
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    with httpx.Client(base_url=served.http_url, timeout=60) as http:
        r = http.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("path", ["/x\x00y", "\ud800"])
def test_bad_paths_are_400(served, path):
    with httpx.Client(base_url=served.http_url, timeout=60) as http:
        raw = json.dumps({"lora_name": "p", "lora_path": path}).encode()
        r = http.post("/v1/load_lora_adapter", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text


def test_undecodable_grpc_message_is_invalid_argument(served):
    with grpc.insecure_channel(served.grpc_target) as ch:
        raw = ch.unary_unary("/jlora.v1.Jlora/Generate", request_serializer=lambda b: b,
                             response_deserializer=lambda b: b)
        for data in (b"\xff\xff\xff\xff", b"\x0a\x03\xff\xfe\xfd"):  # junk, and invalid UTF-8 in `prompt`
            with pytest.raises(grpc.RpcError) as e:
                raw(data, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()


def _safetensors(header: dict, data: bytes = b"") -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


@pytest.mark.parametrize("content, message", [
    (struct.pack("<Q", 1 << 40) + b"{}", "bad header length"),
    (_safetensors({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                   {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 1 << 30]}}), "malformed header entry"),
    (_safetensors({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                   {"dtype": "F32", "shape": [4096, 32], "data_offsets": [0, 4096 * 32 * 4]}},
                  bytes(4096 * 32 * 4)), "shape mismatch"),
])
def test_safetensors_headers_are_checked_before_tensors_load(served, tmp_path, content, message):
    path = write_adapter(os.path.join(served.root, f"hdr-{abs(hash(message))}"), CONFIG, r=4)
    with open(os.path.join(path, "adapter_model.safetensors"), "wb") as f:
        f.write(content)
    with httpx.Client(base_url=served.http_url, timeout=60) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "hdr", "lora_path": path})
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
