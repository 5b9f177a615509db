"""The adapter as a value: PEFT LoRA format, validation against a base, the store, merging.

Importable without FastAPI or training code; both the server and the trainer build on it.
"""
