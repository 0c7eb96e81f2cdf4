"""The serving engine: continuous batching over a paged KV cache with tiered adapter caching."""
