"""Orbax checkpoints of a training run: LoRA weights, optimizer state, step and data-order seed.

A checkpoint directory holds one sub-directory per saved step; each step holds
  state: {"lora", "opt_state", "step", "data_seed"} (arrays, orbax StandardSave), and
  meta: the run's settings (JSON), checked on resume so a run never continues with different settings.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """A checkpoint written by a run with different settings."""


class TrainCheckpointer:
    """Saves every `every` steps (and at the end); keeps the newest `max_to_keep`.

    Args:
      directory: where the step directories go (created if needed).
      every: save interval in steps; 0 saves only when `save(..., force=True)` is called.
    """

    def __init__(self, directory: str, every: int = 0, max_to_keep: int = 3):
        if every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {every}")
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                             item_names=("state", "meta"))

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state: dict[str, Any], meta: dict[str, Any], step: int | None = None):
        """(step, state) of checkpoint `step` (default: the latest), or None if there is none.

        Args:
          abstract_state: a pytree like the saved state (arrays or `jax.ShapeDtypeStruct`s); fixes the
            structure, shapes and dtypes of what comes back.
          meta: this run's settings; must equal the saved ones.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        saved_meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        diff = sorted(k for k in set(meta) | set(saved_meta) if meta.get(k) != saved_meta.get(k))
        if diff:
            details = ", ".join(f"{k}: checkpoint {saved_meta.get(k)!r} vs now {meta.get(k)!r}" for k in diff)
            raise CheckpointMismatchError(f"checkpoint step {step} in {self.manager.directory} was written with "
                                          f"other settings ({details})")
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), abstract_state)
        state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        return step, state

    def close(self) -> None:
        self.manager.close()
