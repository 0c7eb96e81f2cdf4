"""FP8 base-weight matmuls at the 8B decode shapes: which form reads half the bytes of bf16.

For each linear weight of a Llama-3-8B layer (qkv, o, gate_up, down) and a decode batch of T tokens, times one
`x @ w` in these forms, in the same run:
  bf16        bf16 weights (the baseline)
  w8a16       jlora's FP8 path today (`jlora.model.quant.matmul`): fp8 weights cast to bf16 inside the dot,
              scaled per output channel after
  w8a8        activations quantized per token on the fly, an fp8 x fp8 dot with f32 accumulation, both scales after
  w8a8_nk     the same with the weight stored transposed ([d_out, d_in], K-major, the layout cuBLASLt's FP8 GEMM reads)
Each time is the looped median of `kernel_timing.time_op`, rotating over enough weight sets that they do not sit in
L2, and is held against its bytes floor (the weight in its format, x and the output, at the copy bandwidth measured
in the same run). `kernel` names what XLA compiled the dot to (from the optimized HLO). `rel_err` is the max error
against the float32 product of the unquantized weight, over the output's max. Prints a table and writes JSON.

  python3 scripts/bench_fp8.py                      # on a GPU
  python3 scripts/bench_fp8.py --smoke --out /tmp/fp8.json   # tiny shapes, to check the script on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jlora.model import quant  # noqa: E402
from kernel_timing import copy_bandwidth, time_op  # noqa: E402  (scripts/ is sys.path[0] when this runs)

SHAPES_8B = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
SHAPES_SMOKE = {"qkv": (128, 192), "down": (256, 128)}
F32, BF16 = jnp.float32, jnp.bfloat16


def _w8a8_nk(x, w_t, s):
    """W8A8 with the weight stored [d_out, d_in]: `quant.matmul`'s w8a8 but contracting w's last axis."""
    xq, xs = quant.quantize_activations(x)
    y = jax.lax.dot_general(xq, w_t, (((1,), (1,)), ((), ())), preferred_element_type=F32)
    return (y * (xs * s)).astype(x.dtype)


FORMS = {
    "bf16": lambda x, w, s: x @ w,
    "w8a16": quant.matmul,
    "w8a8": lambda x, w, s: quant.matmul(x, w, s, "w8a8"),
    "w8a8_nk": _w8a8_nk,
}


def kernel_of(op, args) -> str:
    """What the dot compiled to: cuBLASLt FP8, cuBLAS, a Triton GEMM fusion or another fusion (CPU: 'cpu')."""
    text = jax.jit(op).lower(*args).compile().as_text()
    for marker, name in (("cublas$lt$matmul$f8", "cublasLt fp8"), ("triton_gemm", "triton gemm fusion"),
                         ("__triton", "triton fusion"), ("cublas$lt", "cublasLt"), ("cublas$gemm", "cublas")):
        if marker in text:
            return name
    return jax.default_backend()


def weight_sets(d_in, d_out, form, count, key):
    """`count` (x, w, scale) sets of `form`, and the float32 reference product of the first."""
    sets, ref = [], None
    for k in jax.random.split(key, count):
        kx, kw = jax.random.split(k)
        x = jax.random.normal(kx, (ARGS.tokens, d_in), F32).astype(BF16)
        w = (jax.random.normal(kw, (d_in, d_out), F32) * 0.02).astype(BF16)
        if ref is None:
            ref = np.asarray(x.astype(F32) @ w.astype(F32))
        if form == "bf16":
            sets.append((x, w, jnp.ones((d_out,), F32)))
            continue
        q, s = quant.quantize_weight(w)
        sets.append((x, q.T if form == "w8a8_nk" else q, s))
    return sets, ref


def main():
    rows = []
    copy_bw = copy_bandwidth(1 << 22) if ARGS.smoke else copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s ({jax.devices()[0].device_kind}), T = {ARGS.tokens}", flush=True)
    for name, (d_in, d_out) in (SHAPES_SMOKE if ARGS.smoke else SHAPES_8B).items():
        bf16_bytes = d_in * d_out * 2
        count = int(max(2, min(16, 300e6 // bf16_bytes)))
        for form, op in FORMS.items():
            sets, ref = weight_sets(d_in, d_out, form, count, jax.random.key(d_in + d_out))
            nbytes = sum(a.size * a.dtype.itemsize for a in sets[0]) + ARGS.tokens * d_out * 2
            row = {"weight": name, "d_in": d_in, "d_out": d_out, "tokens": ARGS.tokens, "form": form,
                   "bytes": nbytes, "floor_us": nbytes / copy_bw * 1e6, "rotate_sets": count}
            try:
                row["kernel"] = kernel_of(op, sets[0])
                row["us"] = time_op(op, sets, nbytes / copy_bw * 2) * 1e6
                out = np.asarray(jax.jit(op)(*sets[0]).astype(F32))
                row["rel_err"] = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
                row["pct_floor"] = 100 * row["floor_us"] / row["us"]
            except Exception as e:  # noqa: BLE001 - a form that fails to compile is reported, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            rows.append(row)
            print(f"{name:<8}{form:<9}" + (f"{row['us']:9.1f} us {row['pct_floor']:5.0f}% floor  err "
                                           f"{row['rel_err']:.4f}  {row['kernel']}" if "us" in row
                                           else f"FAILED {row['error'][:200]}"), flush=True)
    for form in FORMS:  # a layer's four products, x the 32 layers of the 8B model
        mine = [r for r in rows if r["form"] == form and "us" in r]
        if len(mine) == len(SHAPES_SMOKE if ARGS.smoke else SHAPES_8B):
            print(f"{form:<9} per decode step (32 layers): {32 * sum(r['us'] for r in mine) / 1e3:.3f} ms, floor "
                  f"{32 * sum(r['floor_us'] for r in mine) / 1e3:.3f} ms")
    result = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "jax": jax.__version__,
              "copy_bandwidth_tb_s": copy_bw / 1e12, "tokens": ARGS.tokens, "rows": rows,
              "command": "python3 scripts/bench_fp8.py " + " ".join(sys.argv[1:])}
    os.makedirs(os.path.dirname(os.path.abspath(ARGS.out)), exist_ok=True)
    with open(ARGS.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {ARGS.out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="decode batch (rows of x)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script on the CPU")
    ap.add_argument("--out", default="benchmarks/results/fp8_matmul_h200.json")
    ARGS = ap.parse_args()
    main()
