"""One background thread owns the synchronous `Engine`; front ends talk to it through a command queue.

The engine is not thread safe, so every touch of it (adding and aborting requests, adapter loads, metrics)
is a command that the engine thread runs between steps. Each request's outputs go to a `RequestStream`, an
asyncio queue of the event loop that submitted it. When there is nothing to run, the thread blocks on a
condition variable (it never spins), waking for the next command or the next request deadline.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from typing import Any, Callable

from jlora.engine.engine import Engine, RequestOutput
from jlora.errors import CapacityError, JloraError
from jlora.sampling import SamplingParams

log = logging.getLogger("jlora.serve")

DEADLINE_ERROR = "deadline exceeded"
DEFAULT_STEP_TIMEOUT_S = 300.0  # a step longer than this (compiles included) marks the server unhealthy
FAILED_STEPS_UNHEALTHY = 3  # this many whole steps failing in a row marks it unhealthy too


class ServerClosedError(CapacityError):
    """The server is draining for shutdown and takes no new requests."""


class RequestStream:
    """The outputs of one request, in order, ending with a finished one. Async-iterable on its event loop."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, owner: "AsyncEngine"):
        self.request_id = request_id
        self._loop, self._owner = loop, owner
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    def _put(self, out: RequestOutput) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, out)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            pass

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        self.finished = out.finished
        return out

    async def result(self) -> RequestOutput:
        """The final output (the stream is consumed)."""
        last = None
        async for last in self:
            pass
        return last

    def abort(self) -> None:
        """Cancels the request in the engine (no-op if it has finished); its pages are freed at once."""
        if not self.finished:
            self._owner.abort(self.request_id)


class AsyncEngine:
    """Runs `engine.step()` on its own thread while requests are in flight.

    Args:
      engine: the engine; from now on only this object's thread touches it.
      rate_window_s: the window over which `stats()["tokens_per_second"]` is measured.
    """

    def __init__(self, engine: Engine, rate_window_s: float = 10.0, step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S):
        if not step_timeout_s > 0:
            raise ValueError(f"step_timeout_s must be > 0, got {step_timeout_s}")
        self.engine = engine
        self.step_timeout_s = step_timeout_s
        self._step_started: float | None = None  # time.monotonic() of the step running now
        self._failed_steps = 0  # consecutive steps that failed as a whole
        self._cv = threading.Condition()
        self._commands: collections.deque = collections.deque()
        self._streams: dict[str, RequestStream] = {}
        self._deadlines: dict[str, float] = {}
        self._ids = itertools.count()
        self._accepting = True
        self._stop = False
        self._rate_window = rate_window_s
        self._rate: collections.deque = collections.deque()  # (time, tokens generated so far)
        self.finished = collections.Counter()  # finish reason -> requests, for metrics
        self.wakeups = 0  # loop iterations: constant while idle (the thread blocks, it never polls)
        self._stats: dict[str, Any] = {}
        self._publish()
        self._thread = threading.Thread(target=self._loop, name="jlora-engine", daemon=True)
        self._thread.start()

    # -- called from any thread ------------------------------------------------------------------------------

    def call(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
        """Runs `fn(engine)` on the engine thread between steps; the future holds its result or exception."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._stop:
                raise ServerClosedError("the server is shutting down")
            self._commands.append((fn, future))
            self._cv.notify()
        return future

    async def run(self, fn: Callable[[Engine], Any]) -> Any:
        """`call`, awaited."""
        return await asyncio.wrap_future(self.call(fn))

    async def generate(self, prompt, sampling: SamplingParams, adapter: str | None = None, *,
                       logprobs: bool = False, deadline: float | None = None,
                       follows: str | None = None) -> RequestStream:
        """Queues a request and returns its stream. Raises the engine's `RequestError` (or
        `UnknownAdapterError`) for a bad request, `ServerClosedError` while draining.

        Args:
          prompt: text or token ids.
          deadline: a `time.monotonic()` instant; past it the request is aborted with error "deadline exceeded".
          follows: another choice of the same prompt (`Engine.add_request`).
        """
        if not self._accepting:
            raise ServerClosedError("the server is shutting down and takes no new requests")
        rid = f"req-{next(self._ids)}"
        stream = RequestStream(rid, asyncio.get_running_loop(), self)

        def add(engine: Engine) -> str:
            engine.add_request(prompt, sampling, adapter, request_id=rid, logprobs=logprobs, follows=follows)
            self._streams[rid] = stream
            if deadline is not None:
                self._deadlines[rid] = deadline
            return rid

        try:
            await self.run(add)
        except asyncio.CancelledError:  # the caller went away while the request was being added
            self.abort(rid)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Cancels a request (if it is still running) without waiting."""
        try:
            self.call(lambda engine: self._abort(request_id))
        except ServerClosedError:
            pass

    def stats(self) -> dict[str, Any]:
        """The engine's metrics as of its last step, plus `in_flight` and `tokens_per_second` (averaged from
        the start of the last window to now, so it falls to 0 while idle). Never blocks."""
        stats = dict(self._stats)
        t0, n0 = stats.pop("rate_base")
        now = time.monotonic()
        stats["tokens_per_second"] = (stats["tokens_generated"] - n0) / (now - t0) if now > t0 else 0.0
        return stats

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def health(self) -> tuple[bool, str]:
        """(healthy, status): "ok", "draining", or why the engine is unhealthy: its thread has stopped, a step
        has run longer than `step_timeout_s` (a hang), or the last steps all failed. Never blocks."""
        if not self._thread.is_alive():
            return False, "unhealthy: the engine thread has stopped"
        started = self._step_started
        if started is not None and time.monotonic() - started > self.step_timeout_s:
            return False, (f"unhealthy: an engine step has run for {time.monotonic() - started:.0f} s "
                           f"(limit {self.step_timeout_s:g} s)")
        if self._failed_steps >= FAILED_STEPS_UNHEALTHY:
            return False, f"unhealthy: the last {self._failed_steps} engine steps failed"
        if not self._accepting:
            return False, "draining"
        return True, "ok"

    async def drain(self, timeout: float | None = None) -> bool:
        """Stops taking requests and waits until every request in flight has finished. Returns False on timeout."""
        self._accepting = False
        end = None if timeout is None else time.monotonic() + timeout
        while self._streams:
            if end is not None and time.monotonic() > end:
                return False
            await asyncio.sleep(0.02)
        return True

    def shutdown(self) -> None:
        """Stops the engine thread (aborting whatever still runs) and waits for it."""
        self._accepting = False
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join()
        self.engine.close()

    # -- the engine thread -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                if self._iterate():
                    return
            except Exception:  # noqa: BLE001 - a bug in this loop itself: log it, never let the thread die
                log.exception("engine loop iteration failed; continuing")
                time.sleep(0.01)

    def _iterate(self) -> bool:
        """One pass: commands, deadlines, one step. True once stopped."""
        engine = self.engine
        busy = engine.has_unfinished()
        with self._cv:
            while not busy and not self._commands and not self._stop:
                self._cv.wait(self._next_deadline_wait())
                if self._deadlines and self._next_deadline_wait() == 0:
                    break
            self.wakeups += 1
            commands = list(self._commands)
            self._commands.clear()
            stop = self._stop
        for fn, future in commands:
            self._run_command(fn, future)
        self._expire_deadlines()
        if stop:
            for rid in list(self._streams):
                self._abort(rid)
            self._publish()
            return True
        if engine.has_unfinished():
            self._step()
        self._publish()
        return False

    def _run_command(self, fn, future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(self.engine))
        except BaseException as e:  # handed to the caller, who raises it in its own thread
            future.set_exception(e)

    def _step(self) -> None:
        steps = self.engine.steps
        self._step_started = time.monotonic()
        raised = False
        try:
            outs = self.engine.step()  # fails only the requests an exception concerns; raising is a bug
        except Exception as e:  # noqa: BLE001 - which requests it concerns cannot be told: fail those in flight
            log.exception("engine step raised; failing the %d requests in flight", len(self._streams))
            outs, raised = [], True
            for rid in list(self._streams):
                self._abort(rid, reason="error", error=f"internal error: {type(e).__name__}: {str(e)[:300]}",
                            kind="internal")
        finally:
            self._step_started = None
        failed = raised or self.engine.steps == steps and any(
            o.finish_reason == "error" and o.error_kind == "internal" for o in outs)
        self._failed_steps = self._failed_steps + 1 if failed else 0
        for out in outs:
            self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if out.finished:
            self._streams.pop(out.request_id, None)
            self._deadlines.pop(out.request_id, None)
            self.finished[out.finish_reason] += 1
        if stream is not None:
            stream._put(out)

    def _abort(self, request_id: str, reason: str = "abort", error: str | None = None,
               kind: str | None = None) -> None:
        try:
            out = self.engine.abort(request_id)
        except Exception as e:  # noqa: BLE001 - the engine lost track of it: end its stream anyway
            log.exception("aborting %s failed", request_id)
            stream = self._streams.get(request_id)
            if stream is None:
                return
            out = RequestOutput(request_id, None, [], [], "", "", True, "error",
                                f"internal error: {type(e).__name__}", "internal")
        if out is None:
            return
        out.finish_reason, out.error, out.error_kind = reason, error, kind
        self._deliver(out)

    def _next_deadline_wait(self) -> float | None:
        if not self._deadlines:
            return None
        return max(0.0, min(self._deadlines.values()) - time.monotonic())

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        for rid in [r for r, d in self._deadlines.items() if d <= now]:
            self._abort(rid, error=DEADLINE_ERROR)
            self._deadlines.pop(rid, None)

    def _publish(self) -> None:
        """Snapshots the engine's metrics for other threads (a new dict each time: readers never see it change)."""
        try:
            m = dict(self.engine.metrics())
        except JloraError:
            return
        now = time.monotonic()
        self._rate.append((now, m["tokens_generated"]))
        while len(self._rate) > 2 and self._rate[1][0] < now - self._rate_window:
            self._rate.popleft()
        m["rate_base"] = self._rate[0]
        m["in_flight"] = len(self._streams)
        m["finished"] = dict(self.finished)
        self._stats = m
