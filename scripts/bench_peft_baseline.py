"""Baseline for the serving benchmark: Hugging Face transformers + PEFT serving S-LoRA's trace on the GPU.

This is the baseline S-LoRA measured against: one PEFT model holding many adapters, serving requests in batches
of a single adapter and switching adapters (`set_adapter`) between batches. The trace is the one
`bench_serving.py` replays (same seed, rate, lengths and popularity); requests are served in arrival order,
each batch taking up to `--max-batch` waiting requests of the oldest waiting request's adapter, generated with
`model.generate` (greedy, exactly the longest requested output in the batch). A batch's requests are credited
only their own requested output tokens. The run stops after `--time-limit` seconds; throughput is the tokens
of the finished requests over the elapsed time.

Weights are random bf16 (an 8B-shaped Llama); PEFT holds `--distinct` randomly initialised rank-16 adapters
on q, k, v and o, and trace adapter i uses PEFT adapter i % distinct (as bench_serving backs its registered
names with a few distinct files). Needs torch, transformers and peft (the GPU image has them).

  python3 scripts/bench_peft_baseline.py --out benchmarks/results/serving_peft_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving_workload import TARGETS, workload  # noqa: E402

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                max_position_embeddings=8192)


def build(args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    shape = dict(LLAMA_8B, num_hidden_layers=args.layers or LLAMA_8B["num_hidden_layers"])
    config = LlamaConfig(**shape, attn_implementation="sdpa")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    model.eval()
    lcfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=list(TARGETS), init_lora_weights=False)
    model = get_peft_model(model, lcfg, adapter_name="a0")
    for i in range(1, args.distinct):
        model.add_adapter(f"a{i}", lcfg)
    model.to(torch.bfloat16)
    return model


def serve(model, trace, args):
    import torch
    done, tokens, switches, batches = [], 0, 0, 0
    queue, nxt, current = [], 0, None
    t0 = time.perf_counter()
    while len(done) < len(trace):
        now = time.perf_counter() - t0
        if now > args.time_limit:
            break
        while nxt < len(trace) and trace[nxt][0] <= now:
            queue.append(nxt)
            nxt += 1
        if not queue:
            time.sleep(max(0.0, min(0.01, trace[nxt][0] - now)))
            continue
        adapter = trace[queue[0]][3]
        batch = [i for i in queue if trace[i][3] == adapter][:args.max_batch]
        queue = [i for i in queue if i not in batch]
        name = f"a{adapter % args.distinct}"
        if name != current:
            model.set_adapter(name)
            current, switches = name, switches + 1
        longest = max(len(trace[i][1]) for i in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):  # left padding, as batched generation needs
            p = trace[i][1]
            ids[row, longest - len(p):] = torch.tensor(p)
            mask[row, longest - len(p):] = 1
        n_out = max(trace[i][2] for i in batch)
        with torch.no_grad():
            model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=n_out,
                           min_new_tokens=n_out, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        batches += 1
        for i in batch:
            done.append(i)
            tokens += trace[i][2]
        print(f"  batch {batches}: adapter {adapter} x{len(batch)}, {n_out} tokens, t={time.perf_counter() - t0:.1f}s",
              flush=True)
    wall = time.perf_counter() - t0
    return {"requests_finished": len(done), "requests_in_trace": len(trace), "wall_s": wall,
            "req_per_s": len(done) / wall, "tok_per_s": tokens / wall, "batches": batches,
            "adapter_switches": switches, "stopped_by_time_limit": len(done) < len(trace)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=160, help="trace length (as bench_serving.py)")
    ap.add_argument("--rate", type=float, default=20.0, help="mean arrivals per second (as bench_serving.py)")
    ap.add_argument("--alpha", type=float, default=1.0, help="numpy.random.power exponent of adapter popularity")
    ap.add_argument("--adapters", type=int, default=100, help="registered adapters in the trace")
    ap.add_argument("--distinct", type=int, default=16, help="distinct PEFT adapters behind them")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=0, help="override the layer count (0: 32, the 8B shape)")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--time-limit", type=float, default=150.0, help="stop serving after this many seconds")
    ap.add_argument("--out", default="benchmarks/results/serving_peft_h100.json")
    args = ap.parse_args()
    import peft
    import torch
    import transformers
    t = time.perf_counter()
    model = build(args)
    print(f"built the PEFT model with {args.distinct} adapters in {time.perf_counter() - t:.1f}s", flush=True)
    trace = workload(args.requests, args.adapters, args.rate, args.alpha, (8, 512), LLAMA_8B["vocab_size"], seed=1)
    warm = [(0.0, p, 4, a) for _, p, _, a in trace[:2]]
    serve(model, warm, argparse.Namespace(**{**vars(args), "time_limit": 1e9}))  # CUDA and kernel warm-up
    result = serve(model, trace, args)
    result.update(device=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                  peft=peft.__version__, adapters=args.adapters, distinct=args.distinct, rank=args.rank,
                  layers=args.layers or LLAMA_8B["num_hidden_layers"], max_batch=args.max_batch,
                  workload={"requests": args.requests, "rate": args.rate, "alpha": args.alpha, "seed": 1},
                  command="python3 " + " ".join(sys.argv))
    print(json.dumps(result, indent=2))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
