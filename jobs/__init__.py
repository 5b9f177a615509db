"""Fine-tuning jobs shared by the server (API) and the trainer sidecar: files, queue, events, checkpoints."""
