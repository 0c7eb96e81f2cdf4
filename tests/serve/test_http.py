"""The HTTP API through the `openai` client and raw httpx; every bad input gets its status and says what was wrong."""

import httpx
import openai
import pytest
from serve_helpers import sse_events, steps_wait_for_a_command

CHAT = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.http_url, timeout=60) as c:
        yield c


def still_serves(http, served):
    r = http.post("/v1/completions", json={"model": "alpha", "prompt": "ok", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    served.wait_idle()


def test_models_lists_base_and_adapters(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", "alpha", "beta", "gamma"}
    assert models["alpha"].model_extra["parent"] == "tiny"


@pytest.mark.parametrize("model", ["tiny", "alpha", "gamma"])
def test_chat_plain_and_streaming_agree(client, model):
    plain = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)
    assert plain.model == model and plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_model_selects_the_adapter(client):
    texts = {m: client.completions.create(model=m, prompt="hello there", max_tokens=8, temperature=0).choices[0].text
             for m in ("tiny", "alpha", "beta", "gamma")}
    assert len(set(texts.values())) == 4


def test_completions_streaming(client):
    plain = client.completions.create(model="beta", prompt="abc", max_tokens=6, temperature=0)
    chunks = list(client.completions.create(model="beta", prompt="abc", max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text


def test_generate_takes_lora_path(http, served):
    body = {"text": "hello there", "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
    base = http.post("/generate", json=body).json()
    by_name = http.post("/generate", json={**body, "sampling_params": {**body["sampling_params"],
                                                                         "lora_path": "alpha"}}).json()
    by_path = http.post("/generate", json={**body, "sampling_params": {**body["sampling_params"],
                                                                         "lora_path": served.adapters["alpha"]}})
    assert by_path.status_code == 200, by_path.text
    assert by_name["text"] == by_path.json()["text"] != base["text"]
    assert by_name["meta_info"]["completion_tokens"] == len(by_name["output_ids"])
    with http.stream("POST", "/generate", json={**body, "stream": True}) as r:
        events = sse_events(r.iter_lines())
    assert events[-1]["text"] == base["text"] and events[-1]["meta_info"]["finish_reason"] is not None


def test_load_and_unload(http, client, served):
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "spare-http", "lora_path": served.spare})
    assert r.status_code == 200 and r.json()["rank_bucket"] == 8
    assert "spare-http" in {m.id for m in client.models.list().data}
    out = client.chat.completions.create(model="spare-http", messages=CHAT, max_tokens=4, temperature=0)
    assert out.model == "spare-http"
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "spare-http"})
    assert r.status_code == 200 and r.json()["unloaded_now"] is True
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="spare-http", messages=CHAT, max_tokens=4)
    assert "'spare-http' is not loaded" in e.value.message


def test_health_and_metrics(http):
    assert http.get("/health").json() == {"status": "ok"}
    text = http.get("/metrics").text
    for name in ("jlora_queue_depth", "jlora_running_sequences", "jlora_generation_tokens_per_second",
                 "jlora_adapter_device_cache_hits_total", "jlora_adapter_device_cache_misses_total",
                 "jlora_adapter_host_cache_hits_total", "jlora_compilations_total",
                 "jlora_request_latency_seconds_bucket"):
        assert f"\n{name}" in text, name


def test_unknown_adapter_is_404(client, http, served):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=CHAT, max_tokens=4)
    assert "adapter 'nope' is not loaded" in e.value.message
    r = http.post("/generate", json={"text": "hi", "sampling_params": {"lora_path": "nope"}})
    assert r.status_code == 404 and "'nope'" in r.json()["error"]["message"]
    still_serves(http, served)


BAD_BODIES = [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "x" * 300}, "prompt of 300 tokens is too long"),
    ({"prompt": "hi", "temperature": -0.1}, "temperature must be a finite number in [0, 10000]"),
    ({"prompt": "hi", "top_p": 0}, "top_p must be in (0, 1]"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"prompt": "hi", "max_tokens": 257}, "max_tokens 257 is above the context length 256"),
    ({"prompt": "hi", "max_tokens": 255}, "at most 254 new tokens fit"),
    ({"prompt": "hi", "n": 0}, "n must be an integer in [1, 64]"),
    ({"prompt": ["a", 7]}, "prompt[1] must be a string or a non-empty list of token ids"),
]


@pytest.mark.parametrize("body, message", BAD_BODIES, ids=[m for _, m in BAD_BODIES])
def test_bad_completion_is_400(http, served, body, message):
    for stream in (False, True):
        r = http.post("/v1/completions", json={"model": "alpha", "stream": stream, **body})
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    still_serves(http, served)


@pytest.mark.parametrize("kwargs, message", [
    (dict(messages=[]), "messages must be a non-empty list"),
    (dict(messages=CHAT, temperature=-1), "temperature must be a finite number in [0, 10000]"),
    (dict(messages=CHAT, top_p=2), "top_p must be in (0, 1]"),
    (dict(messages=CHAT, max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(messages=CHAT, max_tokens=1000), "max_tokens 1000 is above the context length 256"),
])
def test_bad_chat_is_400_through_openai(client, http, served, kwargs, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="beta", **kwargs)
    assert message in e.value.message
    still_serves(http, served)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/generate", "/v1/load_lora_adapter"])
def test_malformed_json_is_400(http, served, path):
    r = http.post(path, content=b'{"prompt": "hi",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON body" in r.json()["error"]["message"]
    r = http.post(path, json=["not", "an", "object"])
    assert r.status_code == 400 and "must be a JSON object" in r.json()["error"]["message"]
    still_serves(http, served)


def test_load_outside_root_is_403(http, served):
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": served.outside})
    assert r.status_code == 403 and "outside the allowed adapter roots" in r.json()["error"]["message"]
    still_serves(http, served)


def test_load_malformed_adapter_is_a_clear_400(http, client, served):
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": served.malformed})
    assert r.status_code == 400 and "safetensors" in r.json()["error"]["message"]
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "missing", "lora_path": served.root + "/missing"})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"]
    assert not {"broken", "missing"} & {m.id for m in client.models.list().data}
    still_serves(http, served)


def test_disconnect_mid_stream_frees_pages(http, served, monkeypatch):
    body = {"model": "gamma", "prompt": "long", "max_tokens": 240, "ignore_eos": True, "temperature": 0,
            "stream": True}
    steps_wait_for_a_command(served, monkeypatch)  # the stream cannot end before the disconnect lands
    before = served.service.engine.stats()["finished"].get("abort", 0)
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert next(r.iter_lines()).startswith("data: ")
    stats = served.wait_idle()  # also checks that every KV page is free again
    assert stats["finished"]["abort"] == before + 1 and stats["tokens_generated"] > 0
    monkeypatch.undo()
    still_serves(http, served)


def test_disconnect_while_waiting_frees_pages(served, monkeypatch):
    body = {"prompt": "long", "max_tokens": 240, "ignore_eos": True, "temperature": 0}
    steps_wait_for_a_command(served, monkeypatch)  # the request cannot finish before its client gives up
    before = served.service.engine.stats()["finished"].get("abort", 0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.http_url + "/v1/completions", json=body, timeout=0.5)
    assert served.wait_idle()["finished"]["abort"] == before + 1


def test_oversized_body_and_unknown_route(http, served):
    r = http.post("/v1/completions", json={"prompt": "x" * (5 << 20)})
    assert r.status_code == 413 and "above the limit" in r.json()["error"]["message"]
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found: GET /v1/nothing-here"
    r = http.get("/v1/completions")
    assert r.status_code == 405 and "GET /v1/completions" in r.json()["error"]["message"]
    still_serves(http, served)
