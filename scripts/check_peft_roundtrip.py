"""Hugging Face side of the train round trip: transformers + PEFT load jlora-trained adapters.

Runs in .golden-venv (torch, transformers, peft; see scripts/golden_env.sh); trains nothing. For every
adapter directory under FIXTURE/adapters/, it loads FIXTURE/base with `LlamaForCausalLM`, wraps it with
`PeftModel.from_pretrained(..., adapter)`, and writes the logits for FIXTURE/input_ids.json to
FIXTURE/hf_logits/<adapter>.safetensors (float32). tests/train/test_peft_roundtrip.py compares jlora's
logits with them. The whole fixture is rebuilt by scripts/make_train_roundtrip.sh.

Usage: .golden-venv/bin/python scripts/check_peft_roundtrip.py [FIXTURE]
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import peft
import torch
import transformers
from safetensors.numpy import save_file


def main() -> None:
    fixture = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/train_roundtrip"
    with open(os.path.join(fixture, "input_ids.json")) as f:
        input_ids = torch.tensor(json.load(f), dtype=torch.long)
    out_dir = os.path.join(fixture, "hf_logits")
    os.makedirs(out_dir, exist_ok=True)
    adapters_dir = os.path.join(fixture, "adapters")
    for name in sorted(os.listdir(adapters_dir)):
        base = transformers.LlamaForCausalLM.from_pretrained(os.path.join(fixture, "base"), dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base, os.path.join(adapters_dir, name)).eval()
        loaded = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
        assert loaded > 0, f"PEFT loaded no LoRA weights from {name}"
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits.float().numpy()
            with model.disable_adapter():
                base_logits = model(input_ids=input_ids).logits.float().numpy()
        change = float(np.abs(logits - base_logits).max() / np.abs(base_logits).max())
        assert change > 1e-3, f"{name}: the adapter does not change HF's logits (rel change {change:.2e})"
        save_file({"logits": np.ascontiguousarray(logits)}, os.path.join(out_dir, f"{name}.safetensors"),
                  metadata={"torch": torch.__version__, "transformers": transformers.__version__,
                            "peft": peft.__version__, "lora_tensors": str(loaded)})
        print(f"{name}: {loaded} LoRA tensors loaded by PEFT {peft.__version__}; logits {logits.shape}, "
              f"max rel change vs base {change:.3f}")


if __name__ == "__main__":
    main()
