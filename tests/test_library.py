"""The library API on a tiny random model: hub-cache names, load_model + LoraBank.from_peft + forward, LLM.score
against a float32 reference built on that route, chat templates, close and the context manager."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import write_adapter, write_model
from train.tiny import write_tiny_tokenizer

import jlora
from jlora.checkpoint.resolve import resolve_model_dir
from jlora.config import LoraBankConfig
from jlora.errors import ModelLoadError, RequestError, UnknownAdapterError
from jlora.scoring import plan_batches, sequence_logprobs

COMMIT_A, COMMIT_B = "a" * 40, "0123456789abcdef0123456789abcdef01234567"


def fake_hub(cache, repo: str, src: str, refs: dict[str, str]) -> dict[str, str]:
    """Lays `src`'s files out as huggingface_hub caches them: blobs, snapshot links to them, refs. Returns
    {commit: snapshot dir}."""
    folder = os.path.join(str(cache), "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(folder, "blobs"), exist_ok=True)
    snapshots = {}
    for commit in sorted(set(refs.values())):
        snap = os.path.join(folder, "snapshots", commit)
        os.makedirs(snap, exist_ok=True)
        for name in os.listdir(src):
            blob = os.path.join(folder, "blobs", f"{commit[:8]}-{name}")
            shutil.copyfile(os.path.join(src, name), blob)
            os.symlink(os.path.relpath(blob, snap), os.path.join(snap, name))
        snapshots[commit] = snap
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    for ref, commit in refs.items():
        with open(os.path.join(folder, "refs", ref), "w") as f:
            f.write(commit)
    return snapshots


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib")
    model = write_tiny_tokenizer(write_model(str(root / "m")))  # ChatML template in tokenizer_config.json
    a = write_adapter(str(root / "a"), r=4, seed=1, std=0.3)
    b = write_adapter(str(root / "b"), r=8, seed=2, std=0.3, targets=("q_proj", "v_proj", "down_proj"))
    fake_hub(root / "hub", "org/tiny", model, {"main": COMMIT_A})
    return {"root": root, "model": model, "a": a, "b": b, "hub": str(root / "hub")}


@pytest.fixture(scope="module")
def llm(files):
    with pytest.MonkeyPatch.context() as mp:  # LLM("org/name") from the hub cache
        mp.setenv("HF_HUB_CACHE", files["hub"])
        llm = jlora.LLM("org/tiny", adapters={"a": files["a"], "b": files["b"]}, progress=False,
                        bank=LoraBankConfig(buckets=(8, 16), slots=(2, 1)))
    yield llm
    llm.close()


def test_hub_cache_resolution(files, tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    default = fake_hub(tmp_path / "home/.cache/huggingface/hub", "org/tiny", files["model"], {"main": COMMIT_A})
    assert resolve_model_dir("org/tiny") == default[COMMIT_A]

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # HF_HOME/hub replaces the default
    with pytest.raises(ModelLoadError) as e:
        resolve_model_dir("org/tiny")
    assert os.path.join(str(tmp_path / "hf/hub"), "models--org--tiny", "refs", "main") in str(e.value)
    assert "HF_HOME" in str(e.value) and "never downloads" in str(e.value)
    home = fake_hub(tmp_path / "hf/hub", "org/tiny", files["model"], {"main": COMMIT_B, "v1": COMMIT_A})
    assert resolve_model_dir("org/tiny") == home[COMMIT_B]
    assert resolve_model_dir("org/tiny@v1") == home[COMMIT_A]
    assert resolve_model_dir(f"org/tiny@{COMMIT_A}") == home[COMMIT_A]  # a commit needs no ref
    with pytest.raises(ModelLoadError, match="refs.v2"):
        resolve_model_dir("org/tiny@v2")

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))  # HF_HUB_CACHE wins over HF_HOME
    with pytest.raises(ModelLoadError, match="HF_HUB_CACHE"):
        resolve_model_dir("org/tiny")
    partial = fake_hub(tmp_path / "cache", "org/tiny", files["model"], {"main": COMMIT_A})[COMMIT_A]
    os.remove(os.path.join(partial, "config.json"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_dir("org/tiny")

    write_model(str(tmp_path / "org" / "tiny"))  # a directory of the same spelling wins over the hub
    assert resolve_model_dir("org/tiny") == "org/tiny"


def test_load_model_and_bank_from_peft(files):
    model, tokenizer = jlora.load_model(files["model"], dtype="bfloat16")
    assert model.dtype == jnp.bfloat16 and model.config.num_layers == 2
    assert tokenizer.chat_template.startswith("{% for message")  # the directory's ChatML
    bank, slot = jlora.LoraBank.from_peft(model.config, {"a": files["a"], "b": files["b"]}, dtype=jnp.bfloat16)
    assert sorted(slot) == ["a", "b"] and sorted(slot.values()) == [0, 1]  # r=4 and r=8 share the bucket of 8
    assert bank.num_slots == 2 and [b.rank for b in bank.buckets] == [8]
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bank))


@pytest.fixture(scope="module")
def reference(files):
    """log p of each continuation token and the argmax before it, in float64 numpy, from load_model +
    LoraBank.from_peft + one forward of the whole unpadded sequences: no scoring code."""
    model, _ = jlora.load_model(files["model"])
    bank, slot = jlora.LoraBank.from_peft(model.config, {"a": files["a"], "b": files["b"]})

    def run(pairs, adapters):
        (T,) = {len(p) + len(c) for p, c in pairs}  # one length: one forward
        tokens = jnp.asarray([p + c for p, c in pairs], jnp.int32)
        ids = jnp.asarray([-1 if a is None else slot[a] for a in adapters])
        logits, _ = jlora.forward(model.params(), bank, tokens, jnp.broadcast_to(jnp.arange(T), tokens.shape), ids,
                                  jlora.KVCache.zeros(model.config, len(pairs), T), config=model.config)
        logits = np.asarray(logits, np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        out = []
        for b, (p, c) in enumerate(pairs):
            at = np.arange(len(p) - 1, T - 1)
            out.append((logp[b, at, c], logits[b, at].argmax(-1)))
        return out

    return run


def test_score_equals_float32_reference(llm, reference):
    rng = np.random.default_rng(1)
    pairs = [(rng.integers(0, 97, p).tolist(), rng.integers(0, 97, c).tolist()) for p, c in
             [(3, 8), (6, 5), (10, 1), (1, 10)]]
    pairs = pairs + pairs + pairs[:1]
    adapters = [None, "a", "b", "a", "b", None, None, "a", "a"]  # each pair under two adapters, or twice
    outs = llm.loglikelihood([p for p, _ in pairs], [c for _, c in pairs], adapter=adapters)
    ref = reference(pairs, adapters)
    for out, (lp, argmax), (p, c) in zip(outs, ref, pairs):
        np.testing.assert_allclose(out.token_logprobs, lp, rtol=1e-5, atol=1e-5)
        assert out.logprob == pytest.approx(lp.sum(), rel=1e-5, abs=1e-5)
        assert out.is_greedy == bool((argmax == c).all()) and (out.prompt_token_ids, out.token_ids) == (p, c)
    for i, j in [(0, 4), (1, 5), (2, 6), (0, 8)]:  # the same pair under the base and an adapter, or two adapters
        assert abs(outs[i].logprob - outs[j].logprob) > 1e-2
    assert outs[3].logprob == outs[7].logprob

    # Nine rows again (the same compiled program): a greedy continuation, a text pair and its token ids, and
    # pairs under other adapters than before, which must not change their values.
    compiled = sequence_logprobs._cache_size()
    tok = llm.tokenizer
    greedy = (pairs[6][0], [int(ref[6][1][0])])  # pair 6: prompt of 10 tokens, one continuation token, base
    text_ids = (tok.encode("add 1 and 2"), tok.encode(" arr"))
    prompts = [p for p, _ in pairs[:4]] + [greedy[0], "add 1 and 2 ", text_ids[0], pairs[0][0], pairs[1][0]]
    conts = [c for _, c in pairs[:4]] + [greedy[1], "arr", text_ids[1], pairs[0][1], pairs[1][1]]
    again = llm.loglikelihood(prompts, conts, adapter=["b"] * 4 + [None, "a", "a", None, None])
    assert sequence_logprobs._cache_size() == compiled
    assert [again[i].logprob for i in (2, 0, 7)] == pytest.approx([outs[2].logprob, outs[4].logprob,
                                                                   outs[0].logprob], abs=1e-5)
    assert again[4].is_greedy and not outs[6].is_greedy
    assert again[4].logprob >= outs[6].logprob  # the most likely token, at the same place
    # Text splits as lm-eval splits it: the prompt's trailing space joins the continuation.
    assert (again[5].prompt_token_ids, again[5].token_ids) == text_ids
    assert again[5].logprob == pytest.approx(again[6].logprob, abs=1e-6)
    assert llm.score(prompts, conts, adapter=["b"] * 4 + [None, "a", "a", None, None]) == [o.logprob for o in again]


def test_score_rejects_bad_pairs(llm):
    p, c = [1, 2, 3], [4, 5]
    with pytest.raises(UnknownAdapterError, match="'nope'"):
        llm.score([p], [c], adapter="nope")
    with pytest.raises(RequestError, match="continuation 1 is empty"):
        llm.score([p, p], [c, []])
    with pytest.raises(RequestError, match="continuation 0 is empty"):
        llm.score(["add 1"], [""])
    with pytest.raises(RequestError, match="prompt 0 has no tokens"):
        llm.score([[]], [c])
    with pytest.raises(RequestError, match="context length 128"):
        llm.score([p * 43], [c])
    with pytest.raises(RequestError, match=r"\[0, 97\)"):
        llm.score([p], [[97]])
    with pytest.raises(RequestError, match="both be text or both be token ids"):
        llm.score(["add"], [c])
    with pytest.raises(RequestError, match="2 prompts but 1 continuations"):
        llm.score([p, p], [c])


def test_plan_batches_hand_counted():
    # Longest first; T: the power of two at or above the longest row (>= 16); rows: a power of two, B * T <= 64.
    assert plan_batches([3, 40, 17, 5], token_budget=64, max_len=128) == [([1], 1, 64), ([2, 3], 2, 32),
                                                                        ([0], 1, 16)]
    assert plan_batches([5] * 5, token_budget=64, max_len=128) == [([0, 1, 2, 3], 4, 16), ([4], 1, 16)]
    assert plan_batches([100, 90], token_budget=64, max_len=100) == [([0], 1, 100), ([1], 1, 100)]


def test_close_and_context_manager(files, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    with pytest.raises(ModelLoadError, match="missing.jinja"):
        jlora.LLM(files["model"], chat_template=str(tmp_path / "missing.jinja"), progress=False)
    with jlora.LLM(files["model"], chat_template=str(template), progress=False) as llm:
        assert llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<hi>"
        arrays = jax.tree.leaves((llm.params, llm.engine.runner.cache, llm.store.bank))
    assert arrays and all(x.is_deleted() for x in arrays)
    llm.close()  # again: nothing happens
    for call in (lambda: llm.generate([[1, 2]]), lambda: llm.score([[1]], [[2]]), lambda: llm.params):
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_from_model_serves_the_same_as_the_path(files, llm):
    """`LLM.from_model` over `load_model`'s pair generates what the path-built LLM does (the base, greedy)."""
    model, tokenizer = jlora.load_model(files["model"])
    prompts = [[1, 2, 3, 4], [5, 6]]
    sp = jlora.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    with jlora.LLM.from_model(model, tokenizer) as other:
        got = [o.token_ids for o in other.generate(prompts, sampling=sp)]
        assert other.tokenizer is tokenizer and other.config == model.config
    assert got == [o.token_ids for o in llm.generate(prompts, sampling=sp)]
