import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The slowest files first (each tens of CPU seconds or more in a full run), the rest in collection order after them:
# with `--dist loadfile` (scripts/test.sh) a worker that takes a long file late would finish alone, minutes after the
# other. Tests of a file stay together and in their order.
SLOW_FIRST = (
    "test_readme.py", "engine/test_engine.py", "model/test_golden.py", "sharding/test_engine_sharded.py",
    "kernels/test_lora_ops.py", "sharding/test_distributed.py", "sharding/test_sharded_forward.py",
    "kernels/test_mosaic_gpu_lora.py", "serve/test_crash_restart.py", "serve/test_multihost.py", "test_cli.py",
    "serve/test_serve_cli.py", "engine/test_failure_isolation.py", "train/test_train.py",
)


def pytest_collection_modifyitems(items):
    here = os.path.dirname(os.path.abspath(__file__))
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.relpath(str(item.path), here), len(rank)))
