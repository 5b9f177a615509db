"""`loraswap serve --train-in-process`: flags reach the config, and the child sidecar runs jobs on the same database."""

from __future__ import annotations

import io
import json

from jobs.config import JobsConfig
from tests.server.live import LiveServer, wait_until

KEY = "sk-solo-0123456789"
ROWS = [{"prompt": f"Question {i}?", "completion": "Answer."} for i in range(4)]


def test_flags_and_environment_reach_the_jobs_config(tmp_path, monkeypatch):
    from server.cli import parse_args

    monkeypatch.setenv("LORASWAP_SERVICE_KEY", "svc-from-the-environment")
    config = parse_args(
        [
            "--train-in-process",
            "--jobs-dir",
            str(tmp_path),
            "--max-file-mb",
            "2",
            "--max-files-per-tenant",
            "5",
            "--max-active-jobs-per-tenant",
            "1",
        ]
    )
    assert config.train_in_process
    assert config.jobs == JobsConfig(
        root=tmp_path,
        max_file_bytes=2 * 1024 * 1024,
        max_files_per_tenant=5,
        max_active_jobs_per_tenant=1,
        service_key="svc-from-the-environment",
    )


def test_the_child_sidecar_trains_and_publishes_for_the_server(tiny_base_dir, tiny_tokenizer_for_jobs, tmp_path):
    import openai

    from adapters.base import BaseInfo
    from adapters.store import AdapterStore
    from server import trainer_child
    from server.app import create_app
    from server.settings import ServerConfig
    from tests.server.fake_engine import FakeEngine

    store = AdapterStore(tmp_path / "store")
    config = ServerConfig(
        base=str(tiny_base_dir), device="cpu", max_model_len=256, api_keys=(("solo", KEY),), train_in_process=True
    )
    config = trainer_child.prepare(config, store.root)
    assert config.jobs.root == tmp_path / "jobs" and len(config.jobs.service_key) >= 32  # made for this run
    app = create_app(config, FakeEngine(tiny_tokenizer_for_jobs), store, base_info=BaseInfo.from_dir(tiny_base_dir))
    with LiveServer(app) as live:
        child = trainer_child.start(config.model_copy(update={"port": live.port}))
        try:
            client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60)
            data = "\n".join(json.dumps(r) for r in ROWS).encode()
            uploaded = client.files.create(file=("t.jsonl", io.BytesIO(data)), purpose="fine-tune")
            job = client.fine_tuning.jobs.create(
                model=app.state.loraswap.base_id,
                training_file=uploaded.id,
                hyperparameters={"n_epochs": 1, "batch_size": 4},
            )
            assert wait_until(
                lambda: (
                    client.fine_tuning.jobs.retrieve(job.id).status != "queued"
                    and client.fine_tuning.jobs.retrieve(job.id).status != "running"
                ),
                timeout=300,
                interval=0.2,
            )
            done = client.fine_tuning.jobs.retrieve(job.id)
            assert done.status == "succeeded", done.error
            assert store.get("solo", done.fine_tuned_model).rank == 16
        finally:
            trainer_child.stop(child)
    assert child.returncode == 0  # SIGTERM: the idle sidecar exits cleanly
