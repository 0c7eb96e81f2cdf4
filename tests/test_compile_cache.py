"""The persistent compilation cache switch at the command-line edge (`jlora.compile_cache`)."""

import json
import os
import subprocess
import sys

from jlora.compile_cache import choose

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_on_for_accelerators_off_on_the_cpu_unless_asked(monkeypatch, tmp_path):
    monkeypatch.setenv("JLORA_CACHE", str(tmp_path / "jc"))
    assert choose(None, None, "cpu") is None
    assert choose(None, None, "gpu") == str(tmp_path / "jc" / "xla")
    assert choose(None, None, "tpu") == str(tmp_path / "jc" / "xla")
    assert choose(False, None, "gpu") is None and choose(False, str(tmp_path), "gpu") is None
    assert choose(True, None, "cpu") == str(tmp_path / "jc" / "xla")
    assert choose(True, "rel/dir", "cpu") == os.path.abspath("rel/dir")


def test_the_flags_reach_jax_in_generate_and_serve(tmp_path):
    """In a fresh process (the cache is process-wide): the default leaves JAX's cache off on the CPU, and
    --compilation-cache-dir with --compilation-cache points it at the directory, for both commands."""
    code = f"""
import json, jax
from jlora import compile_cache
from jlora.cli import build_parser
parse = build_parser().parse_args
out = {{"default": compile_cache.configure_from_args(parse(["generate", "hi"])),
        "before": jax.config.jax_compilation_cache_dir}}
d = {str(tmp_path / "xla")!r}
out["serve"] = compile_cache.configure_from_args(parse(["serve", "--compilation-cache", "--compilation-cache-dir", d]))
out["after"] = jax.config.jax_compilation_cache_dir
out["off"] = compile_cache.configure_from_args(parse(["generate", "--no-compilation-cache", "hi"]))
print(json.dumps(out))
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["default"] is None and out["before"] is None
    assert out["serve"] == out["after"] == str(tmp_path / "xla") and os.path.isdir(out["after"])
    assert out["off"] is None
