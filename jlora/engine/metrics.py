"""The engine's counters as one flat dict (`Engine.metrics`), which `/metrics` and the async engine's stats read."""

from __future__ import annotations

from jlora.engine.compiles import compile_count
from jlora.engine.prefix_cache import CacheStats


def engine_metrics(engine) -> dict:
    st = engine.store.stats
    cache = engine.allocator.cache.stats if engine.allocator.cache else CacheStats()
    return {"waiting": len(engine.scheduler.waiting), "running": len(engine.scheduler.running),
            "free_pages": engine.allocator.num_free, "pages_total": engine.allocator.num_pages,
            "pages_used": engine.allocator.num_pages - engine.allocator.num_free,
            "tokens_generated": engine.tokens_generated,
            "steps": engine.steps, "preemptions": engine.preemptions,
            "device_state_resets": engine.device_state_resets, "compilations": compile_count(),
            "step_shapes": len(engine.runner.shapes_run),
            "adapter_device_hits": st.device_hits, "adapter_device_misses": st.device_misses,
            "adapter_host_hits": st.host_hits, "adapter_host_misses": st.host_misses,
            "adapters_registered": len(engine.store.current), "sequences": len(engine.requests),
            "adapter_refs": sum(engine.store.refs.values()),
            "prefix_cache_query_tokens": cache.query_tokens, "prefix_cache_hit_tokens": cache.hit_tokens,
            "prefix_cache_hit_rate": cache.hit_rate, "prefix_cache_evictions": cache.evictions,
            "prefix_cache_pages": engine.allocator.num_cached}
