"""Structured output in the engine, on the tiny model with its character-level tokenizer: sampled outputs follow
their grammar, greedy ones equal an independent masked re-forward, unconstrained neighbours are untouched, and a
grammar that goes wrong fails its request alone. One engine serves every test, so they share compiled programs."""

import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
from train.tiny import tiny_tokenizer

from jlora.engine import model_runner
from jlora.engine.compiles import compile_count
from jlora.engine.engine import Engine, EngineConfig
from jlora.engine.grammars import Grammars
from jlora.errors import RequestError
from jlora.model import KVCache, forward
from jlora.sampling import SamplingParams
from jlora.structured import GrammarCompiler, StructuredOutput, unpack

# The tiny vocabulary has letters, digits, space and .,!?':{}"+ (no brackets, no minus): objects of bounded fields.
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "ok": {"type": "boolean"}},
    "required": ["name", "age"], "additionalProperties": False}
JSON = StructuredOutput("json_schema", json.dumps(SCHEMA))
PATTERN = r"(yes|no), [0-9]{2,3}!"
L = 64  # the reference pads every sequence to L tokens: one compile


@pytest.fixture(scope="module")
def engine(tiny):
    engine = Engine(tiny["model"], tiny_tokenizer(), EngineConfig(
        max_num_seqs=8, max_num_batched_tokens=128, max_prefill_chunk=32, page_size=16, num_pages=64,
        max_model_len=96))
    yield engine
    engine.close()


def run(engine, requests) -> list:
    """Final outputs of (prompt, SamplingParams) requests added at once, in order."""
    ids = [engine.add_request(p, sp) for p, sp in requests]
    done = {}
    while engine.has_unfinished():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert engine.allocator.num_free == engine.allocator.num_pages and not engine.requests
    return [done[i] for i in ids]


def test_100_sampled_outputs_parse_and_validate_and_compile_nothing_after_warmup(engine):
    """Temperature 1 over a random model: each output is drawn from what the grammar allows, never outside it. The
    warm-up's programs of the shapes these requests take (a 16-token prefill, the one-token decode with a bitmask)
    are theirs: nothing compiles while they run (test_engine's no-recompile test covers every other shape)."""
    engine.runner.warmup(engine.store.bank, engine.config.max_prefill_chunk,
                         [s for s in engine.runner.bucket_shapes(engine.config.max_prefill_chunk)
                          if s[0] == "decode_masked" or s[:3] == ("prefill", 8, 16)])
    before = compile_count()
    outs = run(engine, [("person: ", SamplingParams(temperature=1.0, seed=i, max_tokens=60, structured=JSON))
                        for i in range(100)])
    assert compile_count() == before, "a structured request compiled something after warm-up"
    assert {m for m, _, _, _ in engine.runner.shapes_run} == {"prefill", "decode_masked"}
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len({o.text for o in outs}) > 50


def test_sampled_regex_outputs_fullmatch(engine):
    outs = run(engine, [("answer: ", SamplingParams(temperature=1.0, seed=i, max_tokens=20,
                                                    structured=StructuredOutput("regex", PATTERN)))
                        for i in range(16)])
    assert all(o.finish_reason == "stop" and re.fullmatch(PATTERN, o.text) for o in outs), [o.text for o in outs]
    assert len({o.text for o in outs}) > 4


_FORWARD = jax.jit(forward, static_argnames=("config",))


def masked_greedy(model, tokenizer, prompt_ids, spec, max_tokens):
    """Greedy decoding by full re-forward, the logits of each step masked in NumPy by an independent matcher; ends
    when the grammar is complete or end of sequence is the argmax."""
    compiler = GrammarCompiler(tokenizer, model.config.vocab_size, tokenizer.stop_ids)
    matcher, out = compiler.matcher(spec), []
    while len(out) < max_tokens:
        ids = prompt_ids + out
        tokens = np.zeros((1, L), np.int32)
        tokens[0, :len(ids)] = ids
        logits, _ = _FORWARD(model.params(), None, jnp.asarray(tokens), jnp.arange(L)[None], None,
                             KVCache.zeros(model.config, 1, L), config=model.config)
        row = np.asarray(logits)[0, len(ids) - 1]
        token = int(np.argmax(np.where(unpack(matcher.mask()[None], row.size)[0], row, -np.inf)))
        if token in tokenizer.stop_ids:
            return out
        assert matcher.advance(token)
        out.append(token)
        if matcher.done:
            return out
    return out


def test_greedy_equals_a_masked_reference(engine, tiny):
    tok = engine.tokenizer
    specs = [JSON, StructuredOutput("regex", PATTERN), StructuredOutput("grammar", 'start: "x" NUM "y"\nNUM: /[0-9]+/')]
    requests = [(tok.encode(p), SamplingParams(temperature=0.0, max_tokens=40, structured=s))
                for p, s in zip(["a person: ", "yes or no? ", "x"], specs)]
    for out, (ids, sp) in zip(run(engine, requests), requests):
        assert out.token_ids == masked_greedy(tiny["model"], tok, ids, sp.structured, sp.max_tokens), out.text


def test_unconstrained_rows_are_untouched_by_structured_neighbours(engine):
    """The same seeded, greedy and penalized requests alone (multi-step decode) and beside structured ones (one
    token per step, a bitmask of all ones for their rows): the same tokens."""
    plain = [("hello ", SamplingParams(temperature=1.0, seed=3, max_tokens=24, logprobs=1)),
             ("abc", SamplingParams(temperature=0.0, max_tokens=30, logprobs=0)),
             ("xyz ", SamplingParams(temperature=0.8, top_k=5, seed=9, repetition_penalty=1.3, max_tokens=20,
                                     logprobs=2))]  # logprobs on every row: one decode loop program alone
    alone = run(engine, plain)
    steps = engine.steps
    structured = [("q: ", SamplingParams(temperature=1.0, seed=i, max_tokens=40, structured=JSON)) for i in range(5)]
    mixed = run(engine, structured[:3] + plain + structured[3:])[3:6]
    assert engine.steps - steps > 24  # one token per step while a structured row runs
    for a, b in zip(alone, mixed):
        assert a.token_ids == b.token_ids and a.text == b.text
        assert [e["top"].keys() for e in a.logprobs] == [e["top"].keys() for e in b.logprobs]
        assert np.allclose([e["logprob"] for e in a.logprobs], [e["logprob"] for e in b.logprobs], atol=1e-5)


def test_a_prompt_cached_but_its_last_token_goes_straight_to_decode(engine):
    """Three requests of one 17-token prompt (page size 16), the last two following the first: they find 16 tokens
    cached and have one left, which only their first decode step computes (no prefill at all). With one seed, all
    three equal the first, whose prefill stopped one token short."""
    sp = SamplingParams(temperature=1.0, seed=5, max_tokens=40, structured=JSON)
    prompt = engine.tokenizer.encode("seventeen chars: ")
    assert len(prompt) == 17
    first = engine.add_request(prompt, sp)
    group = [first] + [engine.add_request(prompt, sp, follows=first) for _ in range(2)]
    hits = engine.allocator.cache.stats.hit_tokens
    done = {}
    while engine.has_unfinished():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert engine.allocator.cache.stats.hit_tokens - hits == 2 * 16
    assert done[first].finish_reason == "stop" and json.loads(done[first].text)
    assert all(done[r].token_ids == done[first].token_ids for r in group)


def test_bad_grammars_fail_their_request_alone(engine):
    ok = engine.add_request("fine ", SamplingParams(temperature=0.0, max_tokens=8))
    for spec, message in [(StructuredOutput("json_schema", '{"type": "nonsense"}'), "invalid json_schema"),
                          (StructuredOutput("regex", "(unclosed"), "invalid regex"),
                          (StructuredOutput("grammar", "start: nowhere"), "invalid grammar")]:
        with pytest.raises(RequestError, match=message):
            engine.add_request("bad ", SamplingParams(structured=spec))
    with pytest.raises(RequestError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured=JSON)
    stuck = engine.add_request("stuck ", SamplingParams(max_tokens=20, structured=JSON))
    good = engine.add_request("good ", SamplingParams(seed=1, max_tokens=40, structured=JSON))
    compiler, fill = engine.grammars.compiler(), engine.grammars.compiler().fill

    def no_token_for_stuck(bitmask, rows):  # a point where no token of the vocabulary fits
        fill(bitmask, rows)
        bitmask[[r for r, m in rows if m is engine.grammars._matchers.get(stuck)]] = 0

    compiler.fill = no_token_for_stuck
    done = {}
    while engine.has_unfinished():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert done[stuck].finish_reason == "error" and "allows no token" in done[stuck].error
    assert done[ok].finish_reason == "length" and len(done[ok].token_ids) == 8
    assert done[good].finish_reason == "stop" and json.loads(done[good].text)
    del compiler.fill
    assert not engine.grammars._matchers and engine.allocator.num_free == engine.allocator.num_pages


def test_structured_without_a_tokenizer_is_refused():
    with pytest.raises(RequestError, match="needs the model's tokenizer"):
        Grammars(None, 97).add("r", JSON)


def test_the_bitmask_is_filled_while_the_forward_runs(engine, monkeypatch):
    """A masked step dispatches its forward first and fills the bitmask after (the host works while the device
    does), then samples: every fill comes between a forward and its sampling, and the outputs still follow the
    grammar."""
    events = []

    def recording(name, program):
        def call(*args, **kwargs):
            events.append(name)
            return program(*args, **kwargs)
        return call

    monkeypatch.setattr(model_runner, "_paged_logits", recording("forward", model_runner._paged_logits))
    monkeypatch.setattr(model_runner, "_masked_sample", recording("sample", model_runner._masked_sample))
    monkeypatch.setattr(engine.grammars, "bitmask", recording("fill", engine.grammars.bitmask))
    outs = run(engine, [("person: ", SamplingParams(temperature=1.0, seed=7 + i, max_tokens=60, structured=JSON))
                        for i in range(2)])
    for out in outs:
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert events and events == ["forward", "fill", "sample"] * (len(events) // 3), events[:9]
