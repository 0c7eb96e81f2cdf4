"""Structured output on the host (`jlora.structured`) with the default model's real BPE vocabulary: every walk that
follows the masks ends in text that parses and validates, masks are exact against an independent check, and bad
specifications fail with their reason."""

import json
import os
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from jlora.checkpoint.resolve import DEFAULT_MODEL, resolve_model_dir
from jlora.errors import RequestError
from jlora.structured import GrammarCompiler, StructuredOutput, apply_bitmask, unpack
from jlora.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
    "ok": {"type": "boolean"}},
    "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def setup():
    path = resolve_model_dir(DEFAULT_MODEL, progress=False)
    tok = Tokenizer.from_dir(path)
    vocab = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
    return tok, vocab, GrammarCompiler(tok, vocab, tok.stop_ids)


def _walk(compiler, spec, rng, max_steps=400):
    """Samples uniformly among the allowed tokens until the grammar ends (or end of sequence is drawn)."""
    m, out = compiler.matcher(spec), []
    for _ in range(max_steps):
        allowed = np.flatnonzero(unpack(m.mask()[None], compiler.vocab_size)[0])
        assert allowed.size, "a mask allowed nothing"
        t = int(rng.choice(allowed))
        if t in set(compiler.tokenizer.eos_tokens):
            assert m.accepting, "end of sequence was allowed before the output was complete"
            return out
        assert m.advance(t), m.error
        out.append(t)
        if m.done:
            return out
    pytest.fail(f"no end after {max_steps} tokens")


def test_100_random_walks_under_a_schema_parse_and_validate(setup):
    tok, _, compiler = setup
    rng = np.random.default_rng(0)
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    texts = [tok.decode(_walk(compiler, spec, rng)) for _ in range(100)]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 50  # the walks differ: the masks allow many tokens, not one path


def test_json_object_takes_any_object_and_only_objects(setup):
    tok, vocab, compiler = setup
    spec = StructuredOutput("json_object")
    text = '{"a": [1, 2.5, {"b": null}], "c": "d\\n", "e": true}'
    m = compiler.matcher(spec)
    for t in tok.encode(text, add_special_tokens=False):
        assert m.advance(t), m.error
    assert m.accepting
    first = unpack(compiler.matcher(spec).mask()[None], vocab)[0]
    assert first[tok.encode("{", add_special_tokens=False)[0]]
    for other in ("[", "1", '"', " {"):
        assert not first[tok.encode(other, add_special_tokens=False)[0]], other


def test_regex_walks_match(setup):
    tok, _, compiler = setup
    rng = np.random.default_rng(2)
    pattern = r"(yes|no)-[0-9]{2,3}!"
    for _ in range(30):
        assert re.fullmatch(pattern, tok.decode(_walk(compiler, StructuredOutput("regex", pattern), rng)))


def test_the_first_mask_of_a_digits_regex_is_exactly_the_digit_tokens(setup):
    """Checked against every vocabulary entry decoded on its own: allowed iff it is all ASCII digits."""
    tok, vocab, compiler = setup
    got = set(np.flatnonzero(unpack(compiler.matcher(StructuredOutput("regex", "[0-9]+")).mask()[None], vocab)[0]))
    want = {i for i in range(tok.backend.get_vocab_size()) if re.fullmatch(r"[0-9]+", tok.decode([i]))}
    assert want and got == want


def test_bad_specifications_fail_with_their_reason(setup):
    _, _, compiler = setup
    with pytest.raises(RequestError, match="invalid json_schema"):
        compiler.grammar(StructuredOutput("json_schema", "{not json"))
    with pytest.raises(RequestError, match="a JSON schema must be a JSON object"):
        compiler.grammar(StructuredOutput("json_schema", "[1, 2]"))
    with pytest.raises(RequestError, match="invalid regex"):
        compiler.grammar(StructuredOutput("regex", "(unclosed"))
    with pytest.raises(RequestError, match="invalid grammar"):
        compiler.grammar(StructuredOutput("grammar", "start: undefined_rule"))
    with pytest.raises(RequestError, match="must be one of json_object, json_schema, regex, grammar"):
        StructuredOutput("xml")
    with pytest.raises(RequestError, match="needs its schema"):
        StructuredOutput("json_schema")
    with pytest.raises(RequestError, match="larger than 256 KiB"):
        StructuredOutput("regex", "a" * (256 * 1024 + 1))


def test_apply_bitmask_against_a_bit_by_bit_reference():
    rng = np.random.default_rng(3)
    B, V = 3, 77
    logits = rng.standard_normal((B, V)).astype(np.float32)
    mask = rng.integers(-2**31, 2**31, (B, (V + 31) // 32), dtype=np.int64).astype(np.int32)
    got = np.asarray(apply_bitmask(jnp.asarray(logits), jnp.asarray(mask)))
    for b in range(B):
        for i in range(V):
            allowed = (int(mask[b, i // 32]) & 0xFFFFFFFF) >> (i % 32) & 1
            assert got[b, i] == (logits[b, i] if allowed else -np.inf)


def test_a_batch_of_masks_filled_in_parallel_equals_each_alone(setup):
    tok, _, compiler = setup
    specs = [StructuredOutput("json_schema", json.dumps(SCHEMA)), StructuredOutput("regex", "[0-9]+"),
             StructuredOutput("json_object")]
    matchers = [compiler.matcher(s) for s in specs]
    for t in tok.encode('{"name": "ab', add_special_tokens=False):
        assert matchers[0].advance(t)
    bitmask = np.full((5, compiler.words), -1, np.int32)
    compiler.fill(bitmask, [(4, matchers[0]), (1, matchers[1]), (2, matchers[2])])
    for row, m in ((4, matchers[0]), (1, matchers[1]), (2, matchers[2])):
        assert np.array_equal(bitmask[row], m.mask())
    assert (bitmask[[0, 3]] == -1).all()  # rows without a matcher are left alone
