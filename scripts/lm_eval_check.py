"""lm-evaluation-harness as a client of `jlora serve`: its log-likelihoods against jlora's own `LLM.loglikelihood`.

Runs lm_eval's `local-completions` model (offline: a local task, tests/fixtures/lm_eval/jlora_mc.yaml over
mc.jsonl, and the served model's own tokenizer.json) against `jlora serve` with the default model, for the base and
one demo adapter, each with text prompts (batch 1: `"prompt": "<context + continuation>"`) and with token ids
(batch 4: `"prompt": [[ids], ...]`). A recording proxy between the two keeps the request bodies lm_eval sends. The
server is then stopped and the same (context, continuation) pairs are scored in process by `LLM.loglikelihood`.
Prints a table and writes benchmarks/results/lm_eval_<platform>.json.

lm_eval lives in its own throwaway venv (never a jlora dependency), made on first use:
  $LM_EVAL_VENV (default /tmp/lmeval-venv): python3.12 -m venv; pip install lm_eval[api] transformers (no torch)

Usage: .venv/bin/python scripts/lm_eval_check.py [--adapter french] [--out PATH]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_DIR = "tests/fixtures/lm_eval"
PINS = ("lm_eval[api]==0.4.13", "transformers==5.24.0")
MODES = {"text": ("False", 1), "tokens": ("True", 4)}  # tokenized_requests, batch_size


def ensure_venv(venv: str) -> str:
    exe = os.path.join(venv, "bin", "lm_eval")
    if not os.path.exists(exe):
        subprocess.run([sys._base_executable, "-m", "venv", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q", *PINS], check=True)
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_proxy(target: str, log: list) -> ThreadingHTTPServer:
    """A loopback HTTP proxy to `target` that appends every POST's JSON body to `log`."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                log.append(json.loads(body))
            req = urllib.request.Request(target + self.path, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    status, data = r.status, r.read()
            except urllib.error.HTTPError as e:
                status, data = e.code, e.read()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def start_serve(adapter: str, port: int, log_path: str) -> subprocess.Popen:
    cmd = [os.path.join(ROOT, ".venv", "bin", "jlora"), "serve", "--lora", f"{adapter}=adapters/demo/{adapter}",
           "--max-loras-per-batch", "2", "--max-lora-rank", "8", "--http-port", str(port),
           "--grpc-port", str(free_port())]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    end = time.monotonic() + 600
    while time.monotonic() < end and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(2)
    proc.kill()
    raise SystemExit(f"jlora serve did not become healthy: {' '.join(cmd)}\n{open(log_path).read()[-4000:]}")


def run_lm_eval(exe: str, model: str, mode: str, url: str, tokenizer: str, out: str) -> dict:
    """One lm_eval run; returns its results and per-sample (context, continuation, loglikelihood, is_greedy)."""
    tokenized, batch = MODES[mode]
    args = [exe, "--model", "local-completions", "--model_args",
            f"model={model},base_url={url}/v1/completions,tokenizer={tokenizer},tokenizer_backend=huggingface,"
            f"tokenized_requests={tokenized}", "--batch_size", str(batch), "--tasks", "jlora_mc",
            "--include_path", TASK_DIR, "--log_samples", "--output_path", out]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_HOME=os.path.join(out, "hf_home"))
    t0 = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"lm_eval failed ({done.returncode}):\n{done.stderr[-4000:]}")
    with open(glob.glob(os.path.join(out, "*", "results_*.json"))[0]) as f:
        results = json.load(f)
    samples = []
    with open(glob.glob(os.path.join(out, "*", "samples_jlora_mc_*.jsonl"))[0]) as f:
        for rec in map(json.loads, f):
            for i, (arg, (ll, greedy)) in enumerate(zip(rec["arguments"].values(), rec["filtered_resps"])):
                samples.append({"doc_id": rec["doc_id"], "choice": i, "context": arg["arg_0"],
                                "continuation": arg["arg_1"], "lm_eval": float(ll), "is_greedy": greedy == "True"})
    metrics = results["results"]["jlora_mc"]
    return {"seconds": round(time.perf_counter() - t0, 1), "acc": metrics["acc,none"],
            "acc_norm": metrics["acc_norm,none"], "lm_eval_version": results.get("lm_eval_version"),
            "command": " ".join(args[:2] + ["local-completions", "--model_args", args[4]] + args[5:]),
            "samples": samples}


def accuracies(samples: list[dict], key: str) -> tuple[float, float]:
    """lm_eval's acc and acc_norm (log-likelihood over the choice's length in characters) from per-choice scores."""
    docs = {}
    for s in samples:
        docs.setdefault(s["doc_id"], []).append(s)
    with open(os.path.join(ROOT, TASK_DIR, "mc.jsonl")) as f:
        task = {r["id"]: r for r in map(json.loads, f)}
    acc = norm = 0
    for doc_id, scored in docs.items():
        doc = task[doc_id]
        acc += max(scored, key=lambda s: s[key])["choice"] == doc["answer"]
        norm += max(scored, key=lambda s: s[key] / len(doc["choices"][s["choice"]]))["choice"] == doc["answer"]
    return acc / len(docs), norm / len(docs)


def compare(llm, run: dict, adapter: str | None, bodies: list[dict]) -> dict:
    samples = run["samples"]
    outs = llm.loglikelihood([s["context"] for s in samples], [s["continuation"] for s in samples], adapter=adapter)
    for s, o in zip(samples, outs):
        s["jlora"], s["jlora_is_greedy"] = o.logprob, o.is_greedy
    sent = [p for b in bodies for p in (b["prompt"] if isinstance(b["prompt"], list) else [b["prompt"]])]
    ours = [o.prompt_token_ids + o.token_ids if run["mode"] == "tokens" else s["context"] + s["continuation"]
            for s, o in zip(samples, outs)]
    acc, acc_norm = accuracies(samples, "jlora")
    return {"max_abs_diff": max(abs(s["lm_eval"] - s["jlora"]) for s in samples),
            "greedy_agree": sum(s["is_greedy"] == s["jlora_is_greedy"] for s in samples),
            "prompts_equal_jlora_pairs": sorted(map(json.dumps, sent)) == sorted(map(json.dumps, ours)),
            "jlora_acc": acc, "jlora_acc_norm": acc_norm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="french", help="a demo adapter under adapters/demo")
    parser.add_argument("--venv", default=os.environ.get("LM_EVAL_VENV", "/tmp/lmeval-venv"))
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/lm_eval_<platform>.json)")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from jlora import LLM
    from jlora.checkpoint.resolve import DEFAULT_MODEL, resolve_model_dir

    exe = ensure_venv(args.venv)
    tokenizer = resolve_model_dir(DEFAULT_MODEL)  # the converted directory: the tokenizer.json jlora itself reads
    port = free_port()
    bodies: list[dict] = []
    proxy = start_proxy(f"http://127.0.0.1:{port}", bodies)
    log_dir = tempfile.mkdtemp(prefix="lm_eval_check-")
    proc = start_serve(args.adapter, port, os.path.join(log_dir, "serve.log"))
    runs = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for model in (DEFAULT_MODEL, args.adapter):
                for mode in MODES:
                    start = len(bodies)
                    url = f"http://127.0.0.1:{proxy.server_address[1]}"
                    run = run_lm_eval(exe, model, mode, url, tokenizer, os.path.join(tmp, f"{model}_{mode}"))
                    runs.append({"model": model, "mode": mode, "bodies": bodies[start:], **run})
                    print(f"lm_eval {model} {mode}: {len(run['samples'])} loglikelihoods in {run['seconds']} s",
                          file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
        proxy.shutdown()
    llm = LLM(adapters={args.adapter: os.path.join(ROOT, "adapters", "demo", args.adapter)}, progress=False)
    rows = []
    for run in runs:
        found = compare(llm, run, None if run["model"] == DEFAULT_MODEL else run["model"], run["bodies"])
        rows.append({k: v for k, v in run.items() if k != "bodies"} | found | {
            "requests": len(run["bodies"]), "request_fields": sorted({k for b in run["bodies"] for k in b}),
            "first_body": run["bodies"][0]})
    print(f"{'model':<24}{'prompts':<8}{'requests':>9}{'pairs':>7}{'max |diff|':>12}{'greedy ok':>10}"
          f"{'acc lm_eval/jlora':>19}{'acc_norm':>12}{'ids equal':>10}")
    for r in rows:
        print(f"{r['model']:<24}{r['mode']:<8}{r['requests']:>9}{len(r['samples']):>7}{r['max_abs_diff']:>12.2e}"
              f"{r['greedy_agree']:>10}{r['acc']:>10.3f}/{r['jlora_acc']:.3f}{r['acc_norm']:>7.3f}/"
              f"{r['jlora_acc_norm']:.3f}{str(r['prompts_equal_jlora_pairs']):>8}")
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"lm_eval_{jax.default_backend()}.json")
    report = {"what": "lm_eval local-completions against jlora serve vs LLM.loglikelihood",
              "device": jax.devices()[0].device_kind,
              "model": DEFAULT_MODEL, "adapter": args.adapter, "task": f"{TASK_DIR}/jlora_mc.yaml",
              "lm_eval_venv": list(PINS), "max_abs_diff": max(r["max_abs_diff"] for r in rows), "runs": rows}
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
