"""The Serve application: `Ingress` (the unchanged FastAPI app) over `EngineReplica` x N and the store actor.

`build_application(config, base_dir, replicas, store_actor)` returns what `serve.run` takes. The
ingress builds the app with `create_app(config, ReplicaEngineClient(...), RemoteStore(...))`, so
auth, tenancy, template validation, uploads, merges and errors are the single-process server's own
code. `ReplicaHeader` adds `x-loraswap-replica: <replica>` to each response that ran on a replica,
streams included.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ray import serve

from server.cluster.client import ReplicaEngineClient, current_replica
from server.cluster.replica import EngineReplica
from server.cluster.store import RemoteStore

REPLICA_HEADER = b"x-loraswap-replica"
OVERFLOW_ANSWERS = 32  # requests past admission the ingress may be turning away (503) at once


class ReplicaHeader:
    """ASGI middleware: names the replica that served the request in a response header.

    A plain response starts after its replica answered, so it always carries the header. A stream
    (`text/event-stream`) starts before the first token; its start and first chunks are held back
    until the replica's first token names it (or the stream ends), so streams carry it too. Only
    the role-only first chunk waits, and no longer than the first token would anyway.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        holder: dict = {}
        held: list[dict] = []  # a stream's start and chunks, until the replica is known
        token = current_replica.set(holder)

        def named(message: dict) -> dict:
            if not holder.get("replica"):
                return message
            headers = list(message.get("headers", [])) + [(REPLICA_HEADER, holder["replica"].encode())]
            return {**message, "headers": headers}

        async def send_with_replica(message):
            if message["type"] == "http.response.start" and not holder.get("replica") and _is_stream(message):
                held.append(message)
                return
            if held:
                last = message["type"] == "http.response.body" and not message.get("more_body", False)
                if not holder.get("replica") and not last:
                    held.append(message)
                    return
                start, *chunks = held
                held.clear()
                await send(named(start))
                for chunk in chunks:
                    await send(chunk)
            if message["type"] == "http.response.start":
                message = named(message)
            await send(message)

        try:
            await self.app(scope, receive, send_with_replica)
        finally:
            current_replica.reset(token)


def _is_stream(start: dict) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in start.get("headers", []))


@serve.ingress()
class Ingress:
    """One ingress replica: the FastAPI app over the replicas' client and the remote store."""

    def __init__(self, config, base_dir: str, engines, store_actor):
        self.config, self.base_dir, self.engines, self.store_actor = config, base_dir, engines, store_actor

    def __serve_build_asgi_app__(self):
        from transformers import AutoConfig, AutoTokenizer

        from adapters.base import BaseInfo
        from server.app import create_app

        info = BaseInfo.from_dir(Path(self.base_dir))
        tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        positions = getattr(AutoConfig.from_pretrained(self.base_dir), "max_position_embeddings", None)
        max_len = min(self.config.max_model_len, positions or self.config.max_model_len)
        client = ReplicaEngineClient(self.engines, tokenizer, max_len)
        store = RemoteStore(self.store_actor, Path(tempfile.mkdtemp(prefix="loraswap-ingress-")))
        app = create_app(self.config, client, store, base_info=info)
        app.add_middleware(ReplicaHeader)
        return app


def build_application(
    config,
    base_dir: Path,
    replicas: int,
    store_actor,
    *,
    ingress_config=None,
    replica_cpus: float = 1.0,
    replica_gpus: float = 0.0,
    ingress_cpus: float = 0.5,
    router: str = "bounded",
):
    """The bound Serve application.

    Args:
        config: the `ServerConfig` every replica and the ingress share.
        base_dir: the resolved base directory (present on every node).
        replicas: engine replicas (one engine each; one GPU each when `replica_gpus` is 1).
        store_actor: the `StoreService` actor.
        ingress_config: the ingress's settings when they differ (its admission covers all replicas).
        router: the replica routing policy, "bounded" or "ray" (see `server/cluster/router.py`).
    """
    from ray.serve.config import RequestRouterConfig

    from server.cluster.replica import MODELS_PER_REPLICA

    options: dict[str, Any] = {  # a dict: Ray's pydantic model types its fields oddly for mypy
        "request_router_class": "server.cluster.router.AdapterRouter",
        "request_router_kwargs": {"policy": router, "bound": 1.25, "max_models": MODELS_PER_REPLICA},
    }
    routing = RequestRouterConfig(**options)
    engine = serve.deployment(
        name="EngineReplica",
        num_replicas=replicas,
        # max_ongoing_requests: what one engine's batch plus its queue can hold; Serve queues the rest.
        max_ongoing_requests=config.max_num_seqs + config.max_queue,
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        health_check_period_s=2,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=5,
        request_router_config=routing,
    )(EngineReplica).bind(config, str(base_dir), store_actor)
    admits = ingress_config or config
    ingress = serve.deployment(
        name="Ingress",
        num_replicas=1,
        # Serve's default is 5 ongoing requests per replica: its proxy would queue the rest, and 16
        # concurrent clients would reach the engines 5 at a time (batches of ~4: a third of the
        # throughput, measured by bench/ray_overhead.py). The ingress takes what every replica's
        # batch and queue hold, plus room to answer the overflow with the API's own 503 at once.
        max_ongoing_requests=admits.capacity + OVERFLOW_ANSWERS,
        ray_actor_options={"num_cpus": ingress_cpus},
    )(Ingress)
    return ingress.bind(admits, str(base_dir), engine, store_actor)


def app_builder(args: dict):
    """Application builder for `serve run server.cluster.ingress:app_builder key=value ...` and KubeRay.

    `replicas` (default 2), `router` (default "bounded") and `store` (the store actor's directory,
    default /data/store) are ours;
    every other key is a `loraswap serve` setting by its field name (e.g. `max_loras=8`). Creates the
    store actor on the node that builds the application (get-or-create, so redeploys reuse it).
    """
    from adapters.base import resolve_base
    from server.cluster.launch import STORE_ACTOR, ingress_config
    from server.cluster.store import StoreService
    from server.settings import ServerSettings

    import ray

    args = dict(args)
    replicas = int(args.pop("replicas", 2))
    router = str(args.pop("router", "bounded"))
    root = args.pop("store", "/data/store")
    config = ServerSettings(**args)  # the keys, then LORASWAP_* in the builder's environment
    # A node that offers the custom resource `loraswap_store` (the one with the store's volume) hosts it.
    pinned = {"resources": {"loraswap_store": 1}} if ray.cluster_resources().get("loraswap_store") else {}
    store = (
        ray.remote(StoreService)
        .options(name=STORE_ACTOR, get_if_exists=True, lifetime="detached", max_restarts=-1, num_cpus=0, **pinned)
        .remote(root, config.limits.store_quotas())
    )
    gpus = 1.0 if config.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= replicas else 0.0
    return build_application(
        config,
        resolve_base(config.base),
        replicas,
        store,
        ingress_config=ingress_config(config, replicas),
        replica_gpus=gpus,
        router=router,
    )
