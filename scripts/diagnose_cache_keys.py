"""Why a restart misses the persistent compilation cache: start the same small engine twice on one cache directory
and compare what JAX hashed into each program's cache key.

  python scripts/diagnose_cache_keys.py start OUT CACHE [--workers N]   # one start; run it twice, OUT differing
  python scripts/diagnose_cache_keys.py compare OUT_A OUT_B

`start` builds a small engine whose shapes take the GPU kernels (bf16, head_dim 128, 2 layers, a rank-16 bank),
keeps every program in CACHE (no minimum compile time), dumps each lowered module under OUT/ir (`jax_dump_ir_to`),
logs the cache-key component hashes to OUT/log.txt (`jax._src.cache_key` at DEBUG) and warms up two shapes of
each step mode on `--workers` compile threads; it prints the cache hits. `compare` lists the key components that
differ between two starts (read per program in log order: exact for one worker, interleaved by threads
otherwise) and diffs the first lowered modules whose text differs.
"""

from __future__ import annotations

import argparse
import collections
import difflib
import glob
import hashlib
import json
import logging
import os
import re

COMPONENTS = ("computation", "compile_options", "XLA flags", "backend version", "accelerator_config")


def start(out: str, cache: str, workers: int) -> dict:
    import jax
    import jax.numpy as jnp

    os.makedirs(out, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_dump_ir_to", os.path.join(out, "ir"))
    handler = logging.FileHandler(os.path.join(out, "log.txt"))
    handler.setFormatter(logging.Formatter("%(threadName)s %(name)s %(message)s"))
    logger = logging.getLogger("jax._src.cache_key")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)

    from jlora.config import LoraBankConfig, ModelConfig
    from jlora.engine.engine import Engine, EngineConfig
    from jlora.model import Llama, init_params

    hits = [0]
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.__setitem__(0, hits[0] + (event == "/jax/compilation_cache/cache_hits")))
    config = ModelConfig(vocab_size=2048, hidden_size=1024, intermediate_size=2048, num_layers=2, num_heads=8,
                         num_kv_heads=2, head_dim=128)
    params = jax.jit(lambda k: init_params(config, k, jnp.bfloat16))(jax.random.key(0))
    engine = Engine(Llama(config, params), None, EngineConfig(
        max_num_seqs=8, num_pages=256, max_model_len=512, bank=LoraBankConfig(buckets=(16,), slots=(4,))))
    shapes = []
    for shape in engine.runner.bucket_shapes(engine.config.max_prefill_chunk):
        if sum(s[0] == shape[0] for s in shapes) < 2:
            shapes.append(shape)
    engine.store.slots.warmup()
    engine.runner.warmup(engine.store.bank, engine.config.max_prefill_chunk, shapes=shapes, workers=workers)
    result = {"shapes": len(shapes), "workers": workers, "cache_hits": hits[0]}
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f)
    return result


def _keys(out: str) -> list[dict]:
    """Each program's {component: hash}, in log order."""
    keys, current = [], {}
    with open(os.path.join(out, "log.txt")) as f:
        for line in f:
            m = re.search(r"get_cache_key hash of serialized (.+): ([0-9a-f]+)$", line.strip())
            if m:
                current[m.group(1)] = m.group(2)
                if m.group(1) == "custom_hook":  # the last component of a key
                    keys.append(current)
                    current = {}
    return keys


def _modules(out: str) -> dict[str, list[tuple[str, str]]]:
    """Dumped module text by file name without its sequence number."""
    found = collections.defaultdict(list)
    for path in sorted(glob.glob(os.path.join(out, "ir", "*"))):
        with open(path, errors="replace") as f:
            found[re.sub(r"^jax_ir\d+_", "", os.path.basename(path))].append((path, f.read()))
    return found


def compare(a: str, b: str) -> None:
    ka, kb = _keys(a), _keys(b)
    print(f"cache keys: {len(ka)} vs {len(kb)}")
    for name in COMPONENTS:
        ca = collections.Counter(k.get(name) for k in ka)
        cb = collections.Counter(k.get(name) for k in kb)
        print(f"{name}: {len(ca)} / {len(cb)} distinct hashes; {sum((ca - cb).values())} of A's not in B")
    ma, mb = _modules(a), _modules(b)
    shown = 0
    for name in sorted(ma):
        ta, tb = [t for _, t in ma[name]], [t for _, t in mb.get(name, [])]
        if sorted(map(_sha, ta)) == sorted(map(_sha, tb)):
            continue
        print(f"differs: {name} ({len(ta)} vs {len(tb)} modules)")
        for (pa, xa), (pb, xb) in zip(ma[name], mb.get(name, [])):
            if xa != xb and shown < 3:
                diff = difflib.unified_diff(xa.splitlines(), xb.splitlines(), pa, pb, n=0, lineterm="")
                print("\n".join(line[:400] for line in list(diff)[:20]))
                shown += 1
                break


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="one start of the small engine")
    s.add_argument("out")
    s.add_argument("cache")
    s.add_argument("--workers", type=int, default=8, help="compile threads of the warm-up (1: one at a time)")
    c = sub.add_parser("compare", help="compare two starts")
    c.add_argument("a")
    c.add_argument("b")
    args = p.parse_args()
    if args.command == "start":
        print(json.dumps(start(args.out, args.cache, args.workers)))
    else:
        compare(args.a, args.b)


if __name__ == "__main__":
    main()
