"""Adapter tiers: LRU eviction, prefetch order, pinning, roots, and unloading while in use."""

import os
import time

import pytest
from conftest import BANK
from helpers import TINY, write_adapter

from jlora.config import LoraBankConfig
from jlora.engine.adapter_store import AdapterStore
from jlora.errors import AdapterError, AdapterPathError, CapacityError, UnknownAdapterError

TWO_SLOTS = LoraBankConfig(buckets=(8,), slots=(2,))


@pytest.fixture
def adapters(tmp_path):
    return {n: write_adapter(str(tmp_path / n), r=4, seed=i) for i, n in enumerate("abcde")}


def test_device_lru_evicts_least_recently_used(adapters):
    store = AdapterStore(TINY, TWO_SLOTS)
    for n in "abc":
        store.register(n, adapters[n])
    store.ensure_resident({"a"})
    store.ensure_resident({"b"})
    store.ensure_resident({"a"})  # a is now the most recent
    store.ensure_resident({"c"})
    assert set(store.slots.resident) == {"a", "c"}
    assert store.stats.device_hits == 1 and store.stats.device_misses == 3


def test_in_use_and_pinned_adapters_are_never_evicted(adapters):
    store = AdapterStore(TINY, TWO_SLOTS)
    for n in "abc":
        store.register(n, adapters[n])
    store.pin("a")
    store.ensure_resident({"b"})
    store.acquire("b")
    assert not store.fits({"b", "c"})
    with pytest.raises(CapacityError):
        store.ensure_resident({"c"})
    store.release("b")
    store.ensure_resident({"c"})
    assert set(store.slots.resident) == {"a", "c"}
    store.unpin("a")
    store.ensure_resident({"b"})
    assert set(store.slots.resident) == {"b", "c"}


def test_host_lru_is_bounded_and_prefetch_fills_it_in_order(adapters):
    store = AdapterStore(TINY, TWO_SLOTS, max_cpu_loras=3)
    for n in "abcde":
        store.register(n, adapters[n], eager=False)
    assert not store.host
    store.prefetch(["c", "a", "e", "b"])
    for n in ["c", "a", "e", "b"]:
        store._host_get(n)  # consumes the prefetched loads in order
    assert list(store.host) == ["a", "e", "b"]  # c was least recently used
    assert store.stats.host_misses == 4 and not store._loads
    store.ensure_resident({"e"})
    assert store.stats.host_hits == 1


def test_prefetch_runs_in_the_background(adapters):
    store = AdapterStore(TINY, TWO_SLOTS)
    store.register("a", adapters["a"], eager=False)
    store.prefetch(["a", None, "unknown"])
    deadline = time.time() + 10
    while not store._loads["a"].done() and time.time() < deadline:
        time.sleep(0.01)
    assert store._loads["a"].done() and store._loads["a"].result().name == "a"


def test_paths_must_resolve_inside_roots(tmp_path, adapters):
    root = tmp_path / "root"
    inside = write_adapter(str(root / "x"), r=4)
    store = AdapterStore(TINY, TWO_SLOTS, roots=[str(root)])
    store.register("x", inside)
    with pytest.raises(AdapterPathError, match="outside the allowed adapter roots"):
        store.register("y", adapters["a"])
    os.symlink(adapters["b"], root / "sneaky")
    with pytest.raises(AdapterPathError):
        store.register("z", str(root / "sneaky"))  # a symlink pointing out of the root
    with pytest.raises(AdapterPathError):
        store.register("w", str(root / ".." / "a"))
    assert store.names() == ["x"]


def test_lazy_registration_of_a_bad_adapter_fails_when_used(tmp_path):
    store = AdapterStore(TINY, BANK)
    bad = write_adapter(str(tmp_path / "bad"), r=4)
    with open(os.path.join(bad, "adapter_model.safetensors"), "wb") as f:
        f.write(b"junk")
    store.register("bad", bad, eager=False)
    with pytest.raises(AdapterError, match="'bad'.*safetensors"):
        store.ensure_resident({"bad"})


def test_thousands_can_be_registered(tmp_path):
    store = AdapterStore(TINY, BANK)
    path = write_adapter(str(tmp_path / "a"), r=4)
    for i in range(3000):
        store.register(f"tenant-{i}", path, eager=False)
    assert len(store.names()) == 3000 and not store.host


def test_unload_while_in_use_waits_for_its_sequences(tiny):
    from test_engine import make_engine
    from jlora.sampling import SamplingParams

    engine = make_engine(tiny)
    engine.add_request([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=6), "r8", request_id="a")
    engine.step()
    assert engine.store.unregister("r8") is False  # draining
    with pytest.raises(UnknownAdapterError):
        engine.add_request([1], adapter="r8")
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[-1].finished and len(outs[-1].token_ids) == 6
    assert "r8" not in engine.store.paths and engine.store.slots.slot("r8") is None


def test_queued_requests_do_not_hold_device_slots(adapters):
    """Adapters acquired only by queued requests give way to a batch's adapters (the engine passes `running`)."""
    store = AdapterStore(TINY, TWO_SLOTS)
    for n in "abc":
        store.register(n, adapters[n])
        store.acquire(n)
    store.ensure_resident({"a", "b"})
    with pytest.raises(CapacityError):
        store.ensure_resident({"c"})  # without `running`, every acquired adapter stays
    assert store.ensure_resident({"c"}, running={"b"}) == {"c": 0}  # a: least recently used, not running
    assert set(store.slots.resident) == {"b", "c"}
