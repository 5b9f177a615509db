"""Sampling, stops, logprobs, incremental text and the async API, on the tiny base."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.engine.detokenizer import IncrementalText
from server.engine.errors import DuplicateRequest, EngineStopped, PromptTooLong
from server.engine.types import SamplingParams
from tests.engine.helpers import hf_greedy, hf_model
from tests.engine.test_engine_parity import GREEDY, PROMPTS, tiny_engine


@pytest.fixture(scope="module")
def engine(tiny_base_dir):
    return tiny_engine(tiny_base_dir)


def events_of(engine, prompt, sampling, adapter=None):
    events = []
    engine._submit(f"ev-{id(events)}", prompt, adapter, sampling, events.append)
    while not events or events[-1].finish_reason is None:
        engine._drain_inbox()
        engine.step()
    return events


def test_seeded_sampling_reproduces_whatever_shares_the_batch(engine):
    sp = SamplingParams(max_tokens=16, temperature=1.3, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = engine.generate([PROMPTS[0]], sampling=sp)[0]
    crowded = engine.generate(
        [PROMPTS[1], PROMPTS[0], PROMPTS[2]],
        sampling=[
            SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True),
            sp,
            SamplingParams(max_tokens=5, temperature=0.7, seed=9, ignore_eos=True),
        ],
    )
    assert crowded[1] == alone
    other_seed = engine.generate(
        [PROMPTS[0]],
        sampling=SamplingParams(max_tokens=16, temperature=1.3, top_p=0.9, top_k=50, seed=99, ignore_eos=True),
    )[0]
    assert other_seed != alone


def test_top_k_one_and_tiny_top_p_are_greedy(engine):
    greedy = engine.generate(PROMPTS, sampling=GREEDY)
    k1 = SamplingParams(max_tokens=GREEDY.max_tokens, temperature=1.0, top_k=1, ignore_eos=True)
    p0 = SamplingParams(max_tokens=GREEDY.max_tokens, temperature=1.0, top_p=1e-6, ignore_eos=True)
    assert engine.generate(PROMPTS, sampling=k1) == greedy
    assert engine.generate(PROMPTS, sampling=p0) == greedy
    # A subnormal top_p is 0 in float32: the top token still stays (the fuzz found a 500 here).
    subnormal = SamplingParams(max_tokens=GREEDY.max_tokens, temperature=1.0, top_p=5e-324, ignore_eos=True)
    assert engine.generate(PROMPTS, sampling=subnormal) == greedy


def test_sampling_follows_the_distribution(engine):
    """Token frequencies of temperature-1 sampling approach the model's softmax."""
    sp = [SamplingParams(max_tokens=1, temperature=1.0, seed=s) for s in range(300)]
    first = engine.generate([PROMPTS[1]] * 300, sampling=sp)
    lp = events_of(engine, PROMPTS[1], SamplingParams(max_tokens=1, temperature=0, logprobs=3))[0].top_logprobs
    top_id, top_lp = lp[0]
    freq = sum(1 for t in first if t[0] == top_id) / 300
    assert abs(freq - float(torch.tensor(top_lp).exp())) < 0.1


def test_logprobs_match_hf(tiny_base_dir, engine):
    model = hf_model(tiny_base_dir)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([PROMPTS[2]])).logits[0, -1].float(), -1)
    ev = events_of(engine, PROMPTS[2], SamplingParams(max_tokens=1, temperature=0, logprobs=3))[0]
    values, ids = ref.topk(3)
    assert ev.token_id == int(ids[0])
    assert ev.logprob == pytest.approx(float(values[0]), abs=1e-4)
    assert [i for i, _ in ev.top_logprobs] == ids.tolist()
    assert [v for _, v in ev.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)


def test_stop_tokens_min_tokens_and_max_tokens(engine):
    greedy = engine.generate([PROMPTS[0]], sampling=GREEDY)[0]
    stop_at = greedy[3]
    got = engine.generate(
        [PROMPTS[0]], sampling=SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop_at,), ignore_eos=True)
    )[0]
    assert got == greedy[: greedy.index(stop_at) + 1]
    held = events_of(
        engine, PROMPTS[0], SamplingParams(max_tokens=12, min_tokens=12, temperature=0, stop_token_ids=(stop_at,))
    )
    assert len(held) == 12 and held[-1].finish_reason == "length"
    assert stop_at not in [e.token_id for e in held]  # masked while below min_tokens


def test_stop_string_cuts_text_and_text_matches_decode(engine):
    tok = engine.tokenizer
    events = events_of(engine, PROMPTS[3], GREEDY)
    ids = [e.token_id for e in events]
    full = tok.decode(ids, skip_special_tokens=True)
    assert "".join(e.text for e in events) == full
    assert events[-1].completion_tokens == len(ids) and events[-1].prompt_tokens == len(PROMPTS[3])
    streamed = "".join(e.text for e in events[:-1]).replace("\ufffd", "")
    assert len(streamed) >= 3, "need decodable text to pick a stop string from"
    stop = streamed[1:3]
    cut = events_of(engine, PROMPTS[3], SamplingParams(max_tokens=12, temperature=0, stop=(stop,), ignore_eos=True))
    assert cut[-1].finish_reason == "stop"
    assert "".join(e.text for e in cut) == full[: full.index(stop)]


def test_incremental_text_handles_multibyte(engine):
    tok = engine.tokenizer
    ids = tok.encode("héllo wörld ✓ done", add_special_tokens=False)
    text = IncrementalText(tok, [1])
    pieces = [text.append(i)[0] for i in ids]
    assert "".join(pieces) + text.flush() == "héllo wörld ✓ done"
    assert all("\ufffd" not in p for p in pieces)


def test_async_stream_abort_on_close_and_errors(tiny_base_dir, engine):
    model = hf_model(tiny_base_dir)
    ref = hf_greedy(model, PROMPTS[1], GREEDY.max_tokens)

    async def main():
        with pytest.raises(EngineStopped):
            engine.add_request("early", PROMPTS[1], None, GREEDY)
        await engine.start()
        try:
            with pytest.raises(PromptTooLong):
                engine.add_request("long", [1] * 300, None, GREEDY)
            stream = engine.add_request("a", PROMPTS[1], None, GREEDY)
            with pytest.raises(DuplicateRequest):
                engine.add_request("a", PROMPTS[1], None, GREEDY)
            endless = engine.add_request("b", PROMPTS[0], None, SamplingParams(max_tokens=200, ignore_eos=True))
            got = [ev async for ev in stream]
            first = await endless.__anext__()
            await endless.aclose()  # a client disconnect
            for _ in range(200):
                if not engine.scheduler.has_work():
                    break
                await asyncio.sleep(0.01)
            return got, first
        finally:
            await engine.stop()

    got, first = asyncio.run(main())
    assert [e.token_id for e in got] == ref and got[-1].finish_reason == "length"
    assert first.token_id is not None
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert not engine.scheduler.has_work()


def test_generate_while_the_loop_runs(engine):
    want = engine.generate(PROMPTS[:2], sampling=GREEDY)

    async def main():
        await engine.start()
        try:
            return await asyncio.to_thread(engine.generate, PROMPTS[:2], None, GREEDY)
        finally:
            await engine.stop()

    assert asyncio.run(main()) == want


def test_a_failing_step_fails_its_requests_and_the_loop_survives(engine, monkeypatch):
    real_run = engine.runner.run
    calls = []

    def broken_once(batch, fold_slot=None):
        if not calls:
            calls.append(1)
            raise RuntimeError("boom")
        return real_run(batch, fold_slot)

    monkeypatch.setattr(engine.runner, "run", broken_once)

    async def main():
        await engine.start()
        try:
            failed = [ev async for ev in engine.add_request("x", PROMPTS[1], None, GREEDY)]
            ok = [ev async for ev in engine.add_request("y", PROMPTS[1], None, GREEDY)]
            return failed, ok
        finally:
            await engine.stop()

    failed, ok = asyncio.run(main())
    assert failed[-1].finish_reason == "abort" and failed[-1].error_code == "engine_error"
    assert failed[-1].error_status == 500 and "boom" not in failed[-1].error  # the detail goes to the log
    assert len(ok) == GREEDY.max_tokens and ok[-1].finish_reason == "length"
    assert engine.blocks.num_free == engine.blocks.num_blocks
