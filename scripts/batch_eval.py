"""Batch evaluation: completes every record of a JSONL file, in process or against a running `jlora serve`.

Run with --help for the formats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from tqdm import tqdm

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "seed", "stop",
                   "stop_token_ids", "ignore_eos", "presence_penalty", "frequency_penalty", "repetition_penalty",
                   "logit_bias", "logprobs", "n", "best_of", "response_format")

EPILOG = """\
input (JSONL, one request per line):
  {"id": "q1", "prompt": "The capital of France is", "adapter": "french", "max_tokens": 32}
  {"id": "q2", "messages": [{"role": "user", "content": "Hello!"}], "temperature": 0.7, "seed": 1}
  Each record has "prompt" (text) or "messages" (chat, rendered with the model's chat template); optional
  "id" (default: the line number), "adapter" (default: --adapter; none or "base" = the base model) and
  sampling fields (vLLM's meanings): temperature, top_p, top_k, min_p, max_tokens, min_tokens, seed, stop,
  stop_token_ids, ignore_eos, presence_penalty, frequency_penalty, repetition_penalty, logit_bias ({"id": bias}),
  logprobs (k: each output token's logprob and the k most likely), n, best_of and response_format (OpenAI's:
  {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema"}}).

output (JSONL, one line per record, in completion order):
  {"id": "q1", "adapter": "french", "text": "...", "prompt_tokens": 7, "completion_tokens": 32,
   "finish_reason": "length", "latency_s": 0.41}
  With logprobs, "logprobs": [{"token": "...", "logprob": -0.2, "top_logprobs": {"...": -0.2, ...}}, ...].
  With n > 1, "choices": [{"text", "finish_reason"(, "logprobs")}, ...] (best first with best_of); text and
  finish_reason are the first choice's, completion_tokens counts them all.
  A record that fails gets {"id", "adapter", "error"} instead; the rest go on. Records whose id is already in
  OUTPUT are skipped, so an interrupted run resumes where it stopped (delete a line to redo it).

examples:
  python scripts/batch_eval.py in.jsonl out.jsonl --lora pirate=adapters/demo/pirate --adapter pirate
  python scripts/batch_eval.py in.jsonl out.jsonl --server http://127.0.0.1:8000
"""


def _lora(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora expects NAME=PATH, got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="batch_eval.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Complete every request of a JSONL file with jlora, in this process (default: loads --model "
                    "and the --lora adapters) or against a running `jlora serve` (--server); writes text, token "
                    "counts and per-request latency as JSONL, shows a progress bar and ends with a throughput "
                    "summary.")
    p.add_argument("input", help="JSONL file of requests")
    p.add_argument("output", help="JSONL file of results (appended to; ids already there are skipped)")
    p.add_argument("--adapter", default=None, help="adapter for records that name none (default: the base model)")
    p.add_argument("--server", default=None, metavar="URL",
                   help="HTTP address of a running `jlora serve`, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight at once (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=128,
                   help="max_tokens of records that set none (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="temperature of records that set none (default: %(default)s, greedy)")
    g = p.add_argument_group("in-process engine (ignored with --server)")
    g.add_argument("--model", default="smollm2-135m-instruct", help="model name, .gguf file or HF directory")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--lora", action="append", default=[], type=_lora, metavar="NAME=PATH",
                   help="register an adapter (repeatable)")
    g.add_argument("--max-loras-per-batch", type=int, default=4, help="device slots per rank bucket")
    g.add_argument("--max-num-seqs", type=int, default=64, help="sequences per batch")
    return p


def read_requests(path: str, done: set[str]) -> tuple[list[dict], int]:
    """(records still to run, records skipped because their id is in `done`)."""
    todo, skipped = [], 0
    with open(path) as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"batch_eval: {path}:{n + 1}: malformed JSON: {e}")
            if not isinstance(rec, dict) or ("prompt" in rec) == ("messages" in rec):
                raise SystemExit(f"batch_eval: {path}:{n + 1}: a record needs exactly one of prompt or messages")
            rec["id"] = str(rec.get("id", n))
            if rec["id"] in done:
                skipped += 1
            else:
                todo.append(rec)
    return todo, skipped


def done_ids(path: str) -> set[str]:
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {str(json.loads(line)["id"]) for line in f if line.strip()}


def sampling_of(rec: dict, args) -> dict:
    fields = {k: rec[k] for k in SAMPLING_FIELDS if k in rec}
    fields.setdefault("max_tokens", args.max_tokens)
    fields.setdefault("temperature", args.temperature)
    return fields


class InProcess:
    """The engine in this process, through the same validation as the servers."""

    def __init__(self, args):
        from jlora.config import RuntimeConfig
        from jlora.serve.server import ServeConfig, build_service

        self.service = build_service(ServeConfig(model=args.model, dtype=args.dtype, loras=tuple(args.lora),
                                                 max_loras_per_batch=args.max_loras_per_batch,
                                                 max_num_seqs=args.max_num_seqs, runtime=RuntimeConfig.from_env()))

    async def complete(self, rec: dict, adapter: str | None, fields: dict) -> dict:
        from jlora.serve import choices, structured_fields
        from jlora.serve.protocol import check_output, prepare, render_chat

        info = self.service.info
        prompt = render_chat(info, rec["messages"]) if "messages" in rec else rec["prompt"]
        fields = dict(fields)
        k = fields.pop("logprobs", None)
        structured = structured_fields.response_format(fields.pop("response_format", None))
        completion = prepare(info, fields, prompt=prompt, adapter=info.adapter_for(adapter), logprobs=k,
                             structured=structured)
        streams = (await choices.start_choices(self.service, [completion]))[0]
        outs = [await s.result() for s in streams]
        for out in outs:
            check_output(out)
        picked = choices.best(outs, completion.sampling.n, choices.PromptGroup())

        def lps(out):
            text = lambda t: choices.token_text(info.tokenizer, t)  # noqa: E731
            return [{"token": text(e["token"]), "logprob": e["logprob"],
                     "top_logprobs": {text(i): lp for i, lp in e["top"].items()}} for e in out.logprobs]

        return result([{"text": o.text, "finish_reason": o.finish_reason,
                        **({"logprobs": lps(o)} if k is not None else {})} for o in picked],
                      len(completion.prompt_ids), sum(len(o.token_ids) for o in picked))

    async def close(self):
        await asyncio.to_thread(self.service.engine.shutdown)


class Remote:
    """A running `jlora serve`, through its OpenAI-compatible HTTP API."""

    def __init__(self, url: str, concurrency: int):
        import httpx

        self.client = httpx.AsyncClient(base_url=url.rstrip("/"), timeout=None,
                                        limits=httpx.Limits(max_connections=concurrency))

    async def complete(self, rec: dict, adapter: str | None, fields: dict) -> dict:
        chat = "messages" in rec
        fields = dict(fields)
        k = fields.get("logprobs")
        if chat and k is not None:  # chat asks with a flag and a count
            fields.update(logprobs=True, top_logprobs=k)
        body = {"model": adapter or "base", **fields, **({"messages": rec["messages"]} if chat else
                                                          {"prompt": rec["prompt"]})}
        r = await self.client.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
        data = r.json()
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {data.get('error', {}).get('message', r.text)}")

        def lps(choice):
            lp = choice["logprobs"]
            if chat:
                return [{"token": c["token"], "logprob": c["logprob"],
                         "top_logprobs": {t["token"]: t["logprob"] for t in c["top_logprobs"]}} for c in lp["content"]]
            # legacy top_logprobs also hold the chosen token (as vLLM's): keep the k most likely, as in process
            return [{"token": t, "logprob": v, "top_logprobs": dict(sorted(top.items(), key=lambda x: -x[1])[:k])}
                    for t, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])]

        return result([{"text": c["message"]["content"] if chat else c["text"], "finish_reason": c["finish_reason"],
                        **({"logprobs": lps(c)} if k is not None else {})}
                       for c in data["choices"]], data["usage"]["prompt_tokens"], data["usage"]["completion_tokens"])

    async def close(self):
        await self.client.aclose()


def result(choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    """A record's output fields from its choices ({text, finish_reason, logprobs?}, best first)."""
    first = choices[0]
    out = {"text": first["text"], "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "finish_reason": first["finish_reason"]}
    if "logprobs" in first:
        out["logprobs"] = first["logprobs"]
    if len(choices) > 1:
        out["choices"] = choices
    return out


async def run(args, todo: list[dict], out_file) -> tuple[list[dict], float]:
    """Runs `todo`, appending each result to `out_file` as it finishes. Returns (results, seconds), timed from
    when the backend is ready (model loading excluded)."""
    backend = Remote(args.server, args.concurrency) if args.server else InProcess(args)
    t0 = time.perf_counter()
    limit = asyncio.Semaphore(args.concurrency)
    results = []
    bar = tqdm(total=len(todo), unit="req", desc="batch_eval", file=sys.stderr)

    async def one(rec):
        adapter = rec.get("adapter", args.adapter)
        async with limit:
            t0 = time.perf_counter()
            try:
                res = {"id": rec["id"], "adapter": adapter,
                       **await backend.complete(rec, adapter, sampling_of(rec, args)),
                       "latency_s": round(time.perf_counter() - t0, 4)}
            except Exception as e:  # noqa: BLE001 - one bad record never stops the batch
                res = {"id": rec["id"], "adapter": adapter, "error": f"{type(e).__name__}: {e}"}
        out_file.write(json.dumps(res, ensure_ascii=False) + "\n")
        out_file.flush()
        results.append(res)
        bar.update(1)

    try:
        await asyncio.gather(*(one(r) for r in todo))
    finally:
        bar.close()
        await backend.close()
    return results, time.perf_counter() - t0


def summary(results: list[dict], wall_s: float, skipped: int) -> str:
    ok = [r for r in results if "error" not in r]
    lat = sorted(r["latency_s"] for r in ok)
    pct = {q: lat[min(len(lat) - 1, int(q / 100 * len(lat)))] if lat else 0.0 for q in (50, 90, 99)}
    tokens = sum(r["completion_tokens"] for r in ok)
    return (f"{len(results)} requests ({len(results) - len(ok)} failed, {skipped} skipped as done) in "
            f"{wall_s:.1f} s: {len(results) / max(wall_s, 1e-9):.2f} req/s, {tokens} completion tokens, "
            f"{tokens / max(wall_s, 1e-9):.1f} tok/s; latency p50 {pct[50]:.2f} s, p90 {pct[90]:.2f} s, "
            f"p99 {pct[99]:.2f} s")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    todo, skipped = read_requests(args.input, done_ids(args.output))
    with open(args.output, "a") as out_file:
        results, wall_s = asyncio.run(run(args, todo, out_file)) if todo else ([], 0.0)
    print(summary(results, wall_s, skipped), file=sys.stderr)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
