"""The OpenAI-compatible multi-adapter server: HTTP layer (api/) over the engine (engine/)."""
