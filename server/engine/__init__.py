"""The serving engine: one base model, continuous batching over a paged KV cache, per-token LoRA routing."""
