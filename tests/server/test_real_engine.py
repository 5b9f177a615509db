"""The API over the real engine on the tiny base: what the model says must match the references.

- An adapter written by PEFT, uploaded over the API, answers a greedy chat exactly as PEFT's own
  model with that adapter does (and differently from the base, so the test proves something).
- The base's greedy chat equals Hugging Face `generate`; streaming gives the same text.
- A client that disconnects mid-stream has its request aborted and its KV blocks and slot pins
  freed (engine stats back to zero).
"""

from __future__ import annotations

import torch

from tests.server.conftest import upload, write_peft_adapter
from tests.server.live import wait_until
from tests.server.real import openai_client

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 12


def _client(server):
    return openai_client(server, timeout=60)


def _reference_reply(model, tokenizer, prompt_ids: list[int]) -> tuple[list[int], str, str]:
    """Greedy (token ids, text, finish_reason) from a Hugging Face / PEFT model."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
    new = out[0, len(prompt_ids) :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id) + 1]
        return new, tokenizer.decode(new[:-1]), "stop"
    return new, tokenizer.decode(new), "length"


def _prompt_ids(server, http_model: str) -> list[int]:
    import httpx

    response = httpx.post(f"{server.url}/tokenize", json={"model": http_model, "messages": QUESTION})
    return response.json()["tokens"]


def _chat(server, model: str) -> tuple[list[int], str, str]:
    response = _client(server).chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=True,
        extra_body={"return_tokens_as_token_ids": True},
    )
    choice = response.choices[0]
    ids = [int(entry.token.removeprefix("token_id:")) for entry in choice.logprobs.content]
    assert response.usage.completion_tokens == len(ids)
    return ids, choice.message.content, choice.finish_reason


def test_base_greedy_chat_equals_hf_generate(real_server, tiny_base_dir):
    from transformers import AutoModelForCausalLM

    base = real_server.state.base_id
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval()
    expected = _reference_reply(model, real_server.engine.tokenizer, _prompt_ids(real_server, base))
    assert _chat(real_server, base) == expected


def test_uploaded_peft_adapter_greedy_chat_equals_peft(real_server, tiny_base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = write_peft_adapter(
        tiny_base_dir,
        tmp_path / "peft",
        seed=11,
        rank=8,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"),
        scale=3.0,
    )
    created = upload(__import__("httpx").Client(base_url=real_server.url), "france", adapter_dir)
    assert created.status_code == 201, created.text

    tokenizer = real_server.engine.tokenizer
    prompt = _prompt_ids(real_server, "france")
    base_model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval()
    base_reply = _reference_reply(base_model, tokenizer, prompt)
    peft_model = PeftModel.from_pretrained(base_model, str(adapter_dir)).eval()
    expected = _reference_reply(peft_model, tokenizer, prompt)
    assert expected != base_reply, "the adapter does not change the answer; the test would prove nothing"

    assert _chat(real_server, "france") == expected
    streamed = list(
        _client(real_server).chat.completions.create(
            model="france",
            messages=QUESTION,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    finish = [c.choices[0].finish_reason for c in streamed if c.choices and c.choices[0].finish_reason]
    assert (streamed[-1].usage.completion_tokens, text, finish[-1]) == (len(expected[0]), *expected[1:])
    models = {m.id: m.model_dump() for m in _client(real_server).models.list().data}
    assert models["france"]["residency"] in ("device", "host")  # it was loaded to serve the chat


def test_disconnect_mid_stream_aborts_and_frees_blocks_and_pins(real_server, tiny_base_dir, tmp_path):
    import httpx

    adapter_dir = write_peft_adapter(tiny_base_dir, tmp_path / "long", seed=12)
    assert upload(httpx.Client(base_url=real_server.url), "long", adapter_dir).status_code == 201
    engine = real_server.engine
    aborted_before = _aborted_count(real_server)
    body = {
        "model": "long",
        "messages": QUESTION,
        "max_tokens": 450,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    with httpx.Client(base_url=real_server.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk
            assert wait_until(lambda: engine.stats().running == 1)
    # the connection is closed: the request must be aborted, not run to max_tokens
    assert wait_until(lambda: _aborted_count(real_server) == aborted_before + 1)
    assert wait_until(lambda: engine.stats().running == 0 and engine.stats().waiting == 0)
    stats = engine.stats()
    assert stats.kv_blocks_used == 0
    assert all(pins == 0 for pins in engine.slots.pins)
    assert real_server.state.admission.total == 0 and not real_server.state.inflight.counts


def _aborted_count(server) -> float:
    value = 0.0
    for metric in server.state.metrics.requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("status") == "aborted":
                value += sample.value
    return value
