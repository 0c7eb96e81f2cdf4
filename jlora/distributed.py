"""Multi-host wiring: one process per host (or per GPU), all running the same jitted step.

Process 0 schedules: it builds each step's batch on the host and `broadcast_step` sends it to every other
process, so that all of them feed identical inputs to the step even where their own schedulers would
disagree (sampling seeds from the clock, arrival order of requests). Arrays that the step returns are
read back with `to_host`, which gathers shards that live on other processes.
"""

from __future__ import annotations

import argparse
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


def add_args(parser: argparse.ArgumentParser) -> None:
    """The multi-process flags, shared by `jlora generate` and `jlora serve`."""
    parser.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                        help="multi-process: process 0's address; every process runs this same command")
    parser.add_argument("--num-processes", type=int, default=None, help="multi-process: how many processes")
    parser.add_argument("--process-id", type=int, default=None,
                        help="multi-process: this process's rank (0 schedules and answers)")


def initialize_from_args(args: argparse.Namespace) -> None:
    """`initialize` with the `add_args` flags, if any was given (one process otherwise)."""
    if args.coordinator_address or args.num_processes:
        initialize(args.coordinator_address, args.num_processes, args.process_id)


def shutdown() -> None:
    """Leaves the multi-process job (waits for every process to leave); a no-op with one process."""
    if jax.process_count() > 1:
        jax.distributed.shutdown()


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


# A message's first broadcast: an 8-byte length, then the payload's start. Longer payloads send their rest
# in a second broadcast padded to a power of two, so only a few buffer shapes ever compile.
_FRAME = 4096


def broadcast_bytes(payload: bytes | None) -> bytes:
    """Process 0's `payload` on every process (the others pass None); blocks until process 0 sends."""
    frame = np.zeros(_FRAME, np.uint8)
    if is_scheduler():
        frame[:8] = np.frombuffer(len(payload).to_bytes(8, "little"), np.uint8)
        head = payload[:_FRAME - 8]
        frame[8:8 + len(head)] = np.frombuffer(head, np.uint8)
    frame = broadcast_step(frame)
    n = int.from_bytes(frame[:8].tobytes(), "little")
    head = frame[8:8 + min(n, _FRAME - 8)].tobytes()
    rest = n - len(head)
    if rest <= 0:
        return head
    tail = np.zeros(1 << (rest - 1).bit_length(), np.uint8)
    if is_scheduler():
        tail[:rest] = np.frombuffer(payload[len(head):], np.uint8)
    return head + broadcast_step(tail)[:rest].tobytes()


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array as a NumPy array, on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
