"""Soak: 520 mixed requests at concurrency 32 (plain and streamed, cancelled, bad ones) while an adapter is loaded,
replaced and unloaded. Every completed greedy output equals a lone run's (of the adapter version it could have
got), and once idle nothing leaked: pages, sequences, adapter references, slots, retired registrations."""

import asyncio
import json
import random

import httpx
from helpers import write_adapter
from serve_helpers import CONFIG, NUM_PAGES

N, CONCURRENCY, MAX_TOKENS = 520, 32, 6
PROMPTS = ["soak one", "a second prompt", "3 4 5", "why?", "tell me more", "z"]
STABLE = [None, "alpha", "beta", "gamma"]
BAD = [{"seed": 1 << 32}, {"top_k": 1 << 31}, {"temperature": -1}, {"model": "nope"}, {"max_tokens": 0},
       {"stop": ["x"] * 40}, {"top_p": 0}]


def _body(prompt, model, **extra):
    return {"model": model or "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, **extra}


async def _text(http, body):
    r = await http.post("/v1/completions", json=body)
    return r.status_code, (r.json()["choices"][0]["text"] if r.status_code == 200 else r.json()["error"])


async def _stream(http, body, cancel: bool):
    parts = []
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                parts.append(json.loads(line[6:])["choices"][0]["text"])
                if cancel:
                    return "cancelled", None
    return 200, "".join(parts)


async def _soak(served, versions, refs):
    rng = random.Random(19)
    sem = asyncio.Semaphore(CONCURRENCY)
    outcomes = []
    admin = {"load": 0, "unload": 0}

    async with httpx.AsyncClient(base_url=served.http_url, timeout=300) as http:
        async def one(i):
            async with sem:
                kind = rng.random()
                prompt = rng.choice(PROMPTS)
                if i % 40 == 7:  # adapter churn: replace "soak" with the other version, or unload it
                    if rng.random() < 0.7:
                        v = rng.randrange(2)
                        r = await http.post("/v1/load_lora_adapter", json={"lora_name": "soak",
                                                                           "lora_path": versions[v]})
                        assert r.status_code == 200, r.text
                        admin["load"] += 1
                    else:
                        r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "soak"})
                        assert r.status_code in (200, 404), r.text
                        admin["unload"] += 1
                    return
                model = rng.choice(STABLE + ["soak", "soak"])
                if kind < 0.1:
                    extra = rng.choice(BAD)
                    status, error = await _text(http, {**_body(prompt, model), **extra})
                    assert 400 <= status < 500, (extra, status, error)
                    outcomes.append(("bad", None, None, None))
                elif kind < 0.25:
                    status, _ = await _stream(http, _body(prompt, model), cancel=True)
                    outcomes.append(("cancel", model, prompt, status))
                elif kind < 0.6:
                    outcomes.append(("stream", model, prompt, await _stream(http, _body(prompt, model), False)))
                else:
                    outcomes.append(("plain", model, prompt, await _text(http, _body(prompt, model))))

        await asyncio.gather(*(one(i) for i in range(N)))
    return outcomes, admin


def test_soak_mixed_traffic_loses_and_leaks_nothing(served, tmp_path):
    versions = [served.spare, write_adapter(f"{served.root}/soak-v2", CONFIG, r=8, seed=77, std=0.3)]
    refs = {}

    async def lone_runs():
        async with httpx.AsyncClient(base_url=served.http_url, timeout=300) as http:
            for prompt in PROMPTS:
                for model in STABLE:
                    refs[(model, prompt)] = {(await _text(http, _body(prompt, model)))[1]}
            for v, path in enumerate(versions):
                r = await http.post("/v1/load_lora_adapter", json={"lora_name": "soak", "lora_path": path})
                assert r.status_code == 200, r.text
                for prompt in PROMPTS:
                    refs.setdefault(("soak", prompt), set()).add((await _text(http, _body(prompt, "soak")))[1])

    asyncio.run(lone_runs())
    assert all(len(refs[("soak", p)]) == 2 for p in PROMPTS), "the two versions must differ"
    before = served.service.engine.stats()["finished"]
    outcomes, admin = asyncio.run(_soak(served, versions, refs))

    assert len(outcomes) + admin["load"] + admin["unload"] == N and admin["load"] and admin["unload"]
    completed = 0
    for kind, model, prompt, result in outcomes:
        if kind in ("plain", "stream"):
            status, text = result
            if status == 404 and model == "soak":
                continue  # it was unloaded at that moment
            assert status == 200, (kind, model, prompt, result)
            assert text in refs[(model, prompt)], (kind, model, prompt, text)
            completed += 1
    assert completed > N // 3
    assert sum(k == "cancel" for k, *_ in outcomes) > 30 and sum(k == "bad" for k, *_ in outcomes) > 20

    stats = served.wait_idle(timeout=60)
    assert stats["finished"].get("abort", 0) > before.get("abort", 0)  # cancelled streams were aborted
    metrics = httpx.get(served.http_url + "/metrics").text
    assert "jlora_kv_pages_used 0.0" in metrics and f"jlora_kv_pages_total {float(NUM_PAGES)}" in metrics

    def leaks(engine):
        store = engine.store
        if store.has("soak"):
            store.unregister("soak")
        return {"sequences": len(engine.requests), "refs": dict(store.refs), "retired": set(store.retired),
                "stray slots": set(store.slots.resident) - set(store.entries),
                "stray host copies": set(store.host) - set(store.entries),
                "soak entries": [k for k, e in store.entries.items() if e.name == "soak"],
                "scheduler": len(engine.scheduler.running) + len(engine.scheduler.waiting)}

    assert served.service.engine.call(leaks).result(timeout=60) == {
        "sequences": 0, "refs": {}, "retired": set(), "stray slots": set(), "stray host copies": set(),
        "soak entries": [], "scheduler": 0}
    served.service.engine.call(lambda e: e.allocator.check_invariants([])).result(timeout=60)
