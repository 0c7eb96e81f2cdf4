"""The loss, the optimizer and one jitted training step. Only the LoRA weights are differentiated."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jlora.config import ModelConfig, RuntimeConfig
from jlora.model.kv_cache import KVCache
from jlora.model.llama import Params, forward
from jlora.train import SCHEDULES
from jlora.train.lora_params import TrainableLora, to_bank


def learning_rate(lr: float, steps: int, warmup_steps: int = 0, schedule: str = "cosine") -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then cosine to 0, constant, or linear to 0 at `steps`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    decay_steps = max(steps - warmup_steps, 1)
    after = {"cosine": optax.cosine_decay_schedule(lr, decay_steps),
             "constant": optax.constant_schedule(lr),
             "linear": optax.linear_schedule(lr, 0.0, decay_steps)}[schedule]
    if warmup_steps <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after], [warmup_steps])


def make_optimizer(lr: float, steps: int, warmup_steps: int = 0, schedule: str = "cosine",
                   weight_decay: float = 0.0, max_grad_norm: float = 1.0) -> optax.GradientTransformation:
    """AdamW on the learning-rate schedule, after clipping the global gradient norm (0 disables clipping)."""
    adamw = optax.adamw(learning_rate(lr, steps, warmup_steps, schedule), weight_decay=weight_decay)
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw) if max_grad_norm > 0 else adamw


def masked_nll(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean next-token negative log-likelihood over target tokens.

    Semantics: loss = sum_{b, t>=1, mask[b,t]} -log softmax(logits[b, t-1])[tokens[b, t]] / (number of such t).

    Args:
      logits: [B, T, V] float32; logits[:, t] predicts tokens[:, t + 1].
      tokens: [B, T] int32.
      mask: [B, T] bool, True where the token is a training target (never the prompt).
    Returns:
      (loss scalar, number of target tokens).
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    weight = mask[:, 1:].astype(jnp.float32)
    count = jnp.sum(weight)
    return jnp.sum(nll * weight) / jnp.maximum(count, 1.0), count


def loss_fn(lora: TrainableLora, params: Params, tokens: jax.Array, positions: jax.Array, mask: jax.Array, *,
            config: ModelConfig, rank: int, scale: float) -> jax.Array:
    """The served forward with `lora` in slot 0 of a one-slot bank, scored on the target tokens.

    The LoRA ops take the dense XLA path ("xla" backend) on every platform: the Pallas kernels define
    no gradients, and the per-token-gather reference is slow to differentiate.

    Args:
      tokens, positions, mask: [B, T]; positions are -1 on padding.
    """
    B, T = tokens.shape
    bank = to_bank(lora, config, rank, scale)
    lora_ids = jnp.zeros((B, T), jnp.int32)  # every token runs the one slot
    cache = KVCache.zeros(config, B, T, params["embed"].dtype)
    logits, _ = forward(params, bank, tokens, positions, lora_ids, cache, config=config,
                        runtime=RuntimeConfig(lora_backend="xla"))
    return masked_nll(logits, tokens, mask)[0]


def make_train_step(optimizer: optax.GradientTransformation, config: ModelConfig, rank: int, scale: float):
    """A jitted `step(lora, opt_state, params, tokens, positions, mask) -> (lora, opt_state, loss)`.

    The base `params` are an ordinary (non-differentiated) argument, never a baked-in constant.
    """
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, config=config, rank=rank, scale=scale))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(lora, opt_state, params, tokens, positions, mask):
        loss, grads = grad_fn(lora, params, tokens, positions, mask)
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    return step
