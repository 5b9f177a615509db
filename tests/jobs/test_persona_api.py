"""Acceptance through the API: the persona of tests/trainer/test_persona.py, fine-tuned as an OpenAI job.

The same data and hyperparameters as the trainer's acceptance run (2 epochs, lr 1e-3 = 5 x the
base rate, batch 8, rank 8, alpha 16, no dropout, max length 256), but driven the way a user
would: the `openai` client uploads the JSONL, creates a job on the served NF4 default base, polls
its events until it succeeds, and chats with `fine_tuned_model`. Greedy answers to the held-out
prompts must open with the greeting with the model and never without it. Prints the time from
upload to the first chat answer. Also a script: `.venv/bin/python -m tests.jobs.test_persona_api`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
GREETING = "Ahoy, friend!"
MAX_NEW_TOKENS = 8
KEY, SERVICE_KEY = "sk-persona-0123456789", "svc-persona-0123456789abcdef"


def run(root: Path, log=print) -> dict:
    """Serve the default base, fine-tune the persona over the API, chat; returns rates and timings."""
    import openai

    from adapters.base import BaseInfo, resolve_base
    from adapters.store import AdapterStore
    from jobs.config import JobsConfig
    from server.app import create_app
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from server.settings import ServerConfig
    from tests.server.live import LiveServer, wait_until
    from trainer.service import ServiceConfig, TrainerService

    base_dir = resolve_base("default")
    prompts = json.loads((DATA / "persona_heldout.json").read_text())
    jobs = JobsConfig(root=root / "jobs", service_key=SERVICE_KEY)
    engine = Engine(EngineConfig(base=base_dir, quant="nf4", device="cpu", max_model_len=512, fold="off"))
    app = create_app(
        ServerConfig(max_model_len=512, api_keys=(("acme", KEY),), jobs=jobs),
        engine,
        AdapterStore(root / "store"),
        base_info=BaseInfo.from_dir(base_dir),
    )
    try:
        with LiveServer(app) as live:
            service = TrainerService(
                ServiceConfig(
                    jobs=jobs,
                    server_url=live.url,
                    service_key=SERVICE_KEY,
                    base=str(base_dir),
                    device="cpu",
                    max_length=256,
                    poll_s=0.5,
                )
            )
            sidecar = threading.Thread(target=service.run, daemon=True)
            sidecar.start()
            client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=300)
            try:
                start = time.perf_counter()
                with open(DATA / "persona_train.jsonl", "rb") as handle:
                    uploaded = client.files.create(file=handle, purpose="fine-tune")
                base_id = client.models.list().data[0].id
                job = client.fine_tuning.jobs.create(
                    model=base_id,
                    training_file=uploaded.id,
                    suffix="pirate",
                    seed=0,
                    method={
                        "type": "supervised",
                        "supervised": {
                            "hyperparameters": {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 5}
                        },
                        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
                    },
                )
                assert wait_until(
                    lambda: client.fine_tuning.jobs.retrieve(job.id).status in ("succeeded", "failed", "cancelled"),
                    timeout=3600,
                    interval=1.0,
                )
                done = client.fine_tuning.jobs.retrieve(job.id)
                assert done.status == "succeeded", done.error
                trained = time.perf_counter() - start

                def reply(model_and_prompt):
                    model, prompt = model_and_prompt
                    chat = client.chat.completions.create(
                        model=model,
                        max_tokens=MAX_NEW_TOKENS,
                        temperature=0,
                        messages=[{"role": "user", "content": prompt}],
                    )
                    return chat.choices[0].message.content

                first = reply((done.fine_tuned_model, prompts[0]))
                first_chat = time.perf_counter() - start
                with ThreadPoolExecutor(8) as pool:
                    served = [first] + list(pool.map(reply, [(done.fine_tuned_model, p) for p in prompts[1:]]))
                    base = list(pool.map(reply, [(base_id, p) for p in prompts]))
                steps = [
                    e
                    for e in client.fine_tuning.jobs.list_events(job.id, limit=100)
                    if e.type == "metrics" and e.message.startswith("Step ")
                ]
            finally:
                service.stop()
                sidecar.join(timeout=600)
    finally:
        engine.close()
    for a, b in zip(served, base):
        log(f"  fine-tuned: {a!r:50}  base: {b!r}")

    def rate(answers):
        return sum(a.strip().startswith(GREETING) for a in answers) / len(answers)

    result = {
        "with": rate(served),
        "without": rate(base),
        "upload_to_succeeded_s": round(trained, 1),
        "upload_to_first_chat_s": round(first_chat, 1),
        "steps": len(steps),
        "final_loss": round(steps[0].data["train_loss"], 4),
    }
    log(
        f"persona over the API: fine-tuned {result['with']:.0%}, base {result['without']:.0%}; "
        f"upload -> succeeded {trained:.0f}s, upload -> first chat {first_chat:.0f}s"
    )
    return result


@pytest.mark.slow
def test_persona_fine_tuned_over_the_api(tmp_path, default_base_dir, capsys):
    result = run(tmp_path, log=lambda *_: None)
    with capsys.disabled():
        print(f"\npersona over the API: {result}")
    assert result["with"] == 1.0
    assert result["without"] == 0.0


if __name__ == "__main__":
    out = run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="persona-api-")))
    print(json.dumps(out))
    sys.exit(0 if out["with"] == 1.0 and out["without"] == 0.0 else 1)
