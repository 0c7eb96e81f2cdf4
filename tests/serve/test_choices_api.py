"""n, best_of, lists of prompts and stream_options.include_usage through the real `openai` client: each choice is
its own seed stream (choice j of seed s is the request with seed s + j), the prompt is prefilled once (the other
choices start from its cached pages), best_of returns the n of highest cumulative logprob, and usage counts each
prompt once and every returned choice."""

import httpx
import openai
import pytest
from serve_helpers import steps_wait_for_a_command

PROMPT = "jumping over the lazy dog"
S = dict(model="gamma", temperature=1.0, max_tokens=8, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def one(client, prompt, seed, **kw):
    return client.completions.create(prompt=prompt, seed=seed, **{**S, **kw}).choices[0]


def test_each_choice_is_its_own_seed_stream(client):
    out = client.completions.create(prompt=PROMPT, n=3, seed=7, **S)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [one(client, PROMPT, 7 + j).text for j in range(3)]
    assert len({c.text for c in out.choices}) > 1
    assert out.usage.prompt_tokens == len(PROMPT) and out.usage.completion_tokens == 24
    chat = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], n=2, seed=3, **S)
    singles = [client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], seed=3 + j, **S)
               for j in range(2)]
    assert [c.message.content for c in chat.choices] == [s.choices[0].message.content for s in singles]
    assert chat.usage.prompt_tokens == singles[0].usage.prompt_tokens


def test_the_prompt_is_prefilled_once(client, served):
    prompt = "only this test sends it, 2 pages and 8 more"[:40]  # pages of 16 tokens, one per character
    before = served.wait_idle()["prefix_cache_hit_tokens"]
    client.completions.create(prompt=prompt, n=4, seed=1, **S)
    assert served.wait_idle()["prefix_cache_hit_tokens"] - before == 3 * 32  # 3 followers x 2 cached pages


def test_best_of_returns_the_n_most_likely(client):
    out = client.completions.create(prompt=PROMPT, n=2, best_of=4, seed=11, **S)
    scored = []
    for j in range(4):
        c = one(client, PROMPT, 11 + j, logprobs=0)
        scored.append((sum(c.logprobs.token_logprobs), c.text))
    want = [text for _, text in sorted(scored, reverse=True)[:2]]
    assert [c.text for c in out.choices] == want and [c.index for c in out.choices] == [0, 1]
    assert all(c.logprobs is None for c in out.choices)  # computed to pick, not asked for
    assert out.usage.completion_tokens == 16


def test_a_list_of_prompts_with_n(client):
    prompts = ["abc", [20, 21, 22, 23]]
    out = client.completions.create(prompt=prompts, n=2, seed=5, logprobs=1, echo=True, **S)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.prompt_tokens == 3 + 4 and out.usage.completion_tokens == 32
    texts = [c.text for c in out.choices]
    assert texts[0].startswith("abc") and texts[1].startswith("abc")
    assert texts[2:] == [one(client, [20, 21, 22, 23], 5 + j, echo=True).text for j in range(2)]
    for c in out.choices:  # the prompt's logprobs on every choice of it (the first asked for them)
        assert c.logprobs.token_logprobs[0] is None and all(v is not None for v in c.logprobs.token_logprobs[1:])
    assert out.choices[0].logprobs.token_logprobs[:3] == out.choices[1].logprobs.token_logprobs[:3]


def test_streamed_choices_and_usage(client):
    kw = dict(prompt=["abc", "hello there"], n=2, seed=9, **S)
    plain = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    texts = {}
    for c in chunks[:-1]:
        assert len(c.choices) == 1 and c.usage is None
        texts[c.choices[0].index] = texts.get(c.choices[0].index, "") + c.choices[0].text
    assert [texts[i] for i in range(4)] == [c.text for c in plain.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    no_usage = list(client.completions.create(stream=True, **kw))
    assert all(c.usage is None for c in no_usage)
    chat = list(client.chat.completions.create(messages=[{"role": "user", "content": "x"}], n=2, stream=True,
                                               stream_options={"include_usage": True}, **{**S, "seed": 2}))
    roles = [c.choices[0].delta.role for c in chat if c.choices and c.choices[0].delta.role]
    assert roles == ["assistant", "assistant"] and chat[-1].usage.completion_tokens == 16


BAD = [(dict(n=0), "n must be an integer in [1, 64]"), (dict(n=65), "n must be an integer in [1, 64]"),
       (dict(n=2, best_of=1), "best_of must be an integer in [n=2, 64]"),
       (dict(n=1, best_of=2, stream=True), "best_of=2 > n=1 cannot be streamed"),
       (dict(prompt=["a"] * 65), "at most 64 per request"),
       (dict(prompt=["a"] * 5, n=64), "5 prompts x 64 sequences each is 320; at most 256"),
       (dict(prompt=[[]]), "prompt[0] must be a string or a non-empty list of token ids"),
       (dict(prompt=[]), "prompt must be a string, a list of token ids, or a list of either")]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[m for _, m in BAD])
def test_bad_choices_are_400(client, served, kwargs, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**{"prompt": PROMPT, **S, **kwargs})
    assert message in e.value.message
    assert served.wait_idle()["sequences"] == 0  # nothing was left started


def test_a_client_gone_mid_stream_aborts_every_choice(served, monkeypatch):
    steps_wait_for_a_command(served, monkeypatch)
    before = served.service.engine.stats()["finished"].get("abort", 0)
    body = {"model": "alpha", "prompt": PROMPT, "n": 3, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=served.http_url, timeout=60) as http, http.stream("POST", "/v1/completions",
                                                                                  json=body) as r:
        assert next(r.iter_lines()).startswith("data: ")
    assert served.wait_idle()["finished"]["abort"] == before + 3  # and every page is free again
