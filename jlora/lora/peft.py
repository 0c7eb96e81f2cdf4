"""Reads PEFT LoRA adapters (safetensors only, never pickle) into the bank's padded, scaled layout."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from jlora.config import FUSED_MODULES, LORA_GROUPS, LORA_MODULES, LoraBankConfig, ModelConfig, model_lora_modules
from jlora.errors import AdapterError, AdapterPathError
from jlora.lora.bank import group_dims

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)"
                  r"\.lora_([AB])(?:\.[\w-]+)?\.weight$")
# module -> (group, slice of the group); a fused checkpoint module (Phi-3's qkv_proj) is the whole group (None).
_MODULE_OF = {m: (g, i) for g, ms in LORA_GROUPS.items() for i, m in enumerate(ms)}
_MODULE_OF.update({m: (g, None) for m, g in FUSED_MODULES.items()})
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20  # an 8B model's all-linear adapter has a header of well under 1 MiB
# One message for a missing directory, a file, and a directory without a config: a load request cannot probe
# which paths exist on the server.
NO_ADAPTER = f"no adapter there: the directory does not exist or has no {CONFIG_FILE}"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """What an adapter_config.json says, checked."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    def rank_alpha(self, module_name: str) -> tuple[int, float]:
        """(r, alpha) of one module, e.g. "model.layers.3.self_attn.q_proj", as PEFT resolves patterns."""
        r = _match_pattern(self.rank_pattern, module_name, self.r)
        alpha = _match_pattern(self.alpha_pattern, module_name, self.lora_alpha)
        return int(r), float(alpha)

    def scale(self, module_name: str) -> float:
        r, alpha = self.rank_alpha(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclasses.dataclass
class LoraAdapter:
    """An adapter padded to its bucket with its scale folded into B, ready for `bank.write_slot`.

    Attributes:
      a: group -> [L, d_in, n * bucket], or None for a group the adapter does not target.
      b: group -> tuple of n [L, bucket, d_j], or None likewise. Arrays are in the dtype `load_adapter` was given
        (the bank's, so a slot write moves no more bytes than it must).
    """

    name: str
    path: str
    rank: int
    bucket: int
    targets: tuple[str, ...]
    a: dict[str, np.ndarray]
    b: dict[str, tuple[np.ndarray, ...]]

    @property
    def nbytes(self) -> int:
        return (sum(x.nbytes for x in self.a.values() if x is not None)
                + sum(x.nbytes for xs in self.b.values() if xs is not None for x in xs))

    def dense(self, config: ModelConfig) -> tuple[dict, dict]:
        """(a, b) with zeros in place of the groups this adapter does not target."""
        L, r = config.num_layers, self.bucket
        a, b = dict(self.a), dict(self.b)
        for group, (d_in, d_outs) in group_dims(config).items():
            if group in a and a[group] is None:
                a[group] = np.zeros((L, d_in, len(d_outs) * r), np.float32)
                b[group] = tuple(np.zeros((L, r, d), np.float32) for d in d_outs)
        return a, b


def _match_pattern(patterns: dict, module_name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module_name):
            return value
    return default


def adapter_file(path: str, file: str, roots=None) -> str:
    """The resolved path of `file` inside the adapter directory `path` (symlinks resolved). With `roots`
    (resolved directories), a file that resolves outside all of them raises `AdapterPathError`: a symlinked
    weights file must not reach outside the roots even when its directory is inside."""
    real = os.path.realpath(os.path.join(path, file))
    if roots is not None and not any(real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
        raise AdapterPathError(f"{file} resolves outside the allowed adapter roots")
    return real


def read_spec(path: str, roots=None) -> AdapterSpec:
    """The checked `adapter_config.json` of the adapter directory `path`. Messages name files relative to the
    adapter directory: a server's paths never reach a client."""
    cfg_path = adapter_file(path, CONFIG_FILE, roots)
    if not os.path.isfile(cfg_path):
        raise AdapterError(NO_ADAPTER)
    try:
        if os.path.getsize(cfg_path) > MAX_CONFIG_BYTES:
            raise AdapterError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
        with open(cfg_path, "rb") as f:
            cfg = json.loads(f.read())
    except (ValueError, RecursionError) as e:  # JSON, UTF-8 and integer-size errors
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {str(e)[:200]}") from None
    except OSError as e:
        raise AdapterError(f"{CONFIG_FILE} cannot be read: {e.strerror}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object")
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"peft_type {peft_type!r} is not supported; only LORA adapters can be served")
    if cfg.get("use_dora"):
        raise AdapterError("DoRA adapters (use_dora=true) are not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"adapters with trained biases (bias={cfg['bias']!r}) are not supported")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"modules_to_save {cfg['modules_to_save']} is not supported: "
                           "only LoRA deltas on attention and MLP projections can be served")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        # PEFT may save full paths ("model.layers.0.mlp.down_proj"); the module is the last component.
        targets = [str(t).rsplit(".", 1)[-1] for t in targets]
        unknown = sorted(set(targets) - set(_MODULE_OF))
        if unknown:
            raise AdapterError(f"unknown target modules {unknown}; supported: {list(LORA_MODULES)}, "
                               f"{list(FUSED_MODULES)} (Phi-3) or 'all-linear'")
        targets = tuple(sorted(set(targets)))
    elif not isinstance(targets, str):
        raise AdapterError(f"target_modules must be a list or a string, got {targets!r}")
    try:
        r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
        rank_pattern = {str(k): int(v) for k, v in (cfg.get("rank_pattern") or {}).items()}
        alpha_pattern = {str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()}
    except (TypeError, ValueError, AttributeError, OverflowError) as e:
        raise AdapterError(f"bad r / lora_alpha / patterns in {CONFIG_FILE}: {e}") from None
    if r <= 0 or any(v <= 0 for v in rank_pattern.values()):
        raise AdapterError(f"ranks must be positive, got r={r}, rank_pattern={rank_pattern}")
    if not math.isfinite(alpha) or not all(math.isfinite(v) for v in alpha_pattern.values()):
        raise AdapterError(f"lora_alpha and alpha_pattern must be finite in {CONFIG_FILE}")
    return AdapterSpec(r=r, lora_alpha=alpha, use_rslora=bool(cfg.get("use_rslora", False)),
                       target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def read_header(weights: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (safetensors dtype, shape)} from a safetensors file's header, checked against the file's
    size before any tensor is read: the header is at most `MAX_HEADER_BYTES`, every tensor's byte range matches
    its dtype and shape and lies inside the file."""
    try:
        size = os.path.getsize(weights)
        with open(weights, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise AdapterError(f"{WEIGHTS_FILE} is not a readable safetensors file: bad header length")
            header = json.loads(f.read(n))
    except (ValueError, RecursionError) as e:
        raise AdapterError(f"{WEIGHTS_FILE} is not a readable safetensors file: {str(e)[:200]}") from None
    except OSError as e:
        raise AdapterError(f"{WEIGHTS_FILE} cannot be read: {e.strerror}") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{WEIGHTS_FILE} is not a readable safetensors file: the header is not an object")
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = (dtype in _DTYPE_BYTES and all(isinstance(d, int) and 0 <= d < 1 << 31 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= size - 8 - n
                  and end - begin == math.prod(shape) * _DTYPE_BYTES[dtype])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {str(key)[:100]!r} has a malformed header entry")
        out[key] = (dtype, shape)
    return out


def _read_weights(path: str, config: ModelConfig, bank_config: LoraBankConfig, spec: AdapterSpec,
                  roots=None) -> dict[str, np.ndarray]:
    """The adapter's tensors, each checked (name, layer, shape, rank) from the header before any is read."""
    weights = adapter_file(path, WEIGHTS_FILE, roots)
    if not os.path.isfile(weights):
        pickled = [f for f in _PICKLE_FILES if os.path.exists(os.path.join(path, f))]
        if pickled:
            raise AdapterError(f"the adapter has only {pickled[0]} (a pickle); jlora never unpickles "
                               f"files: re-save it with safe_serialization=True to get {WEIGHTS_FILE}")
        raise AdapterError(f"the adapter has no {WEIGHTS_FILE}")
    modules = model_lora_modules(config)
    header = read_header(weights)
    for key in header:  # names first: an adapter of another family fails on its modules, not on a shape
        m = _KEY.match(key)
        if m is None or m.group(2) not in _MODULE_OF:
            raise AdapterError(f"unexpected tensor {key[:100]!r}: only lora_A/lora_B of {list(modules)} "
                               "are supported")
        if m.group(2) not in modules:
            raise AdapterError(f"{m.group(2)} is not a module of this {config.model_type} base model: its "
                               f"adapters target {list(modules)}")
    for key, (_, shape) in header.items():
        layer, module, side = _KEY.match(key).group(1, 2, 3)
        layer = int(layer)
        if layer >= config.num_layers:
            raise AdapterError(f"{key}: layer {layer} does not exist in a base model of {config.num_layers} layers")
        d_in, d_out = _module_dims(config, module)
        r, _ = spec.rank_alpha(_module_name(layer, module))
        want = (r, d_in) if side == "A" else (d_out, r)
        if shape != want:
            raise AdapterError(f"layer {layer} {module}: shape mismatch with the base model or the config: "
                               f"lora_{side} {shape}, expected {want} (r={r})")
        if r > bank_config.max_rank:
            raise AdapterError(f"rank {r} is above the largest rank bucket ({bank_config.max_rank}); "
                               f"configure a larger bucket to serve it")
    try:
        return load_file(weights)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise AdapterError(f"{WEIGHTS_FILE} is not a readable safetensors file: {str(e)[:200]}") from None


def _covers(module: str, jlora_module: str) -> bool:
    """Whether an adapter's `module` (jlora's or a fused checkpoint module) changes `jlora_module`."""
    group, j = _MODULE_OF[module]
    return module == jlora_module or (j is None and jlora_module in LORA_GROUPS[group])


def _module_dims(config: ModelConfig, module: str) -> tuple[int, int]:
    """(d_in, d_out) of one module; a fused module's d_out is its group's summed."""
    group, j = _MODULE_OF[module]
    d_in, d_outs = group_dims(config)[group]
    return d_in, sum(d_outs) if j is None else d_outs[j]


def _module_name(layer: int, module: str) -> str:
    part = "mlp" if _MODULE_OF[module][0] in ("gate_up", "down") else "self_attn"
    return f"model.layers.{layer}.{part}.{module}"


def load_adapter(path: str, config: ModelConfig, bank_config: LoraBankConfig, name: str | None = None,
                 dtype=np.float32, roots=None) -> LoraAdapter:
    """Reads, checks, pads and scales one PEFT adapter into `dtype` arrays (None for untargeted groups).
    Raises `AdapterError` naming any problem (files relative to the adapter directory). With `roots`, every
    file must resolve inside one of them (`adapter_file`)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise AdapterError(NO_ADAPTER)
    spec = read_spec(path, roots)
    tensors = _read_weights(path, config, bank_config, spec, roots)
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        layer, module, side = int(m.group(1)), m.group(2), m.group(3)
        pairs.setdefault((layer, module), {})[side] = value
    if not pairs:
        raise AdapterError("the adapter holds no LoRA weights")

    dims = group_dims(config)
    ranks = {}
    for (layer, module), ab in sorted(pairs.items()):
        where = f"layer {layer} {module}"
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{where}: lora_A and lora_B must both be present")
        d_in, d_out = _module_dims(config, module)
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{where}: shape mismatch with the base model: lora_A {a.shape}, lora_B {b.shape}; "
                               f"expected [r, {d_in}] and [{d_out}, r]")
        module_name = _module_name(layer, module)
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            raise AdapterError(f"{where}: weights contain NaN or Inf")
        ranks[(layer, module)] = (a.shape[0], spec.scale(module_name), module_name)

    outside = sorted({m for _, m in pairs if _MODULE_OF[m][0] not in bank_config.groups})
    if outside:
        raise AdapterError(f"adapter targets {outside}, which this server's bank does not serve "
                           f"(it serves {list(bank_config.modules)})")
    rank = max(r for r, _, _ in ranks.values())
    if rank > bank_config.max_rank:
        raise AdapterError(f"rank {rank} is above the largest rank bucket ({bank_config.max_rank}); "
                           f"configure a larger bucket to serve it")
    bucket = bank_config.bucket_for(rank)
    L = config.num_layers
    out_a, out_b = {}, {}
    for group in bank_config.groups:
        d_in, d_outs = dims[group]
        if not any(_MODULE_OF[module][0] == group for _, module in pairs):
            out_a[group] = out_b[group] = None
            continue
        a_full = np.zeros((L, d_in, len(d_outs) * bucket), dtype)
        b_full = [np.zeros((L, bucket, d), dtype) for d in d_outs]
        offsets = np.cumsum((0,) + d_outs)
        for (layer, module), ab in pairs.items():
            g, slice_j = _MODULE_OF[module]
            if g != group:
                continue
            r, scale, _ = ranks[(layer, module)]
            a, b = ab["A"].astype(np.float32).T, ab["B"].astype(np.float32).T * scale  # [d_in, r], [r, d_out]
            # A fused module's delta x A B splits exactly by output columns: every slice gets the whole A and
            # its own columns of B (the shrink then runs A once per slice).
            for j in range(len(d_outs)) if slice_j is None else (slice_j,):
                a_full[layer, :, j * bucket:j * bucket + r] = a
                b_full[j][layer, :r, :] = b if slice_j is not None else b[:, offsets[j]:offsets[j + 1]]
        out_a[group], out_b[group] = a_full, tuple(b_full)
    targets = tuple(m for m in LORA_MODULES if any(_covers(mod, m) for _, mod in pairs))
    return LoraAdapter(name=name or os.path.basename(os.path.normpath(path)), path=path, rank=rank, bucket=bucket,
                       targets=targets, a=out_a, b=out_b)
