"""Shard-major column orders, the logical-axis table and argument checks (one device, in-process)."""

import numpy as np
import pytest

from jlora import sharding
from jlora.config import ModelConfig
from jlora.model.sharded import ShardedModel, ShardPlan, to_shard_layout

CFG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=2,
                  head_dim=8)


def test_qkv_columns_are_shard_major_and_copy_kv_heads():
    plan = ShardPlan(CFG, tp=4)  # K=2 < tp: each kv head goes to the two shards whose q heads use it
    N, K, H = 8, 2, 8
    cols = plan.qkv_columns().reshape(4, -1)  # [tp, local (N/tp + 2 K'/tp) H]
    assert plan.kv_heads == 4 and cols.shape == (4, (2 + 2) * H)
    for s in range(4):
        q, k, v = np.split(cols[s], [2 * H, 3 * H])
        assert list(q) == list(range(s * 2 * H, (s + 1) * 2 * H))
        kv_head = s // 2
        assert list(k) == list(range((N + kv_head) * H, (N + kv_head + 1) * H))
        assert list(v) == list(range((N + K + kv_head) * H, (N + K + kv_head + 1) * H))


def test_columns_are_a_permutation_when_tp_divides_kv_heads():
    for tp in (1, 2):
        plan = ShardPlan(CFG, tp)
        qkv = plan.qkv_columns()
        assert sorted(qkv) == list(range(CFG.q_dim + 2 * CFG.kv_dim))
        assert sorted(plan.gate_up_columns()) == list(range(2 * CFG.intermediate_size))
    assert list(ShardPlan(CFG, 1).qkv_columns()) == list(range(CFG.q_dim + 2 * CFG.kv_dim))


def test_gate_up_columns():
    g = ShardPlan(CFG, 2).gate_up_columns().reshape(2, 2, 64)  # [shard, gate|up, F/tp]
    assert (g[1, 0] == np.arange(64, 128)).all() and (g[1, 1] == 128 + np.arange(64, 128)).all()


def test_layout_pads_vocab_with_zeros():
    rng = np.random.default_rng(0)
    params = {"embed": rng.normal(size=(97, 64)), "final_norm": np.ones(64),
              "lm_head": rng.normal(size=(64, 97)),
              "layers": {"w_qkv": rng.normal(size=(2, 64, 96)), "w_gate_up": rng.normal(size=(2, 64, 256))}}
    out = to_shard_layout(params, ShardPlan(CFG, 4))
    assert out["embed"].shape == (100, 64) and not out["embed"][97:].any()
    assert out["lm_head"].shape == (64, 100) and not out["lm_head"][:, 97:].any()
    assert out["layers"]["w_qkv"].shape == (2, 64, (8 + 2 * 4) * 8)


@pytest.mark.parametrize("tp, message", [(3, "num_heads"), (16, "num_heads")])
def test_plan_rejects_indivisible_tp(tp, message):
    with pytest.raises(ValueError, match=message):
        ShardPlan(CFG, tp)


def test_plan_rejects_kv_heads_tp_mismatch():
    cfg = ModelConfig(vocab_size=10, hidden_size=48, intermediate_size=48, num_layers=1, num_heads=12,
                      num_kv_heads=6, head_dim=4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        ShardPlan(cfg, 4)


def test_logical_table():
    assert sharding.spec("batch", "seq") == sharding.PartitionSpec("data", None)
    assert sharding.spec("layers", "embed", "heads") == sharding.PartitionSpec(None, None, "model")
    assert sharding.mesh_axis("vocab") == sharding.MODEL
    with pytest.raises(ValueError, match="unknown logical axis"):
        sharding.spec("hidden")


def test_make_mesh_checks_device_count():
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    with pytest.raises(ValueError, match="devices"):
        sharding.make_mesh(tp=2, dp=64)
    with pytest.raises(ValueError, match=">= 1"):
        sharding.make_mesh(tp=0)
    assert ShardedModel(CFG, mesh).tp == 1
