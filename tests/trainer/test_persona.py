"""Acceptance: a persona learned by SFT on the real default base generalises to new question types.

`tests/data/persona_train.jsonl` holds 100 conversations (single- and multi-turn, some with system
prompts, both JSONL shapes) whose every answer opens with "Ahoy, friend!". After a short LoRA run
on the 2-core CPU, greedy answers to held-out prompts of other kinds (`persona_heldout.json`:
creative, advice, yes/no, comparisons, translation, ...) must open with the greeting at least
80 % of the time with the adapter and at most 10 % without. The adapter is loaded from disk by
PEFT, so the check is on the artifact the trainer wrote; then the same adapter is published to a
live server (the NF4 base, as `loraswap serve` runs by default) with the trainer's publisher, and the
persona must hold for chats through the HTTP API too. Also runnable as a script:
`.venv/bin/python -m tests.trainer.test_persona [OUT_DIR]`.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[1] / "data"
GREETING = "Ahoy, friend!"
MAX_NEW_TOKENS = 8


def train_persona(out: Path, log=print):
    from trainer.lora import LoraSpec
    from trainer.sft import TrainConfig, run

    config = TrainConfig(
        data=DATA / "persona_train.jsonl",
        out=out,
        base="default",
        epochs=2,
        lr=1e-3,
        batch_size=8,
        max_length=256,
        seed=0,
        progress=False,
        lora=LoraSpec(rank=8, alpha=16, dropout=0.0),
    )
    return run(config, log=log)


def greedy_answers(model, tokenizer, template, prompts: list[str]) -> list[str]:
    """Left-padded batched greedy generation of each prompt rendered by the served template."""
    rendered = [template.render([{"role": "user", "content": p}]).ids for p in prompts]
    width = max(len(ids) for ids in rendered)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rendered])  # (n, width)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rendered])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=pad,
        )
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def persona_rates(adapter_dir: Path, base_dir: Path, template) -> tuple[float, float, list, list]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompts = json.loads((DATA / "persona_heldout.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with_adapter = greedy_answers(model, template.tokenizer, template, prompts)
    with model.disable_adapter():
        without = greedy_answers(model, template.tokenizer, template, prompts)

    def rate(answers):
        return sum(a.strip().startswith(GREETING) for a in answers) / len(answers)

    return rate(with_adapter), rate(without), with_adapter, without


def check(out: Path, log=print) -> tuple[float, float]:
    recipe, result = train_persona(out, log=log)
    with_rate, without_rate, with_answers, without_answers = persona_rates(result.out, recipe.base_dir, recipe.template)
    for a, b in zip(with_answers, without_answers):
        log(f"  adapter: {a!r:50}  base: {b!r}")
    log(
        f"persona with adapter {with_rate:.0%}, without {without_rate:.0%}; "
        f"train loss {result.epoch_train_losses}, {result.tokens_per_second:.0f} tok/s"
    )
    return with_rate, without_rate


def served_rates(adapter_dir: Path, base_dir: Path, store_dir: Path) -> tuple[float, float]:
    """Publish `adapter_dir` to a live server on the NF4 base; persona rates of greedy API chats."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from adapters.base import BaseInfo
    from adapters.store import AdapterStore
    from server.app import create_app
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from server.settings import ServerConfig
    from tests.server.live import LiveServer
    from trainer.publish import publish

    prompts = json.loads((DATA / "persona_heldout.json").read_text())
    engine = Engine(EngineConfig(base=base_dir, quant="nf4", device="cpu", max_model_len=512, fold="off"))
    app = create_app(
        ServerConfig(max_model_len=512), engine, AdapterStore(store_dir), base_info=BaseInfo.from_dir(base_dir)
    )
    try:
        with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=120) as http:
            card = publish(adapter_dir, live.url, "persona")
            assert card["name"] == "persona" and card["template"] != "unknown"
            base_id = http.get("/v1/models").json()["data"][0]["id"]

            def reply(model_and_prompt):
                model, prompt = model_and_prompt
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": MAX_NEW_TOKENS,
                    "temperature": 0,
                }
                response = http.post("/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]["message"]["content"]

            with ThreadPoolExecutor(8) as pool:  # concurrent requests share the engine's batches
                served = list(pool.map(reply, [("persona", p) for p in prompts]))
                base = list(pool.map(reply, [(base_id, p) for p in prompts]))
    finally:
        engine.close()

    def rate(answers):
        return sum(a.strip().startswith(GREETING) for a in answers) / len(answers)

    return rate(served), rate(base)


@pytest.mark.slow
def test_persona_generalises_to_held_out_prompts(tmp_path, default_base_dir):
    with_rate, without_rate = check(tmp_path / "persona", log=lambda *_: None)
    assert with_rate >= 0.8
    assert without_rate <= 0.1
    served_with, served_without = served_rates(tmp_path / "persona", default_base_dir, tmp_path / "store")
    assert served_with >= 0.8
    assert served_without <= 0.1


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="persona-"))
    w, wo = check(target)
    from adapters.base import resolve_base

    sw, swo = served_rates(target, resolve_base("default"), Path(tempfile.mkdtemp(prefix="persona-store-")))
    print(f"served through the API (NF4 base): persona with adapter {sw:.0%}, base {swo:.0%}")
    sys.exit(0 if w >= 0.8 and wo <= 0.1 and sw >= 0.8 and swo <= 0.1 else 1)
