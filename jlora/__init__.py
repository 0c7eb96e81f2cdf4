"""jlora: one base LLM, thousands of LoRA adapters, in JAX."""
