"""The `jlora` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time

from jlora import compile_cache, distributed
from jlora.errors import JloraError
from jlora.serve import cli as serve_cli
from jlora.train import cli as train_cli

BASE = "base"


def _lora_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora expects NAME=PATH, got {text!r}")
    return name, path


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 disables")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    g.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="default model name, a .gguf file, a Hugging Face Llama-family directory, or org/name from "
                        "the local Hugging Face hub cache (never downloaded)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    serve_cli.add_quantization_arg(p)
    p.add_argument("--lora", action="append", type=_lora_arg, default=[], metavar="NAME=PATH",
                   help="register a PEFT adapter directory under NAME (repeatable)")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _add_parallel(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism (a (data, model) mesh of dp x tp devices)")
    g.add_argument("--tp", type=_positive, default=1, help="tensor-parallel degree (default: %(default)s)")
    g.add_argument("--dp", type=_positive, default=1, help="data-parallel degree (default: %(default)s)")
    distributed.add_args(g)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jlora", description="Serve one base LLM with many LoRA adapters, in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete prompts, each with its own adapter, in one batch",
                         description="Complete prompts in one batch. Each prompt runs with the adapter given by "
                                     "the --adapter at the same position (or the single --adapter for all); "
                                     f"'{BASE}' means the base model alone.")
    _add_model(gen)
    gen.add_argument("prompts", nargs="+", help="prompt texts")
    gen.add_argument("--adapter", action="append", default=[],
                     help=f"adapter NAME for the prompt at the same position, or one for every prompt; '{BASE}' = none")
    gen.add_argument("--all-adapters", action="store_true",
                     help="run every prompt with the base model and with every registered adapter")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--chat-template", type=serve_cli.chat_template_file, default=None, metavar="FILE",
                     help="a Jinja chat template file for --chat, instead of the model's own")
    gen.add_argument("--json", action="store_true", help="print one JSON object per output")
    _add_sampling(gen)
    _add_parallel(gen)
    compile_cache.add_args(gen)
    train_cli.register(sub)
    serve_cli.register(sub)
    return parser


def _sampling(args):
    from jlora.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          max_tokens=args.max_tokens, seed=args.seed, stop=tuple(args.stop))


def cmd_generate(args) -> int:
    from jlora.config import RuntimeConfig
    from jlora.engine.engine import EngineConfig
    from jlora.generate import LLM

    distributed.initialize_from_args(args)
    compile_cache.configure_from_args(args)
    engine = EngineConfig(tp=args.tp, dp=args.dp, runtime=RuntimeConfig.from_env())
    sampling = _sampling(args)
    loras = dict(args.lora)
    if args.all_adapters:
        rows = [(p, a) for p in args.prompts for a in [None, *loras]]
    else:
        names = args.adapter or [BASE]
        if len(names) not in (1, len(args.prompts)):
            raise SystemExit(f"jlora generate: got {len(args.prompts)} prompts but {len(names)} --adapter values")
        names = names * len(args.prompts) if len(names) == 1 else names
        rows = [(p, None if a == BASE else a) for p, a in zip(args.prompts, names)]
    t0 = time.perf_counter()
    llm = LLM(args.model, adapters=loras, dtype=args.dtype, engine=engine, chat_template=args.chat_template,
              quantization=args.quantization)
    t_load = time.perf_counter() - t0
    prompts = [p for p, _ in rows]
    if args.chat:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    t1 = time.perf_counter()
    outs = llm.generate(prompts, adapter=[a for _, a in rows], sampling=sampling)
    t_gen = time.perf_counter() - t1
    if not distributed.is_scheduler():
        return 0  # every process holds the same outputs; process 0 prints them
    for (prompt, adapter), out in zip(rows, outs):
        if args.json:
            print(json.dumps({"prompt": prompt, "adapter": adapter, "text": out.text,
                              "completion_tokens": len(out.token_ids), "finish_reason": out.finish_reason}))
        else:
            print(f"[{adapter or BASE}] {prompt}\n{out.text.strip()}\n")
    tokens = sum(len(o.token_ids) for o in outs)
    print(f"# {len(outs)} outputs, {tokens} tokens; load {t_load:.1f}s, generate {t_gen:.1f}s "
          f"(compile included)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "train": train_cli.run, "serve": serve_cli.run}[args.command](args)
    except JloraError as e:
        print(f"jlora {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # what users cause: tp not dividing the heads, too few devices, a busy port
        print(f"jlora {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
