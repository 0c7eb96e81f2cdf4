"""Multi-host wiring: one process per host (or per GPU), all running the same jitted step.

Process 0 schedules: it builds each step's batch on the host and `broadcast_step` sends it to every other
process, so that all of them feed identical inputs to the step even where their own schedulers would
disagree (sampling seeds from the clock, arrival order of requests). Arrays that the step returns are
read back with `to_host`, which gathers shards that live on other processes.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None,
               timeout_s: int = 300) -> None:
    """Joins this process to a multi-process JAX job (`jax.distributed.initialize`); call before any jax work.

    Args:
      coordinator_address: "host:port" of process 0, reachable from every process.
      num_processes: how many processes take part.
      process_id: this process's rank in [0, num_processes); 0 is the coordinator and the scheduler.
      local_device_ids: the local devices this process drives (default: all it sees).
      timeout_s: how long to wait for every process to join.
    On a managed cluster (SLURM, TPU pods, ...) all three may be None: JAX detects them.
    """
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               initialization_timeout=timeout_s)


def is_scheduler() -> bool:
    """True on the process that schedules and broadcasts (process 0)."""
    return jax.process_index() == 0


def broadcast_step(batch: Any) -> Any:
    """Process 0's value of `batch` (a pytree of host arrays), on every process.

    Every process must pass a pytree of the same structure, shapes and dtypes; only process 0's values are
    kept. With one process this returns `batch` unchanged.
    """
    if jax.process_count() == 1:
        return batch
    out = multihost_utils.broadcast_one_to_all(jax.tree.map(np.asarray, batch), is_source=is_scheduler())
    return jax.tree.map(np.asarray, out)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array as a NumPy array, on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
