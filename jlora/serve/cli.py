"""`jlora serve`: the gRPC and HTTP servers over one model. SIGTERM (or Ctrl-C) drains, then exits."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from jlora import compile_cache, distributed
from jlora.checkpoint.resolve import DEFAULT_MODEL
from jlora.config import RuntimeConfig, parse_lora_modules


POOL_ENV = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")  # JAX's share of GPU memory


def pool_fraction(utilization: float | None) -> float | None:
    """The share of JAX's pool that `utilization` of the device is: all of it when the pool was sized to it, else
    utilization / the pool's share from the environment."""
    if utilization is None:
        return None
    pool = next((float(os.environ[v]) for v in POOL_ENV if os.environ.get(v)), utilization)
    return min(1.0, utilization / pool)


def _lora(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora expects NAME=PATH, got {text!r}")
    return name, path


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535 (0 picks a free one), got {text!r}")
    return int(text)


def chat_template_file(text: str) -> str:
    """An argparse type: the path of a chat template file that exists (`--chat-template`)."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"chat template file {text!r} does not exist")
    return text


def add_quantization_arg(p) -> None:
    p.add_argument("--quantization", choices=["fp8"], default=None,
                   help="fp8: the layers' linear weights in FP8 with a scale per output channel, quantized at load "
                        "(W8A8 on GPUs, else W8A16; with --tp/--dp too; an FP8 checkpoint is served so "
                        "without it)")


def _modules(text: str) -> str:
    try:
        parse_lora_modules(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def register(sub) -> None:
    """Adds the `serve` subcommand to the `jlora` parser's subparsers."""
    p = sub.add_parser("serve", help="serve the model and its adapters over gRPC and HTTP (OpenAI-compatible)",
                       description="Serve one base model with many LoRA adapters: gRPC (jlora.v1.Jlora, health, "
                                   "reflection) and HTTP (/v1/completions, /v1/chat/completions, /generate, "
                                   "/v1/models, adapter loading, /health, /metrics). SIGTERM drains in-flight "
                                   "requests, then exits.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="default model name, a .gguf file, a Hugging Face Llama-family directory, or org/name from the "
                        "local Hugging Face hub cache (default: %(default)s)")
    p.add_argument("--served-model-name", default=None,
                   help="the base model's name in the APIs (default: the --model name or directory name)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_quantization_arg(p)
    p.add_argument("--chat-template", type=chat_template_file, default=None, metavar="FILE",
                   help="a Jinja chat template for /v1/chat/completions and gRPC messages, instead of the model's "
                        "own (chat_template.jinja, else tokenizer_config.json)")
    p.add_argument("--lora", action="append", type=_lora, default=[], metavar="NAME=PATH",
                   help="register a PEFT adapter directory under NAME at start-up (repeatable)")
    p.add_argument("--lora-root", action="append", default=[], metavar="DIR",
                   help="clients may load adapters at run time from inside DIR (repeatable; every file of an "
                        "adapter must resolve inside, symlinks included). Without it, runtime loads are refused")
    p.add_argument("--allow-any-lora-path", action="store_true",
                   help="let clients load adapters from any path the server can read (unsafe on a shared host)")
    p.add_argument("--api-key", default=None,
                   help="require this key on every endpoint but health: HTTP 'Authorization: Bearer KEY', gRPC "
                        "'authorization: Bearer KEY' metadata (default: $JLORA_API_KEY, else no key)")
    p.add_argument("--admin-api-key", default=None,
                   help="require this key, instead of --api-key, to load and unload adapters "
                        "(default: $JLORA_ADMIN_API_KEY)")
    p.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                   help="comma list of Host header names HTTP requests may carry, '*' for any (default: loopback "
                        "names and --host unless it is a wildcard address)")
    p.add_argument("--step-timeout", type=float, default=300.0,
                   help="seconds one engine step may run (compiles included) before health turns unhealthy "
                        "(default: %(default)s)")
    p.add_argument("--max-loras-per-batch", type=_count, default=4,
                   help="distinct adapters of each rank bucket one batch can mix: device slots per bucket "
                        "(default: %(default)s)")
    p.add_argument("--max-lora-rank", type=_count, default=64,
                   help="largest adapter rank; buckets above it get no slots (default: %(default)s)")
    p.add_argument("--lora-target-modules", type=_modules, default="all-linear",
                   help="projections the adapter bank serves: 'all-linear' or a comma list of q,k,v,o,gate,up,down; "
                        "fewer cost less memory and kernel time, and adapters needing others are refused "
                        "(default: %(default)s)")
    p.add_argument("--max-cpu-loras", type=_count, default=64,
                   help="adapters kept ready in host memory, LRU (default: %(default)s)")
    p.add_argument("--max-num-seqs", type=_count, default=64, help="sequences per batch (default: %(default)s)")
    p.add_argument("--num-scheduler-steps", type=_count, default=8,
                   help="decode tokens per sequence sampled in one device call: the host's per-step work is paid once "
                        "for all of them, and output streams in bursts of up to this many tokens (default: %(default)s)")
    p.add_argument("--max-model-len", type=_count, default=None,
                   help="longest prompt + output in tokens (default: the model's context length)")
    p.add_argument("--num-pages", type=_count, default=None,
                   help="KV-cache pages of --page-size tokens (default: 512, unless --gpu-memory-utilization)")
    p.add_argument("--gpu-memory-utilization", type=_fraction, default=None, metavar="FRACTION",
                   help="the share of the device's memory jlora may use: JAX's pool takes it (XLA_CLIENT_MEM_FRACTION "
                        "unless set) and the KV pages and adapter slots fill what the weights and a step's "
                        "activations leave; the split is logged at start-up (one device, GPU or TPU)")
    p.add_argument("--page-size", type=_count, default=16, help="tokens per KV page (default: %(default)s)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="share full KV pages between requests whose prompt prefix and adapter match "
                        "(default: on)")
    p.add_argument("--lora-scheduling", choices=("fifo", "affinity"), default="fifo",
                   help="admission order when more requests wait than fit: 'fifo', or 'affinity': requests whose "
                        "adapter is on the device or running go first, so steps carry fewer distinct adapters "
                        "(default: %(default)s)")
    p.add_argument("--lora-affinity-max-wait", type=float, default=2.0, metavar="SECONDS",
                   help="with --lora-scheduling affinity: a request waiting this long is admitted in FIFO order "
                        "and nothing passes it (default: %(default)s)")
    p.add_argument("--tp", type=_count, default=1, help="tensor-parallel degree (default: %(default)s)")
    p.add_argument("--dp", type=_count, default=1,
                   help="data-parallel degree: tp x dp devices, each replica with its own KV pages "
                        "(default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--grpc-port", type=_port, default=50051, help="gRPC port; 0 picks one (default: %(default)s)")
    p.add_argument("--http-port", type=_port, default=8000, help="HTTP port; 0 picks one (default: %(default)s)")
    p.add_argument("--warmup", action="store_true",
                   help="compile every step shape before serving (slow on a CPU; no compiles while serving)")
    p.add_argument("--drain-timeout", type=float, default=600.0,
                   help="seconds SIGTERM waits for in-flight requests before aborting them (default: %(default)s)")
    compile_cache.add_args(p)
    g = p.add_argument_group("multi-process (process 0 serves and schedules; the others follow its steps)")
    distributed.add_args(g)


def config_from_args(args):
    from jlora.serve.server import ServeConfig

    return ServeConfig(model=args.model, served_model_name=args.served_model_name, dtype=args.dtype,
                       chat_template=args.chat_template, quantization=args.quantization,
                       runtime=RuntimeConfig.from_env(),
                       loras=tuple(args.lora), lora_roots=tuple(args.lora_root),
                       max_loras_per_batch=args.max_loras_per_batch, max_lora_rank=args.max_lora_rank,
                       lora_target_modules=parse_lora_modules(args.lora_target_modules),
                       max_cpu_loras=args.max_cpu_loras, max_num_seqs=args.max_num_seqs,
                       num_scheduler_steps=args.num_scheduler_steps,
                       max_model_len=args.max_model_len, num_pages=args.num_pages, page_size=args.page_size,
                       memory_pool_fraction=pool_fraction(args.gpu_memory_utilization),
                       enable_prefix_caching=args.enable_prefix_caching,
                       lora_scheduling=args.lora_scheduling, lora_affinity_max_wait_s=args.lora_affinity_max_wait,
                       tp=args.tp, dp=args.dp, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
                       warmup=args.warmup, drain_timeout_s=args.drain_timeout,
                       allow_any_lora_path=args.allow_any_lora_path,
                       api_key=args.api_key or os.environ.get("JLORA_API_KEY") or None,
                       admin_api_key=args.admin_api_key or os.environ.get("JLORA_ADMIN_API_KEY") or None,
                       allowed_hosts=None if args.allowed_hosts is None else
                       tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()),
                       step_timeout_s=args.step_timeout)


async def serve(config) -> int:
    """Serves until SIGTERM or SIGINT, then drains. Returns the exit code."""
    from jlora.serve.server import Server, build_service

    service = build_service(config)
    server = Server(service, config.host, config.grpc_port, config.http_port)
    try:
        await server.start()
    except BaseException:
        await asyncio.to_thread(service.engine.shutdown)  # with several processes, this stops the followers
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"jlora serve: ready: model {service.info.name!r}, gRPC {config.host}:{server.grpc_port}, "
          f"HTTP http://{config.host}:{server.http_port}", file=sys.stderr, flush=True)
    await stop.wait()
    print(f"jlora serve: draining {service.engine.in_flight} in-flight requests", file=sys.stderr, flush=True)
    drained = await server.stop(config.drain_timeout_s)
    print("jlora serve: stopped" + ("" if drained else " (drain timed out; the rest were aborted)"),
          file=sys.stderr, flush=True)
    return 0 if drained else 1


def follow(config) -> int:
    """A process other than 0: the same engine, stepping as process 0 says until it stops."""
    import jax

    from jlora.serve import multihost
    from jlora.serve.server import build_engine

    engine = build_engine(config)
    print(f"jlora serve: process {jax.process_index()} following process 0", file=sys.stderr, flush=True)
    multihost.follow(engine)
    print(f"jlora serve: stopped: {engine.steps} steps, {engine.tokens_generated} tokens generated",
          file=sys.stderr, flush=True)
    return 0


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.gpu_memory_utilization and not any(os.environ.get(v) for v in POOL_ENV):
        os.environ["XLA_CLIENT_MEM_FRACTION"] = str(args.gpu_memory_utilization)  # JAX's pool, before it starts
    distributed.initialize_from_args(args)
    compile_cache.configure_from_args(args)
    config = config_from_args(args)
    code = asyncio.run(serve(config)) if distributed.is_scheduler() else follow(config)
    distributed.shutdown()
    return code
