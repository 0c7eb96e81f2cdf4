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
