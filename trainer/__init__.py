"""The training sidecar: SFT with assistant-only loss, LoRA or QLoRA, and the merge CLI."""
