"""One local Ray cluster per test session (for tests/cluster only): the tiny base served by 2 engine replicas behind the ingress.

Small on purpose (this machine has 2 cores): num_cpus=3, each replica 1 CPU, the ingress 0.5, the
store actor 0; fp32 tiny base, 2 slots, 2 sequences + no queue per replica so 4 concurrent
requests fill both replicas. Ray and Serve are shut down at the end of the session.
"""

from __future__ import annotations

import time

import httpx
import pytest

from loraswap.serve_process import free_port
from server.limits import Limits
from server.settings import ServerConfig

KEYS = {"alice": "key-alice", "bob": "key-bob"}
ADMIN_KEY = "key-admin"


class RayServed:
    def __init__(self, url: str, store):
        self.url, self.store = url, store

    def client(self, tenant: str = "alice", **kwargs) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=120, **kwargs
        )

    def openai(self, tenant: str = "alice"):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEYS[tenant], max_retries=0, timeout=120)

    def replica_actors(self) -> list:
        import ray

        names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "EngineReplica" in a["name"]]
        return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in names]

    def replica_names(self) -> list[str]:
        """The running replicas' names as they report them (Serve's replica unique ids)."""
        from ray import serve

        handle = serve.get_deployment_handle("EngineReplica", app_name="loraswap")
        return [report["replica"] for report in handle.broadcast("ready").results(timeout_s=120)]

    def running_replicas(self) -> int:
        from ray import serve

        app = serve.status().applications.get("loraswap")
        if app is None:
            return 0
        deployment = app.deployments["EngineReplica"]
        return deployment.replica_states.get("RUNNING", 0)


# Package scope: started once per session (only tests/cluster uses it) and stopped as soon as those
# tests end, so Ray's processes do not sit beside the rest of the suite.
@pytest.fixture(scope="package")
def ray_served(tiny_base_dir, tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve

    from server.cluster.launch import deploy

    port = free_port()
    ray.init(num_cpus=3, include_dashboard=False, namespace="loraswap", log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServerConfig(
            quant="none",
            dtype="float32",
            device="cpu",
            max_loras=2,
            max_cpu_loras=4,
            max_model_len=256,
            max_num_seqs=2,
            max_queue=0,
            fold="off",
            kv_cache_bytes=8 * 1024 * 1024,
            api_keys=tuple(KEYS.items()),
            admin_key=ADMIN_KEY,
            # one tenant fills both replicas here (routing tests, not fairness ones)
            limits=Limits(tenant_queue_share=1.0),
        )
        store = deploy(
            config,
            tiny_base_dir,
            2,
            tmp_path_factory.mktemp("ray-store"),
            replica_cpus=1.0,
            replica_gpus=0.0,
            ingress_cpus=0.5,
        )
        served = RayServed(f"http://127.0.0.1:{port}", store)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{served.url}/ready", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("the Ray-served app never became ready")
        yield served
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
