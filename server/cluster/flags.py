"""`--replicas N`, `--ray-address ADDR` and `--router bounded|ray`, taken off `loraswap serve`'s argv before the server's own flags.

Kept apart (and free of Ray imports) so the single-process server's flag parsing is untouched and
`loraswap serve` without `--replicas` never imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

ROUTERS = ("bounded", "ray")  # server/cluster/router.py POLICIES (kept here: no Ray import)


@dataclass(frozen=True)
class ClusterFlags:
    replicas: int | None = None  # None: the single-process server
    ray_address: str | None = None  # None: start a local Ray instance
    router: str | None = None  # None: "bounded" (server/cluster/router.py); "ray": Serve's own routing

    def __post_init__(self):
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.replicas}")
        if self.ray_address is not None and self.replicas is None:
            raise ValueError("--ray-address needs --replicas")
        if self.router is not None and self.router not in ROUTERS:
            raise ValueError(f"--router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.router is not None and self.replicas is None:
            raise ValueError("--router needs --replicas")


def split_cluster_flags(argv: list[str]) -> tuple[list[str], ClusterFlags]:
    """(argv without the cluster flags, the cluster flags). Raises ValueError naming a bad flag."""
    rest, found = [], {}
    args = iter(argv)
    for arg in args:
        key, eq, value = arg.partition("=")
        if key in ("--replicas", "--ray-address", "--router"):
            if not eq:
                following = next(args, None)
                if following is None:
                    raise ValueError(f"{key} needs a value")
                value = following
            found[key] = value
        else:
            rest.append(arg)
    replicas = found.get("--replicas")
    try:
        count = int(replicas) if replicas is not None else None
    except ValueError:
        raise ValueError(f"--replicas must be an integer, got {replicas!r}") from None
    return rest, ClusterFlags(count, found.get("--ray-address"), found.get("--router"))
