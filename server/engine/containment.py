"""Fault containment for a step: when running a batch raises, find the sequences that cause it.

The sampler already keeps each row's trouble in its row (non-finite logits, a failed draw). If a
run still raises — a bug, or an input nobody foresaw — `run_isolated` retries the batch split in
halves until the failing entries stand alone; those get a failed `SampledToken` (`engine_error`,
500) and every other entry gets exactly the token its sub-batch produced. Re-running is safe:
a run writes K/V only at its own sequences' new positions, and a retry writes the same values
again. A batch with one failing sequence costs about 2·log2(batch) extra runs, only when it fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from server.engine.sampler import ENGINE_ERROR, SampledToken
from server.engine.scheduler import Batch

logger = logging.getLogger(__name__)

Run = Callable[[Batch, int | None], list]


def run_isolated(run: Run, batch: Batch, fold_slot: int | None) -> list:
    """`run(batch, fold_slot)` with failures confined to the entries that cause them.

    Returns one item per entry, as `run` does; a failing entry's item is
    `SampledToken.failed(ENGINE_ERROR)` (also for a prefill chunk that would not sample).
    """
    try:
        return run(batch, fold_slot)
    except Exception:  # noqa: BLE001 - contained below, logged with the request ids
        ids = [e.seq.request_id for e in batch.entries]
        if len(ids) == 1:
            logger.exception("engine step failed for request %s; ending it alone", ids[0])
            return [SampledToken.failed(ENGINE_ERROR)]
        logger.warning("engine step failed for a batch of %d; retrying it split", len(ids), exc_info=True)
    mid = len(batch.entries) // 2
    halves = (Batch(batch.entries[:mid]), Batch(batch.entries[mid:]))
    return [item for half in halves for item in run_isolated(run, half, fold_slot)]
