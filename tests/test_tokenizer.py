"""Incremental detokenization against full decoding, on the default model's tokenizer."""

import pytest

from jlora.checkpoint.resolve import resolve_model_dir
from jlora.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = ["Hello, world! ", "  leading spaces\nand lines", "naïve café — déjà vu", "日本語のテキスト",
         "emoji 🎉🚀 mixed 👩‍👩‍👧", "Ω≈ç√∫ and combining e\u0301"]


@pytest.fixture(scope="session")
def tokenizer():
    return Tokenizer.from_dir(resolve_model_dir("smollm2-135m-instruct", progress=False))


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(tokenizer, text):
    prompt = tokenizer.encode("Q: ")
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.step([i]) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_round_trip_and_special_tokens(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_id in tokenizer.stop_ids
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tokenizer.backend.token_to_id("<|im_start|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"
