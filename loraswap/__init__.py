"""The `loraswap` command line: one entry point that dispatches to the server, trainer and tools."""
