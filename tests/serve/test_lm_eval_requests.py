"""lm-evaluation-harness's `local-completions` loglikelihood requests replayed against the served tiny model, parsed
as lm_eval parses them, equal to `LLM.loglikelihood` within 1e-4 (base and an adapter). No lm_eval here: the bodies
are those lm_eval 0.4.13 sent to `jlora serve` in scripts/lm_eval_check.py (benchmarks/results/lm_eval_cpu.json),
only `model` renamed to this server's names; the parsing is lm_eval's `LocalCompletionsAPI.parse_logprobs`.

How lm_eval scores a (context, continuation) pair: it tokenizes them itself (`_encode_pair`: trailing spaces of the
context move to the continuation; ctxlen = len(encode(context)); the continuation's ids are what encode(context +
continuation) holds after ctxlen), asks for the whole text echoed with max_tokens=1, logprobs=1, and sums
token_logprobs[ctxlen:-1] (the last entry is the generated token). It is greedy when each of those equals the largest
value of its top_logprobs. text_offset is not read. With tokenized_requests=False the prompt is the decoded text,
one per request (batch 1); with tokenized_requests=True it is the id lists, a list of batch_size of them.
"""

import json
import os
import urllib.request

import pytest
from tokenizers import Tokenizer

import jlora

# Two of the task's documents (tests/fixtures/lm_eval/mc.jsonl) as lm_eval split them: (context, continuation).
PAIRS = [("Question: What is the capital of France?\nAnswer:", c) for c in (" Paris", " Berlin", " Rome", " Madrid")]
PAIRS += [("Question: Who wrote Romeo and Juliet?\nAnswer:", c)
          for c in (" Charles Dickens", " Jane Austen", " Mark Twain", " William Shakespeare")]
# A captured body (tokenized_requests=False); the other requests differ only in model and prompt.
BODY = {"model": "smollm2-135m-instruct", "prompt": "Question: What is the capital of France?\nAnswer: Paris",
        "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
MODELS = {"tiny": None, "beta": "beta"}  # served name -> LLM adapter


def _post(url, body):
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def parse_logprobs(out, ctxlens):
    """lm_eval's `LocalCompletionsAPI.parse_logprobs`: [(loglikelihood, is_greedy)] per choice."""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), ctxlens):
        assert ctxlen > 0
        values = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        res.append((sum(values), all(v == max(top.values()) for v, top in zip(values, tops))))
    return res


def encode_pair(tok, context, continuation):
    """lm_eval's `TemplateLM._encode_pair` over the served tokenizer.json (its HF backend, no special tokens)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False).ids
    ctx = tok.encode(context, add_special_tokens=False).ids
    return ctx, whole[len(ctx):]


@pytest.fixture(scope="module")
def reference(served):
    """LLM.loglikelihood of PAIRS on the served model files, per served model name."""
    with jlora.LLM(served.model_dir, adapters={"beta": served.adapters["beta"]}, progress=False) as llm:
        return {name: llm.loglikelihood([c for c, _ in PAIRS], [x for _, x in PAIRS], adapter=a)
                for name, a in MODELS.items()}


@pytest.fixture(scope="module")
def tok(served):
    return Tokenizer.from_file(os.path.join(served.model_dir, "tokenizer.json"))


@pytest.mark.parametrize("model", MODELS)
def test_text_requests_as_lm_eval_sends_them(served, reference, tok, model):
    assert BODY["prompt"] == "".join(PAIRS[0])
    got = []
    for context, continuation in PAIRS:
        ctx, cont = encode_pair(tok, context, continuation)
        out = _post(served.http_url, {**BODY, "model": model, "prompt": context + continuation})
        assert len(out["choices"][0]["logprobs"]["token_logprobs"]) == len(ctx) + len(cont) + 1
        got += parse_logprobs(out, [len(ctx)])
    want = reference[model]
    assert [g for _, g in got] == [o.is_greedy for o in want]
    assert [v for v, _ in got] == pytest.approx([o.logprob for o in want], abs=1e-4)
    assert max(o.logprob for o in want[:4]) - min(o.logprob for o in want[:4]) > 0.1  # the choices differ


def test_token_batches_as_lm_eval_sends_them(served, reference, tok):
    for model in MODELS:
        pairs = [encode_pair(tok, c, x) for c, x in PAIRS]
        got = []
        for start in (0, 4):  # batch_size 4: one request per four pairs
            batch = pairs[start:start + 4]
            out = _post(served.http_url, {**BODY, "model": model, "prompt": [c + x for c, x in batch]})
            assert sorted(c["index"] for c in out["choices"]) == [0, 1, 2, 3]
            got += parse_logprobs(out, [len(c) for c, _ in batch])
        want = reference[model]
        assert [(o.prompt_token_ids, o.token_ids) for o in want] == pairs
        assert [v for v, _ in got] == pytest.approx([o.logprob for o in want], abs=1e-4), model
        assert [g for _, g in got] == [o.is_greedy for o in want], model
    assert [o.logprob for o in reference["tiny"]] != pytest.approx([o.logprob for o in reference["beta"]], abs=1e-2)
