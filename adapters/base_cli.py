"""`loraswap base [--base default|PATH]`: prepare a base and print its directory as the last line."""

from __future__ import annotations

import argparse

from adapters.base import BaseInfo, resolve_base


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loraswap base", description=__doc__)
    parser.add_argument("--base", default="default", help="'default' or a local HF model directory")
    args = parser.parse_args(argv)
    path = resolve_base(args.base)
    info = BaseInfo.from_dir(path)
    print(f"model_type={info.model_type} layers={info.num_layers} vocab={info.vocab_size}")
    print(f"fingerprint={info.fingerprint}")
    print(path)
    return 0
