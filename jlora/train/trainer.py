"""The training loop of `jlora train`: data -> jitted LoRA steps -> orbax checkpoints -> a PEFT adapter."""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jlora.checkpoint.resolve import DEFAULT_MODEL
from jlora.train import data as data_lib
from jlora.train.checkpoint import TrainCheckpointer
from jlora.train.export import DTYPES, save_peft
from jlora.train.lora_params import init_lora, lora_scale, parse_targets
from jlora.train import SCHEDULES
from jlora.train.step import make_optimizer, make_train_step


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on (the `jlora train` flags)."""

    data: str
    output: str
    model: str = DEFAULT_MODEL
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    target_modules: str = "all-linear"
    steps: int = 100
    lr: float = 2e-4
    warmup_steps: int = 0
    schedule: str = "cosine"
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dtype: str = "float32"  # the frozen base weights while training; LoRA weights are always float32
    save_dtype: str = "float32"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in ("rank", "steps", "batch_size", "seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.lr <= 0 or self.alpha <= 0:
            raise ValueError(f"lr and alpha must be positive, got lr={self.lr}, alpha={self.alpha}")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.save_dtype not in DTYPES:
            raise ValueError(f"save_dtype must be one of {list(DTYPES)}, got {self.save_dtype!r}")
        if (self.checkpoint_every or self.resume) and not self.checkpoint_dir:
            raise ValueError("checkpoint_every and resume need checkpoint_dir")
        parse_targets(self.target_modules)

    def run_settings(self) -> dict:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        skip = {"output", "checkpoint_dir", "checkpoint_every", "resume", "progress", "save_dtype"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclasses.dataclass
class TrainResult:
    losses: dict[int, float]  # step (1-based: after that many updates) -> the loss of that step's batch
    steps_done: int
    seconds: float
    output: str | None  # the PEFT directory, or None when stopped early
    dataset: data_lib.Dataset


def _batch(ds: data_lib.Dataset, idx: np.ndarray):
    tokens, mask = ds.tokens[idx], ds.mask[idx]
    t = np.arange(tokens.shape[1])[None, :]
    positions = np.where(t < ds.lengths[idx][:, None], t, -1).astype(np.int32)  # padding: -1, never attended
    return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)


def train(cfg: TrainConfig, *, model=None, tokenizer=None, stop_after: int | None = None) -> TrainResult:
    """Trains a LoRA adapter on `cfg.data` and writes it to `cfg.output` as a PEFT directory.

    Args:
      model, tokenizer: an already loaded `Llama` and `Tokenizer` (default: load `cfg.model`).
      stop_after: stop once this many steps are done, without exporting (an interruption, for tests).
    """
    log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if cfg.progress else (lambda msg: None)
    if model is None:
        from jlora.checkpoint.resolve import load_model

        model, tokenizer = load_model(cfg.model, jnp.dtype(cfg.dtype), progress=cfg.progress)
    if tokenizer is None:
        raise data_lib.DataError(f"model {cfg.model!r} has no tokenizer, so text data cannot be tokenized")
    config, params = model.config, model.params()
    params = jax.tree.map(lambda x: x.astype(cfg.dtype), params)
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    ds = data_lib.build_dataset(data_lib.read_jsonl(cfg.data), tokenizer, cfg.seq_len, pad_id, source=cfg.data)
    log(f"data: {len(ds)} examples from {cfg.data} ({ds.truncated} truncated to {cfg.seq_len} tokens, "
        f"{ds.dropped} dropped with no target token), {int(ds.mask.sum())} target tokens")

    targets = parse_targets(cfg.target_modules)
    scale = lora_scale(cfg.rank, cfg.alpha, cfg.rslora)
    lora = init_lora(config, targets, cfg.rank, jax.random.key(cfg.seed))
    optimizer = make_optimizer(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.schedule, cfg.weight_decay,
                               cfg.max_grad_norm)
    state = {"lora": lora, "opt_state": optimizer.init(lora), "step": np.int64(0), "data_seed": np.int64(cfg.seed)}

    ckpt = TrainCheckpointer(cfg.checkpoint_dir, cfg.checkpoint_every) if cfg.checkpoint_dir else None
    if cfg.resume:
        restored = ckpt.restore(state, cfg.run_settings())
        if restored is None:
            log(f"resume: no checkpoint in {cfg.checkpoint_dir}, starting at step 0")
        else:
            state = restored[1]
            log(f"resume: continuing from step {int(state['step'])} of {cfg.steps}")
    start, data_seed = int(state["step"]), int(state["data_seed"])
    lora, opt_state = state["lora"], state["opt_state"]

    step_fn = make_train_step(optimizer, config, cfg.rank, scale)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    losses: dict[int, float] = {}
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not cfg.progress,
               file=sys.stderr, dynamic_ncols=True)
    for step in range(start, end):
        tokens, positions, mask = _batch(ds, data_lib.batch_indices(len(ds), cfg.batch_size, step, data_seed))
        lora, opt_state, loss = step_fn(lora, opt_state, params, tokens, positions, mask)
        losses[step + 1] = float(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[step + 1]:.4f}")
        if ckpt is not None and ckpt.due(step + 1) and step + 1 < cfg.steps:
            ckpt.save(step + 1, {"lora": lora, "opt_state": opt_state, "step": np.int64(step + 1),
                                 "data_seed": np.int64(data_seed)}, cfg.run_settings())
    bar.close()
    seconds = time.perf_counter() - t0
    if end < cfg.steps:
        if ckpt is not None:
            ckpt.close()
        return TrainResult(losses=losses, steps_done=end, seconds=seconds, output=None, dataset=ds)

    if ckpt is not None:
        ckpt.save(cfg.steps, {"lora": lora, "opt_state": opt_state, "step": np.int64(cfg.steps),
                              "data_seed": np.int64(data_seed)}, cfg.run_settings())
        ckpt.close()
    last = losses.get(cfg.steps)
    save_peft(cfg.output, lora, rank=cfg.rank, alpha=cfg.alpha, rslora=cfg.rslora, targets=targets,
              base_model=cfg.model,
              dtype=cfg.save_dtype,
              metadata={"jlora_steps": cfg.steps, "jlora_final_loss": f"{last:.6f}" if last is not None else "",
                        "jlora_data": os.path.basename(cfg.data)})
    log(f"saved adapter to {cfg.output} ({cfg.steps} steps, {seconds:.0f}s"
        + (f", final loss {last:.4f})" if last is not None else ")"))
    return TrainResult(losses=losses, steps_done=cfg.steps, seconds=seconds, output=cfg.output, dataset=ds)
