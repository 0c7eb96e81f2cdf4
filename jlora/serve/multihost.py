"""Multi-process `jlora serve`: process 0 answers requests and schedules; every other process follows.

Requests reach process 0 alone, yet every process must run the same jitted step on the same engine state, or
their collectives stop lining up. So process 0's engine (wrapped in `Leader`) records each change it makes to
its engine state and, before each step, broadcasts one message:

    {"commands": [command, ...], "op": "step" | "sync" | "stop"}
    command: ["add", request_id, prompt_ids, sampling (dict), adapter, logprobs, follows]
           | ["abort", request_id] | ["register", name, path] | ["unregister", name]

Every follower applies the commands in order, then steps ("step"), does nothing more ("sync": a keep-alive
while process 0 idles, so that no backend's collective timeout trips) or returns ("stop"). The engine is
deterministic given its inputs (process 0 draws the seed of an unseeded request and sends it), so each
process then schedules the same batch, writes the same adapter slots and decodes the same tokens, and its own
copy of every finished request stays in step with process 0's. Followers wait inside the broadcast: they never
poll. Adapter files must be readable at the same path on every process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import threading
import time

from jlora import distributed
from jlora.engine.engine import Engine, RequestOutput
from jlora.sampling import SamplingParams
from jlora.serve.async_engine import AsyncEngine, ServerClosedError

log = logging.getLogger("jlora.serve.multihost")

STEP, SYNC, STOP = "step", "sync", "stop"
KEEPALIVE_S = 30.0  # process 0 sends a "sync" after this long without a message


class FollowerDivergedError(RuntimeError):
    """A follower could not apply a command that process 0 applied: its engine state would differ."""


class _LeaderStore:
    """The engine's `AdapterStore`, recording registrations for the followers; everything else is the store's."""

    def __init__(self, store, commands: list):
        self._store, self._commands = store, commands

    def __getattr__(self, name):
        return getattr(self._store, name)

    def register(self, name: str, path: str, *, eager: bool = True):
        registration = self._store.register(name, path, eager=eager)
        self._commands.append(["register", name, path])
        return registration

    def add(self, prepared):
        """`AdapterStore.add` of an adapter prepared off the engine thread; followers read its resolved path."""
        registration = self._store.add(prepared)
        self._commands.append(["register", prepared.name, prepared.path])
        return registration

    def unregister(self, name: str) -> bool:
        gone = self._store.unregister(name)
        self._commands.append(["unregister", name])
        return gone


class Leader:
    """Process 0's `Engine`, as `AsyncEngine` drives it: requests, aborts and adapter (un)registrations that
    succeed are recorded, and `step` broadcasts them with the step. Anything else is the engine's own.

    Only the engine thread calls it (`AsyncEngine` runs every command there), and `close` after that thread
    has stopped.
    """

    def __init__(self, engine: Engine):
        self._engine = engine
        self._commands: list = []
        self.store = _LeaderStore(engine.store, self._commands)
        self.last_sent = time.monotonic()
        self._stopped = False

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def add_request(self, prompt, sampling: SamplingParams | None = None, adapter: str | None = None,
                    request_id: str | None = None, logprobs: bool = False, follows: str | None = None) -> str:
        sampling = sampling or SamplingParams()
        if sampling.seed is None:  # chosen here, so that every process samples alike
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(31))
        rid = self._engine.add_request(prompt, sampling, adapter, request_id, logprobs, follows)
        self._commands.append(["add", rid, list(self._engine.requests[rid].prompt_ids), dataclasses.asdict(sampling),
                               adapter, logprobs, follows])
        return rid

    def abort(self, request_id: str) -> RequestOutput | None:
        out = self._engine.abort(request_id)
        if out is not None:
            self._commands.append(["abort", request_id])
        return out

    def step(self) -> list[RequestOutput]:
        self._send(STEP)
        return self._engine.step()

    def sync(self) -> None:
        """Sends the commands recorded so far without a step."""
        self._send(SYNC)

    def close(self) -> None:
        """Tells the followers to stop (once), then closes the engine."""
        if not self._stopped:
            self._stopped = True
            self._send(STOP)
        self._engine.close()

    def _send(self, op: str) -> None:
        message = json.dumps({"commands": self._commands, "op": op}, separators=(",", ":")).encode()
        self._commands.clear()
        distributed.broadcast_bytes(message)
        self.last_sent = time.monotonic()


def keep_alive(async_engine: AsyncEngine, leader: Leader, interval_s: float = KEEPALIVE_S) -> threading.Thread:
    """Starts a daemon thread that has the engine thread send a "sync" whenever `interval_s` passed without a
    message; it ends when `async_engine` stops taking commands."""

    def run():
        while True:
            time.sleep(max(0.0, leader.last_sent + interval_s - time.monotonic()))
            if time.monotonic() - leader.last_sent < interval_s:
                continue
            try:
                async_engine.call(lambda engine: engine.sync()).result()
            except ServerClosedError:
                return
            except Exception:  # the followers are unreachable: the next step fails the requests, not this thread
                log.exception("keep-alive sync failed")

    thread = threading.Thread(target=run, name="jlora-keepalive", daemon=True)
    thread.start()
    return thread


def follow(engine: Engine) -> None:
    """Applies process 0's messages to this process's engine until "stop"."""
    while True:
        message = json.loads(distributed.broadcast_bytes(None))
        for command in message["commands"]:
            _apply(engine, command)
        if message["op"] == STOP:
            engine.close()
            return
        if message["op"] == STEP:
            try:
                engine.step()
            except Exception:  # process 0 fails its requests too, and its aborts come in the next message
                log.exception("engine step failed")


def _apply(engine: Engine, command: list) -> None:
    op, *args = command
    try:
        if op == "add":
            rid, ids, sampling, adapter, logprobs, follows = args
            engine.add_request(ids, SamplingParams(**sampling), adapter, rid, logprobs, follows)
        elif op == "abort":
            engine.abort(args[0])
        elif op == "register":
            engine.store.register(*args)
        elif op == "unregister":
            engine.store.unregister(args[0])
        else:
            raise ValueError(f"unknown command {op!r}")
    except Exception as e:
        raise FollowerDivergedError(f"process 0 applied {command!r}, this process failed: "
                                    f"{type(e).__name__}: {e}") from e
