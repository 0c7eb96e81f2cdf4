"""`jlora train`: the subcommand's flags, registered into the `jlora` parser by `jlora.cli`."""

from __future__ import annotations

import argparse

from jlora.train import SCHEDULES

DEFAULT_MODEL = "smollm2-135m-instruct"  # as jlora.checkpoint.resolve, without importing jax for --help

_DESCRIPTION = """\
Fine-tune a LoRA adapter on a frozen base model and save it as a PEFT directory that jlora and
Hugging Face PEFT both load. Data is JSONL, one example per line, either
  {"prompt": "...", "completion": "..."}            (loss on the completion and EOS), or
  {"messages": [{"role": "user", "content": "..."},
                {"role": "assistant", "content": "..."}]}  (rendered with the model's chat template;
                                                    loss on the assistant turns only).
"""


def register(subparsers) -> None:
    """Adds the `train` subcommand to a `jlora` subparsers object."""
    p = subparsers.add_parser("train", help="fine-tune a LoRA adapter and save it as a PEFT directory",
                              description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="base model: the default name, a .gguf file, or a Hugging Face Llama-family directory "
                        "(default: %(default)s)")
    p.add_argument("--data", required=True, help="training data, a JSONL file (see above)")
    p.add_argument("--output", required=True, help="directory to write the PEFT adapter into")
    g = p.add_argument_group("adapter")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: %(default)s)")
    g.add_argument("--alpha", type=float, default=16.0,
                   help="LoRA alpha; the delta is scaled by alpha/r (default: %(default)s)")
    g.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r) instead of alpha/r")
    g.add_argument("--target-modules", default="all-linear",
                   help="'all-linear', or a comma list of q,k,v,o,gate,up,down (or q_proj,...) "
                        "(default: %(default)s)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=100, help="optimizer steps (default: %(default)s)")
    g.add_argument("--lr", type=float, default=2e-4, help="peak AdamW learning rate (default: %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=0,
                   help="linear warmup from 0 to --lr over this many steps (default: %(default)s)")
    g.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="learning rate after warmup: cosine or linear decay to 0, or constant "
                        "(default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="clip the global gradient norm to this; 0 disables (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=8, help="examples per step (default: %(default)s)")
    g.add_argument("--seq-len", type=int, default=128,
                   help="tokens per example; longer ones are truncated, shorter padded (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the LoRA init and the data order (default: %(default)s)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the frozen base weights while training; LoRA weights and the optimizer stay "
                        "float32 (default: %(default)s)")
    g.add_argument("--save-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the saved adapter tensors (default: %(default)s)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-dir", help="directory for orbax checkpoints (LoRA weights, optimizer state, step, "
                                            "data-order seed)")
    g.add_argument("--checkpoint-every", type=int, default=0,
                   help="save a checkpoint every N steps (and at the end); 0: only at the end (default: %(default)s)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --checkpoint-dir (same settings required); "
                        "starts at step 0 if there is none")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    p.set_defaults(func=run)


def run(args) -> int:
    from jlora.train.data import DataError
    from jlora.train.trainer import TrainConfig, train

    try:
        cfg = TrainConfig(data=args.data, output=args.output, model=args.model, rank=args.rank, alpha=args.alpha,
                          rslora=args.rslora, target_modules=args.target_modules, steps=args.steps, lr=args.lr,
                          warmup_steps=args.warmup_steps, schedule=args.schedule, batch_size=args.batch_size,
                          seq_len=args.seq_len, seed=args.seed, weight_decay=args.weight_decay,
                          max_grad_norm=args.max_grad_norm, dtype=args.dtype, save_dtype=args.save_dtype,
                          checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                          resume=args.resume, progress=not args.quiet)
        result = train(cfg)
    except (DataError, ValueError, OSError) as e:
        raise SystemExit(f"jlora train: error: {e}") from None
    last = result.losses.get(result.steps_done)
    print(f"{result.output}\t{result.steps_done} steps\t{result.seconds:.1f}s"
          + (f"\tfinal loss {last:.4f}" if last is not None else ""))
    return 0
