"""scripts/batch_eval.py against the test server and in process: outputs, errors, resume, summary."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("batch_eval", os.path.join(ROOT, "scripts", "batch_eval.py"))
batch_eval = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(batch_eval)

RECORDS = [{"id": "p0", "prompt": "hello there", "adapter": "alpha", "max_tokens": 5},
           {"id": "p1", "prompt": "hello there", "max_tokens": 5},
           {"id": "c0", "messages": [{"role": "user", "content": "hi"}], "adapter": "gamma", "max_tokens": 4},
           {"id": "s0", "prompt": "abc", "adapter": "beta", "temperature": 0.8, "seed": 3, "top_p": 0.9},
           {"prompt": "no id given", "max_tokens": 3}]


def _write(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _read(path):
    with open(path) as f:
        return {r["id"]: r for r in map(json.loads, f)}


def test_help_explains_the_formats(capsys):
    with pytest.raises(SystemExit):
        batch_eval.main(["--help"])
    out = capsys.readouterr().out
    for words in ("--server", "--adapter", "resumes", '"messages"', "latency_s", "summary"):
        assert words in out


def test_server_mode_errors_and_resume(served, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, RECORDS + [{"id": "bad", "prompt": "x", "adapter": "nope"}])
    code = batch_eval.main([str(inp), str(out), "--server", served.http_url, "--max-tokens", "6"])
    assert code == 1  # one record failed; the others ran
    rows = _read(out)
    assert set(rows) == {"p0", "p1", "c0", "s0", "4", "bad"}
    assert "adapter 'nope' is not loaded" in rows["bad"]["error"]
    assert rows["p0"]["text"] != rows["p1"]["text"] and rows["p0"]["completion_tokens"] <= 5
    assert rows["s0"]["completion_tokens"] <= 6 and all(rows[i]["latency_s"] > 0 for i in ("p0", "c0", "4"))
    assert "6 requests (1 failed, 0 skipped as done)" in capsys.readouterr().err
    _write(inp, RECORDS + [{"id": "new", "prompt": "more", "max_tokens": 2}])
    assert batch_eval.main([str(inp), str(out), "--server", served.http_url]) == 0
    assert "1 requests (0 failed, 5 skipped as done)" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 7


def test_in_process_equals_server(served, tmp_path):
    inp = tmp_path / "in.jsonl"
    greedy = [{k: v for k, v in r.items() if k != "adapter"} for r in RECORDS if "seed" not in r]
    _write(inp, greedy)
    loras = [f"--lora={n}={p}" for n, p in served.adapters.items()]
    assert batch_eval.main([str(inp), str(tmp_path / "local.jsonl"), "--model", served.model_dir, *loras,
                            "--adapter", "beta"]) == 0
    assert batch_eval.main([str(inp), str(tmp_path / "remote.jsonl"), "--server", served.http_url,
                            "--adapter", "beta"]) == 0
    local, remote = _read(tmp_path / "local.jsonl"), _read(tmp_path / "remote.jsonl")
    assert {i: r["text"] for i, r in local.items()} == {i: r["text"] for i, r in remote.items()}
    assert all(r["adapter"] == "beta" for r in local.values())


SAMPLED = [{"id": "pen", "prompt": "hello there", "adapter": "alpha", "max_tokens": 6, "repetition_penalty": 1.5,
            "presence_penalty": 0.5, "frequency_penalty": 0.5, "min_p": 0.05, "min_tokens": 2,
            "logit_bias": {"5": 3.0}, "stop_token_ids": [4]},
           {"id": "lp", "prompt": "abc", "max_tokens": 4, "logprobs": 2},
           {"id": "clp", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": 1},
           {"id": "n", "prompt": "abc", "adapter": "beta", "temperature": 1.0, "seed": 4, "n": 3, "max_tokens": 5},
           {"id": "best", "prompt": "xyz", "temperature": 1.0, "seed": 8, "n": 2, "best_of": 3, "max_tokens": 5},
           {"id": "json", "prompt": "abc", "temperature": 1.0, "seed": 2, "max_tokens": 30, "response_format": {
               "type": "json_schema", "json_schema": {"name": "n", "schema": {
                   "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}},
                   "required": ["n"], "additionalProperties": False}}}},
           {"id": "bad", "prompt": "abc", "presence_penalty": 5}]


def test_sampling_fields_logprobs_and_choices_in_process_and_against_the_server(served, tmp_path):
    inp = tmp_path / "in.jsonl"
    _write(inp, SAMPLED)
    loras = [f"--lora={n}={p}" for n, p in served.adapters.items()]
    assert batch_eval.main([str(inp), str(tmp_path / "local.jsonl"), "--model", served.model_dir, *loras]) == 1
    assert batch_eval.main([str(inp), str(tmp_path / "remote.jsonl"), "--server", served.http_url]) == 1
    local, remote = _read(tmp_path / "local.jsonl"), _read(tmp_path / "remote.jsonl")
    for rows in (local, remote):
        assert "presence_penalty must be a number in [-2, 2]" in rows["bad"]["error"]
        assert len(rows["lp"]["logprobs"]) == rows["lp"]["completion_tokens"] == 4
        assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in rows["lp"]["logprobs"])
        assert len(rows["clp"]["logprobs"]) == 3 and all(len(e["top_logprobs"]) == 1 for e in rows["clp"]["logprobs"])
        assert len(rows["n"]["choices"]) == 3 and rows["n"]["completion_tokens"] == 15
        assert rows["n"]["text"] == rows["n"]["choices"][0]["text"] and len(rows["best"]["choices"]) == 2
        assert rows["pen"]["completion_tokens"] >= 2
        assert set(json.loads(rows["json"]["text"])) == {"n"} and rows["json"]["finish_reason"] == "stop"
    for i in ("pen", "lp", "clp", "n", "best", "json"):
        assert local[i]["text"] == remote[i]["text"] and local[i].get("choices") == remote[i].get("choices"), i
    for i in ("lp", "clp"):
        for a, b in zip(local[i]["logprobs"], remote[i]["logprobs"]):
            assert a["token"] == b["token"] and a["top_logprobs"].keys() == b["top_logprobs"].keys()
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-5)
