"""One process of the two-process `jax.distributed` test (CPU, one device per process, gloo collectives).

Usage: python tests/sharding/_dist_worker.py PORT PROCESS_ID SPEC_JSON OUT_JSON
SPEC_JSON holds {"model": dir, "adapters": {name: dir}, "requests": [{"prompt", "adapter", "sampling"}],
"meshes": [[tp, dp], ...]}; OUT_JSON receives {"tokens": {"tpXdpY": [[...], ...]}, "devices": n, "process_count": n}.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]


def main(port: str, process_id: str, spec_path: str, out_path: str) -> None:
    from jlora import distributed

    distributed.initialize(f"localhost:{port}", 2, int(process_id), timeout_s=60)
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from jlora.config import LoraBankConfig
    from jlora.generate import LLM
    from jlora.sampling import SamplingParams

    with open(spec_path) as f:
        spec = json.load(f)
    reqs, tokens = spec["requests"], {}
    for tp, dp in spec["meshes"]:
        llm = LLM(spec["model"], adapters=spec["adapters"], bank=LoraBankConfig(buckets=(8, 16), slots=(2, 1)),
                  progress=False, tp=tp, dp=dp)
        outs = llm.generate([r["prompt"] for r in reqs], adapter=[r["adapter"] for r in reqs],
                            sampling=[SamplingParams(**r["sampling"]) for r in reqs])
        tokens[f"tp{tp}dp{dp}"] = [o.token_ids for o in outs]
    with open(out_path, "w") as f:
        json.dump({"tokens": tokens, "devices": jax.device_count(),
                   "process_count": jax.process_count()}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
