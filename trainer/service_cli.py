"""`loraswap trainer-service`: flags / `LORASWAP_*` environment -> `ServiceConfig` -> the sidecar loop.

It must share the server's jobs database and files folder (`--jobs-dir`, or `--jobs-db` and
`--files-dir`) and know the server's URL and service key. SIGTERM stops it after the current
training step and hands its job back to the queue (it resumes from its last checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="loraswap trainer-service", description="Run queued fine-tuning jobs and publish their adapters."
    )
    p.add_argument(
        "--jobs-dir",
        type=Path,
        default=env("LORASWAP_JOBS_DIR"),
        help="the server's jobs folder (default: ~/.local/share/loraswap/jobs)",
    )
    p.add_argument("--jobs-db", type=Path, default=env("LORASWAP_JOBS_DB"), help="the jobs database file")
    p.add_argument("--files-dir", type=Path, default=env("LORASWAP_FILES_DIR"), help="uploaded training files")
    p.add_argument("--server-url", default=env("LORASWAP_SERVER_URL", "http://127.0.0.1:8000"))
    p.add_argument("--service-key", default=env("LORASWAP_SERVICE_KEY"), help="or LORASWAP_SERVICE_KEY")
    p.add_argument("--base", default=env("LORASWAP_BASE", "default"), help="the base the server serves")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-length", type=int, default=1024, help="tokens kept per conversation")
    p.add_argument(
        "--lease-s",
        type=float,
        default=60.0,
        help="seconds without a heartbeat before a job is taken over by another sidecar",
    )
    p.add_argument("--poll-s", type=float, default=2.0, help="seconds between looks at an empty queue")
    p.add_argument("--max-attempts", type=int, default=3, help="sidecar deaths a job survives before it fails")
    p.add_argument("--once", action="store_true", help="exit when the queue is empty")
    return p


def main(argv: list[str]) -> int:
    from jobs.config import JobsConfig
    from trainer.service import ServiceConfig, TrainerService

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = ServiceConfig(
            jobs=JobsConfig(root=args.jobs_dir, db_path=args.jobs_db, files_dir=args.files_dir),
            server_url=args.server_url,
            service_key=args.service_key or "",
            base=args.base,
            device=args.device,
            dtype=args.dtype,
            max_length=args.max_length,
            lease_s=args.lease_s,
            poll_s=args.poll_s,
            max_attempts=args.max_attempts,
            once=args.once,
        )
    except ValueError as exc:
        parser.error(str(exc))
    service = TrainerService(config)
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    try:
        service.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
