"""Counts XLA compilations, so the engine can report them and tests can assert that nothing compiles after warm-up.

JAX reports compile times through a process-wide monitoring listener. It is installed by the first engine
(`install`), not at import, so importing jlora changes nothing in a process that never builds one.
"""

from __future__ import annotations

import threading

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# A program loaded from JAX's persistent compilation cache is not compiled, but it was still built for a shape the
# process had not run: it counts, so "nothing compiled after warm-up" means the same with the cache on.
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_lock = threading.Lock()
_installed = False
_compiles = 0
_compile_seconds = 0.0


def _on_event(event: str, duration: float, **kwargs) -> None:
    global _compiles, _compile_seconds
    if event == _COMPILE_EVENT:
        with _lock:
            _compiles += 1
            _compile_seconds += duration


def _on_plain_event(event: str, **kwargs) -> None:
    global _compiles
    if event == _CACHE_HIT_EVENT:
        with _lock:
            _compiles += 1


def install() -> None:
    """Starts counting (once per process; later calls do nothing)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    jax.monitoring.register_event_duration_secs_listener(_on_event)
    jax.monitoring.register_event_listener(_on_plain_event)


def compile_count() -> int:
    """XLA compilations (and loads from the persistent compilation cache) since `install`: every jitted program, not
    only the model step."""
    return _compiles


def compile_seconds() -> float:
    """Seconds spent in those compilations."""
    return _compile_seconds
