"""`loraswap <subcommand>`: a thin dispatcher.

Each subcommand lives with the package that owns it and is imported only when used, so
`loraswap base` never imports FastAPI and `loraswap serve` never imports the trainer.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help). Each module exposes `main(argv: list[str]) -> int`.
SUBCOMMANDS = {
    "base": ("adapters.base_cli", "prepare the default base model and print its directory"),
    "serve": ("server.cli", "run the OpenAI-compatible multi-adapter server"),
    "train": ("trainer.cli", "SFT a LoRA / QLoRA adapter on chat data"),
    "merge": ("trainer.merge_cli", "merge adapters (linear, task_arithmetic, ties, dare_*, cat)"),
    "trainer-service": ("trainer.service_cli", "the training sidecar: run fine-tuning jobs queued over the API"),
}


def _usage() -> str:
    lines = ["usage: loraswap <command> [options]", "", "commands:"]
    lines += [f"  {name:<16}{help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"loraswap: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
