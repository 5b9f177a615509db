"""HTTP routers (one per resource), wire-format models, dependencies and the error envelope."""
