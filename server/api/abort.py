"""Why the engine ended a request the client did not cancel, as the error the API answers
(chat, tool-call streams and legacy completions share it)."""

from __future__ import annotations

import logging
import re

from adapters.errors import LoraswapError
from server.api.errors import BadRequest, EngineFailure, Overloaded
from server.generation import Generation

log = logging.getLogger("loraswap.server")
_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[/\\](?:[\w.-]+[/\\])+[\w.-]*")


def abort_error(generation: Generation) -> LoraswapError:
    """Why the engine ended a request the client did not cancel, with the status the engine chose.

    The engine's `error` names the cause without paths or exception reprs (the contract); its
    `error_status` is 422 for a sequence's own non-finite values, 503 for an adapter that could
    not be loaded in time, 500 only for a bug.
    """
    if generation.error or generation.error_code:
        status = generation.error_status or 500
        log.warning(
            "%s: the engine ended the request: %s (%s, %s)",
            generation.request_id,
            generation.error,
            generation.error_code,
            status,
        )
        # The engine promises messages without paths; a path that slips through still never leaves.
        reason = _PATH.sub("<path>", generation.error or generation.error_code or "")
        message = f"the request could not be served: {reason}"
        if status >= 500 and status != 503:
            return EngineFailure(message, code=generation.error_code or "engine_error", status=status)
        if status == 503:
            return Overloaded(
                message,
                code=generation.error_code or "engine_error",
                headers={"Retry-After": str(generation.state.config.retry_after_s)},
            )
        return BadRequest(message, code=generation.error_code or "invalid_request", status=status)
    return Overloaded("the request was aborted by the server (shutting down)", code="request_aborted")
