"""Batched token delivery (server/engine/delivery.py): order, one hop per flush, closed loops, detokenizer.

The engine thread is simulated by a plain thread that calls the sinks and `flush` the way
`EngineCore.run_until` does; the reader side is the `EventStream` the server iterates.
"""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
from transformers import AutoTokenizer

from server.engine.delivery import EventStream, Outbox
from server.engine.detokenizer import IncrementalText, fast_decode
from server.engine.types import TokenEvent


def _event(rid: str, i: int, last: bool = False) -> TokenEvent:
    return TokenEvent(rid, i, f"t{i}", "length" if last else None)


def test_events_arrive_in_order_with_one_hop_per_flush_for_all_streams():
    async def main():
        loop = asyncio.get_running_loop()
        hops = []
        real = loop.call_soon_threadsafe

        def counting(callback, *args):
            hops.append(len(args[0]) if args else 0)
            return real(callback, *args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        outbox = Outbox()
        streams = {rid: EventStream(loop) for rid in ("a", "b", "c")}
        sinks = {rid: outbox.sink(stream) for rid, stream in streams.items()}

        def engine_thread():
            for step in range(5):  # one "step": every stream gets one token, then one flush
                for rid, sink in sinks.items():
                    sink(_event(rid, step, last=step == 4))
                outbox.flush()
            outbox.flush()  # nothing pending: no hop

        async def read(stream):
            return [(ev.token_id, ev.text) async for ev in stream]

        readers = [asyncio.ensure_future(read(s)) for s in streams.values()]
        thread = threading.Thread(target=engine_thread)
        thread.start()
        got = await asyncio.gather(*readers)
        thread.join()
        assert got == [[(i, f"t{i}") for i in range(5)]] * 3
        assert hops == [3] * 5  # one call_soon_threadsafe per step carrying all three streams' events

    asyncio.run(main())


def test_a_stream_ends_at_its_finishing_event_and_keeps_nothing_after():
    async def main():
        stream = EventStream(asyncio.get_running_loop())
        for event in (_event("a", 0), _event("a", 1, last=True), _event("a", 2)):
            stream.push(event)
        assert [ev.token_id async for ev in stream] == [0, 1]

    asyncio.run(main())


def test_flush_to_a_closed_loop_drops_the_events_without_raising():
    loop = asyncio.new_event_loop()
    outbox = Outbox()
    sink = outbox.sink(EventStream(loop))
    loop.close()
    sink(_event("a", 0))
    outbox.flush()  # the engine thread must survive a reader whose loop is gone
    outbox.flush()


@pytest.fixture(scope="module")
def tokenizers(tiny_base_dir, default_base_dir):
    return [AutoTokenizer.from_pretrained(str(tiny_base_dir)), AutoTokenizer.from_pretrained(str(default_base_dir))]


def test_fast_decode_equals_the_tokenizers_decode(tokenizers):
    rng = random.Random(0)
    for tok in tokenizers:
        decode = fast_decode(tok)
        special = list(tok.all_special_ids)
        for _ in range(200):
            ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 8))] + rng.sample(special, 1)
            rng.shuffle(ids)
            assert decode(ids) == tok.decode(ids, skip_special_tokens=True), ids


def test_incremental_text_equals_one_decode_of_the_whole_completion(tokenizers):
    text = "Héllo wörld ✓ — “quotes”, tabs\tand 日本語 😀 done."
    for tok in tokenizers:
        ids = tok.encode(text, add_special_tokens=False)
        inc = IncrementalText(tok, tok.encode("Say:", add_special_tokens=False))
        pieces = [inc.append(i)[0] for i in ids]
        assert "".join(pieces) + inc.flush() == tok.decode(ids, skip_special_tokens=True)
        assert all("\ufffd" not in p for p in pieces)
