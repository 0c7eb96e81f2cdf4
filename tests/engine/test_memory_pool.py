"""Sizing the engine from the device's memory pool (`EngineConfig.memory_pool_fraction`, --gpu-memory-utilization)."""

import jax
import numpy as np
import pytest

from jlora.engine import memory
from jlora.engine.engine import Engine, EngineConfig


def _engine(tiny, **kw):
    return Engine(tiny["model"], None, EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_chunk=32,
                                                    page_size=4, max_model_len=64, **kw))


def test_pages_and_slots_fill_what_the_weights_and_activations_leave(tiny, monkeypatch):
    limit = 24 * 2**20
    monkeypatch.setattr(memory, "device_memory_limit", lambda: limit)
    engine = _engine(tiny, memory_pool_fraction=0.5)
    weights = sum(np.asarray(x).nbytes for x in jax.tree.leaves(tiny["model"].params()))
    reserve = memory.activation_bytes(tiny["model"].config, engine.config, np.float32)
    plan = engine.plan
    used = weights + reserve + plan.bank_bytes + plan.num_pages * plan.page_bytes
    assert used <= limit * 0.5 < used + plan.page_bytes + max(plan.bank_bytes // 10, plan.page_bytes)
    assert plan.bank_bytes > 0 and plan.num_pages > 64  # the tiny model: far more than the 64 fixed pages
    assert engine.config.memory_bytes == int(limit * 0.5) - weights - reserve
    # the bound covers a step's logits and a dense prefill chunk's scores at least
    cfg = tiny["model"].config
    assert reserve >= 8 * cfg.vocab_size * 4 + 32 * 64 * cfg.num_heads * 4


def test_a_pool_too_small_names_the_figures(tiny, monkeypatch):
    monkeypatch.setattr(memory, "device_memory_limit", lambda: 2**16)
    with pytest.raises(ValueError, match=r"no memory is left for the KV cache: 90% of the device's 0.00 GiB pool"):
        _engine(tiny, memory_pool_fraction=0.9)


def test_a_device_without_memory_stats_is_refused_clearly(tiny):
    if memory.device_memory_limit() is not None:  # pragma: no cover - these tests run on the CPU
        pytest.fail("expected the CPU backend, which reports no memory pool")
    with pytest.raises(ValueError, match="needs a device that reports its memory .* set num_pages or memory_bytes"):
        _engine(tiny, memory_pool_fraction=0.9)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"memory_pool_fraction must be in \(0, 1\]"):
        EngineConfig(memory_pool_fraction=1.5)
    with pytest.raises(ValueError, match="sizes one device"):
        EngineConfig(memory_pool_fraction=0.9, tp=2)
    with pytest.raises(ValueError, match="sizes one device"):
        EngineConfig(memory_pool_fraction=0.9, memory_bytes=2**30)


def test_serve_flags(monkeypatch, capsys):
    from jlora.cli import build_parser
    from jlora.serve.cli import config_from_args

    for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        monkeypatch.delenv(name, raising=False)
    parse = build_parser().parse_args
    assert config_from_args(parse(["serve"])).engine_config().num_pages == 512
    assert config_from_args(parse(["serve", "--num-pages", "100"])).engine_config().num_pages == 100
    own = config_from_args(parse(["serve", "--gpu-memory-utilization", "0.8"])).engine_config()
    assert own.memory_pool_fraction == 1.0  # the pool is sized to the utilization itself
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "0.9")
    shared = config_from_args(parse(["serve", "--gpu-memory-utilization", "0.45"])).engine_config()
    assert shared.memory_pool_fraction == pytest.approx(0.5)  # half of a pool of 0.9
    with pytest.raises(ValueError, match="not both"):
        config_from_args(parse(["serve", "--gpu-memory-utilization", "0.8", "--num-pages", "10"]))
    with pytest.raises(SystemExit):
        parse(["serve", "--gpu-memory-utilization", "1.5"])
    assert "expected a fraction in (0, 1], got '1.5'" in capsys.readouterr().err
