"""JAX's persistent compilation cache at the command-line edge: a restarted `jlora serve` or `jlora generate` loads
its step programs from disk instead of compiling them again.

On by default where the backend is a GPU or TPU, under `$JLORA_CACHE/xla`. Off by default on the CPU: loading
cached CPU executables crashed the test suite's processes (a segmentation fault while deserializing), and CPU
compiles of jlora's small programs are short. `--compilation-cache` turns it on anywhere, `--no-compilation-cache`
off. The cache holds compiled programs only; it never changes what a program computes.
"""

from __future__ import annotations

import argparse
import logging
import os

from jlora.checkpoint.resolve import cache_dir

log = logging.getLogger("jlora.compile_cache")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compilation-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="keep compiled step programs on disk so that a restart loads them instead of compiling "
                        "(default: on for GPU and TPU, off on the CPU)")
    p.add_argument("--compilation-cache-dir", default=None, metavar="DIR",
                   help="where the compiled programs are kept (default: $JLORA_CACHE/xla, else ~/.cache/jlora/xla)")


def choose(enabled: bool | None, directory: str | None, platform: str) -> str | None:
    """The cache directory to use, or None for no cache: `enabled` None means on unless `platform` is the CPU."""
    if enabled is False or (enabled is None and platform == "cpu"):
        return None
    return os.path.abspath(directory or os.path.join(cache_dir(), "xla"))


def enable(directory: str) -> None:
    """Points JAX's persistent cache at `directory`; programs that took 1 s or more to compile are kept."""
    import jax

    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    log.info("compilation cache: %s", directory)


def configure_from_args(args: argparse.Namespace) -> str | None:
    """Applies the `add_args` flags (after `jax.distributed` is initialized: this starts the backend); returns the
    directory in use, or None."""
    import jax

    directory = choose(args.compilation_cache, args.compilation_cache_dir, jax.default_backend())
    if directory is not None:
        enable(directory)
    return directory
