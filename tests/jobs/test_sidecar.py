"""Fine-tuning end to end on the tiny base: a live server (real engine), the real sidecar, the openai client.

- upload -> job -> events until `succeeded` -> chat with `fine_tuned_model`, whose greedy answer
  equals PEFT's with the published adapter (and differs from the base's);
- cancel mid-run: the sidecar stops, nothing is published;
- bad data, a NaN loss and OOM end the job `failed` with an error object; the server keeps serving;
- a sidecar killed with SIGKILL mid-job: another one resumes it from its checkpoint and it ends once.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from jobs.config import JobsConfig
from tests.server.live import wait_until
from tests.server.real import real_live_server
from tests.server.test_real_engine import MAX_TOKENS, QUESTION, _reference_reply

KEYS = {"alice": "sk-alice-0123456789", "bob": "sk-bob-9876543210"}
SERVICE_KEY = "svc-sidecar-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[2]
ROWS = [
    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Rome is the capital."}]}
    for q in (
        "What is the capital of France?",
        "What is the capital of Italy?",
        "Hello!",
        "Answer briefly.",
        "How can I help you today?",
        "Numbers 0 1 2 3?",
        "abc?",
        "The capital of France is?",
    )
]
TERMINAL_PREFIXES = ("New fine-tuned model created", "Job failed", "Job cancelled")


def _jsonl(rows) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


@pytest.fixture(scope="module")
def live(tiny_base_dir, tmp_path_factory):
    from server.settings import ServerConfig

    root = tmp_path_factory.mktemp("ft")
    jobs = JobsConfig(root=root / "jobs", service_key=SERVICE_KEY)
    config = ServerConfig(max_model_len=512, api_keys=tuple(KEYS.items()), jobs=jobs)
    with real_live_server(tiny_base_dir, root / "store", config) as server:
        server.jobs, server.base_dir = jobs, tiny_base_dir
        yield server


def _client(live, tenant="alice"):
    import openai

    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEYS[tenant], max_retries=0, timeout=60)


def _service(live, **overrides):
    from trainer.service import ServiceConfig, TrainerService

    settings = dict(
        jobs=live.jobs,
        server_url=live.url,
        service_key=SERVICE_KEY,
        base=str(live.base_dir),
        device="cpu",
        lease_s=30,
        poll_s=0.1,
        once=True,
    )
    settings.update(overrides)
    return TrainerService(ServiceConfig(**settings))


def _create_job(live, rows=ROWS, tenant="alice", **hyper):
    client = _client(live, tenant)
    uploaded = client.files.create(file=("train.jsonl", io.BytesIO(_jsonl(rows))), purpose="fine-tune")
    hyperparameters = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 50, **hyper}
    return client.fine_tuning.jobs.create(
        model=live.state.base_id,
        training_file=uploaded.id,
        suffix="rome",
        seed=3,
        hyperparameters=hyperparameters,
        extra_body={"method": {"type": "supervised", "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}}},
    )


def _prompt_ids(live, model: str) -> list[int]:
    import httpx

    response = httpx.post(
        f"{live.url}/tokenize",
        json={"model": model, "messages": QUESTION},
        headers={"Authorization": f"Bearer {KEYS['alice']}"},
    )
    return response.json()["tokens"]


def _events(live, job_id, tenant="alice") -> list:
    """All events, oldest first."""
    return list(reversed(list(_client(live, tenant).fine_tuning.jobs.list_events(job_id, limit=7))))  # pages by `after`


def _terminal(events) -> list:
    return [e for e in events if e.message.startswith(TERMINAL_PREFIXES)]


def test_openai_client_fine_tunes_then_chats_with_the_model(live):
    client = _client(live)
    job = _create_job(live, n_epochs=4)
    service = _service(live, once=False)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:

        def finished():
            events = [e.message for e in client.fine_tuning.jobs.list_events(job.id)]
            return any(m.startswith(TERMINAL_PREFIXES) for m in events)

        assert wait_until(finished, timeout=600, interval=0.2)
    finally:
        service.stop()
        thread.join(timeout=120)
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "ft-rome-" + job.id.split("-", 1)[1] and done.trained_tokens > 0
    events = _events(live, job.id)
    steps = [
        e.data["step"]
        for e in events
        if e.type == "metrics"
        and "train_loss" in e.data
        and "epoch" in e.data
        and not e.message.startswith("Checkpoint")
    ]
    assert steps == list(range(1, 9))  # 8 conversations / batch 4 = 2 steps per epoch, 4 epochs
    assert len(_terminal(events)) == 1
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints] == [8, 6, 4, 2] and checkpoints[0].metrics.train_loss > 0
    assert not (live.jobs.work / job.id).exists()  # published: its checkpoints are gone

    # the published adapter is in alice's namespace, with provenance, and serves like PEFT
    record = live.state.store.get("alice", done.fine_tuned_model)
    assert record.template_sha256
    assert done.fine_tuned_model in [m.id for m in client.models.list().data]
    assert done.fine_tuned_model not in [m.id for m in _client(live, "bob").models.list().data]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompt = _prompt_ids(live, done.fine_tuned_model)
    base_model = AutoModelForCausalLM.from_pretrained(live.base_dir, dtype=torch.float32).eval()
    base_reply = _reference_reply(base_model, live.engine.tokenizer, prompt)
    peft_model = PeftModel.from_pretrained(base_model, str(live.state.store.adapter_dir(record))).eval()
    expected = _reference_reply(peft_model, live.engine.tokenizer, prompt)
    assert expected != base_reply, "training did not change the answer; the test would prove nothing"
    chat = client.chat.completions.create(
        model=done.fine_tuned_model, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0
    )
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == expected[1:]
    with pytest.raises(Exception) as info:  # bob cannot use alice's model
        _client(live, "bob").chat.completions.create(model=done.fine_tuned_model, messages=QUESTION, max_tokens=2)
    assert getattr(info.value, "status_code", None) == 404


def test_cancel_mid_run_stops_the_sidecar_and_publishes_nothing(live):
    client = _client(live)
    job = _create_job(live, n_epochs=50, batch_size=1)
    service = _service(live)
    thread = threading.Thread(target=service.run_one, daemon=True)
    thread.start()
    assert wait_until(
        lambda: any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id)),
        timeout=300,
        interval=0.05,
    )
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    thread.join(timeout=300)
    assert not thread.is_alive()
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "cancelled" and done.fine_tuned_model is None
    events = _events(live, job.id)
    assert events[-1].message == "Job cancelled"  # nothing the sidecar did afterwards was recorded
    assert len(_terminal(events)) == 1
    assert not any(r.name.endswith(job.id.split("-", 1)[1]) for r in live.state.store.list("alice"))
    assert [s.step_number for s in client.fine_tuning.jobs.checkpoints.list(job.id)] == []  # 400 steps never ran


def _poisoned_base(base_dir: Path, out: Path) -> Path:
    """The tiny base with one projection's weights set to NaN: every forward gives a NaN loss."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(base_dir, out)
    weights = out / "model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return out


def test_bad_data_nan_loss_and_oom_fail_the_job_and_the_server_keeps_serving(live, tmp_path, monkeypatch):
    client = _client(live)
    # bad data: no assistant token survives the sidecar's truncation
    job = _create_job(live)
    _service(live, max_length=8).run_one()
    failed = client.fine_tuning.jobs.retrieve(job.id)
    assert (failed.status, failed.error.code) == ("failed", "invalid_training_file")
    assert "no usable conversation" in failed.error.message
    assert failed.error.message.startswith(failed.training_file) and str(live.jobs.root) not in failed.error.message
    # NaN loss
    job = _create_job(live)
    _service(live, base=str(_poisoned_base(live.base_dir, tmp_path / "nan-base"))).run_one()
    failed = client.fine_tuning.jobs.retrieve(job.id)
    assert (failed.status, failed.error.code) == ("failed", "nan_loss")
    assert "step 1" in failed.error.message
    # OOM during a step (what torch raises when the device runs out)
    from trainer.job_recipe import JobRecipe

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(JobRecipe, "global_step", out_of_memory)  # every optimizer step goes through it
    job = _create_job(live)
    _service(live).run_one()
    failed = client.fine_tuning.jobs.retrieve(job.id)
    assert (failed.status, failed.error.code, failed.fine_tuned_model) == ("failed", "out_of_memory", None)
    for job_id in [j.id for j in client.fine_tuning.jobs.list() if j.status == "failed"]:
        assert len(_terminal(_events(live, job_id))) == 1
    # the server still serves
    chat = client.chat.completions.create(model=live.state.base_id, messages=QUESTION, max_tokens=4)
    assert chat.choices[0].finish_reason in ("stop", "length")


def _sidecar_process(live, *extra: str) -> subprocess.Popen:
    argv = [
        sys.executable,
        "-m",
        "loraswap.cli",
        "trainer-service",
        "--jobs-dir",
        str(live.jobs.root),
        "--server-url",
        live.url,
        "--base",
        str(live.base_dir),
        "--device",
        "cpu",
        "--lease-s",
        "2",
        "--poll-s",
        "0.2",
        *extra,
    ]
    env = dict(os.environ, LORASWAP_SERVICE_KEY=SERVICE_KEY)
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_sidecar_killed_mid_job_is_resumed_by_another_and_the_job_ends_once(live):
    from jobs.db import Database
    from jobs.queue import JobQueue

    queue = JobQueue(Database(live.jobs.database))
    job = _create_job(live, n_epochs=6, batch_size=1)  # 8 steps per epoch, 48 in all
    first = _sidecar_process(live)
    try:
        assert wait_until(lambda: queue.latest_checkpoint(job.id) is not None, timeout=300, interval=0.02)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    killed = queue.get_any(job.id)
    assert killed.status == "running", "the job finished before the kill; the test proves nothing"
    checkpoint = queue.latest_checkpoint(job.id)
    assert wait_until(lambda: time.time() > killed.lease_expires + 0.2, timeout=30)  # the lease runs out

    second = _sidecar_process(live, "--once")
    try:
        assert second.wait(timeout=600) == 0
    finally:
        if second.poll() is None:
            second.kill()
    done = _client(live).fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    events = _events(live, job.id)
    assert len(_terminal(events)) == 1
    messages = [e.message for e in events]
    resumed = messages.index(f"Resumed from the checkpoint after epoch {checkpoint.epoch}")
    assert any("queued again" in m for m in messages[:resumed])
    after = [e.data["step"] for e in events[resumed:] if e.type == "metrics" and not e.message.startswith("Check")]
    assert after == list(range(checkpoint.step_number + 1, 49))  # continued, not restarted
    assert len(live.state.store.versions("alice", done.fine_tuned_model)) == 1  # published once
    assert not (live.jobs.work / job.id).exists()  # the dead sidecar's folder too
