"""Training data: the loss mask covers completions / assistant turns only, and the data order is stateless."""

import jax.numpy as jnp
import numpy as np
import pytest

from jlora.train import data
from jlora.train.step import masked_nll
from train.tiny import tiny_tokenizer


def test_mask_from_segments_marks_only_target_segments():
    mask = data.mask_from_segments([3, 2, 4, 1], [False, True, False, True])
    assert mask.tolist() == [False] * 3 + [True] * 2 + [False] * 4 + [True]
    assert data.mask_from_segments([], []).shape == (0,)


def test_masked_nll_ignores_prompt_tokens():
    rng = np.random.default_rng(0)
    B, T, V = 2, 9, 11
    logits = jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    mask = np.zeros((B, T), bool)
    mask[0, 5:8], mask[1, 3:] = True, True
    loss, count = masked_nll(logits, tokens, jnp.asarray(mask))
    assert int(count) == 3 + 6
    # Hand-computed: mean over targets of -log p(tokens[t] | logits[t-1]).
    logp = np.asarray(logits) - np.log(np.exp(np.asarray(logits)).sum(-1, keepdims=True))
    want = np.mean([-logp[b, t - 1, int(tokens[b, t])] for b in range(B) for t in range(1, T) if mask[b, t]])
    assert abs(float(loss) - want) < 1e-5
    # Anything at prompt positions (the logits predicting them, and the prompt tokens themselves) is ignored.
    predicts_prompt = np.zeros((B, T), bool)
    predicts_prompt[:, :-1] = ~mask[:, 1:]
    noisy = jnp.where(jnp.asarray(predicts_prompt)[..., None], logits + 50 * rng.normal(size=logits.shape), logits)
    other_prompt = jnp.where(jnp.asarray(mask), tokens, (tokens + 1) % V)
    assert abs(float(masked_nll(noisy, tokens, jnp.asarray(mask))[0]) - float(loss)) < 1e-6
    loss2 = masked_nll(logits, other_prompt, jnp.asarray(mask))[0]
    assert abs(float(loss2) - float(loss)) < 1e-6
    assert float(masked_nll(logits, tokens, jnp.zeros((B, T), bool))[0]) == 0.0


def test_chat_record_masks_assistant_turns_only():
    tok = tiny_tokenizer()
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "arr"},
            {"role": "user", "content": "more"}, {"role": "assistant", "content": "yo ho"}]
    ex = data.tokenize_record({"messages": msgs}, tok)
    assert tok.decode(ex.ids) == tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert tok.decode(ex.ids[ex.mask]) == "arr<|im_end|>\nyo ho<|im_end|>\n"
    # The context before the first answer is exactly the served chat prompt.
    prompt = tok.encode(tok.apply_chat_template(msgs[:1], add_generation_prompt=True))
    first = int(np.argmax(ex.mask))
    assert ex.ids[:first].tolist() == prompt and not ex.mask[:first].any()


def test_prompt_completion_record_masks_completion_and_eos():
    tok = tiny_tokenizer()
    ex = data.tokenize_record({"prompt": "Q: add 1 and 2\nA:", "completion": " arr 3"}, tok)
    n_prompt = len(tok.encode("Q: add 1 and 2\nA:"))
    assert not ex.mask[:n_prompt].any() and ex.mask[n_prompt:].all()
    assert tok.decode(ex.ids[ex.mask]) == " arr 3<|im_end|>"


def test_build_dataset_truncates_pads_and_drops(tmp_path):
    tok = tiny_tokenizer()
    recs = [{"prompt": "abc", "completion": "de"}, {"prompt": "a" * 40, "completion": "late"}]
    ds = data.build_dataset(recs, tok, seq_len=8, pad_id=0)
    assert len(ds) == 1 and ds.dropped == 1 and ds.truncated == 1
    assert ds.tokens.shape == (1, 8) and ds.lengths.tolist() == [6]
    assert ds.mask[0].tolist() == [False] * 3 + [True] * 3 + [False] * 2
    with pytest.raises(data.DataError, match="record 1"):
        data.build_dataset([{"prompt": "x"}], tok, seq_len=8)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(data.DataError, match=":2:"):
        data.read_jsonl(str(bad))


def test_batch_indices_are_epochs_of_permutations_and_stateless():
    n, bs = 10, 4
    seq = np.concatenate([data.batch_indices(n, bs, s, seed=3) for s in range(5)])  # 20 = two epochs
    assert sorted(seq[:10].tolist()) == list(range(10)) and sorted(seq[10:].tolist()) == list(range(10))
    assert data.batch_indices(n, bs, 3, seed=3).tolist() == seq[12:16].tolist()
    assert data.batch_indices(n, bs, 0, seed=4).tolist() != data.batch_indices(n, bs, 0, seed=3).tolist()
