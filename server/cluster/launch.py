"""`loraswap serve --replicas N [--ray-address ADDR]`: the server as a Ray Serve application.

Without `--ray-address` a local Ray instance is started in this process; with it, this process
joins the cluster (`ray start --head` / `ray start --address`) and deploys there. The store actor is
placed on this node (its directory, `--store`, should be a persistent volume); replicas may run
anywhere. Ctrl-C / SIGTERM deletes the application and disconnects.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

log = logging.getLogger("loraswap.cluster")
APP_NAME = "loraswap"
STORE_ACTOR = "loraswap-store"


def ingress_config(config, replicas: int):
    """The ingress admits what all replicas can hold: N x (batch + queue) requests before 503."""
    total = replicas * (config.max_num_seqs + config.max_queue)
    return config.model_copy(update={"max_queue": total - config.max_num_seqs})


def start_store(root: Path, quotas: dict | None = None):
    """The single-writer `StoreService` actor on this node, restarted by Ray if its process dies."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from server.cluster.store import StoreService

    here = ray.get_runtime_context().get_node_id()
    return (
        ray.remote(StoreService)
        .options(
            name=STORE_ACTOR,
            max_restarts=-1,
            max_task_retries=0,
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        )
        .remote(str(root), quotas)
    )


def deploy(
    config,
    base_dir: Path,
    replicas: int,
    store_root: Path,
    *,
    replica_cpus: float = 1.0,
    replica_gpus: float | None = None,
    ingress_cpus: float = 0.5,
    router: str = "bounded",
    local: bool = False,
):
    """Deploy on the connected Ray cluster; returns the store actor. `serve.start` must have run.

    `local`: Ray was started by this process (no `--ray-address`), so this machine's cores are all
    the cluster has and the replicas share what the ingress leaves (replica.py sets threads to it).
    """
    import ray
    from ray import serve

    from server.cluster.ingress import build_application

    cpus = ray.cluster_resources().get("CPU", 1)
    if replicas * replica_cpus + ingress_cpus > cpus:  # e.g. 2 replicas on a 2-core machine: share the cores
        ingress_cpus = min(ingress_cpus, cpus / (2 * replicas + 1))
        replica_cpus = (cpus - ingress_cpus) / replicas
    elif local:  # this process started Ray on this machine alone: the replicas take the spare cores
        replica_cpus = (cpus - ingress_cpus) / replicas
    if replica_gpus is None:  # one GPU per replica when the cluster has enough and the config allows
        gpus = ray.cluster_resources().get("GPU", 0)
        replica_gpus = 1.0 if config.device != "cpu" and gpus >= replicas else 0.0
    store = start_store(store_root, config.limits.store_quotas())
    app = build_application(
        config,
        base_dir,
        replicas,
        store,
        ingress_config=ingress_config(config, replicas),
        replica_cpus=replica_cpus,
        replica_gpus=replica_gpus,
        ingress_cpus=ingress_cpus,
        router=router,
    )
    serve.run(app, name=APP_NAME, route_prefix="/")
    return store


def main(config, replicas: int, ray_address: str | None, router: str = "bounded") -> int:
    import ray
    from ray import serve

    from adapters.base import resolve_base
    from adapters.store import default_store_root

    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    base_dir = resolve_base(config.base)
    # A local instance runs without the dashboard: on a small machine its polling takes a fifth of a
    # core from the engines (join a `ray start --head` cluster to have one).
    ray.init(address=ray_address, namespace=APP_NAME, include_dashboard=False if ray_address is None else None)
    serve.start(http_options={"host": config.host, "port": config.port})
    deploy(
        config,
        base_dir,
        replicas,
        Path(config.store) if config.store else default_store_root(),
        router=router,
        local=ray_address is None,
    )
    log.info("serving on http://%s:%d with %d engine replicas (%s router)", config.host, config.port, replicas, router)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete(APP_NAME)
    ray.shutdown()
    return 0
