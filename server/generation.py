"""`Generation`: one admitted request's run through the engine, and the one owner of its lifetime.

From construction it holds the admission ticket and the adapter's in-flight count. `start()`
submits the engine request (so the engine's refusals are still plain HTTP errors; a refused start
releases everything before it raises). `events()` relays its token events while recording latency
and token metrics. The request ends when the `with generation:` block that owns it exits: the plain
path wraps its wait in that block, the streaming path wraps the response's whole send in it
(`sse.EventStream`). The exit (`close()`) releases everything exactly once: the ticket, the
in-flight count and, if the engine has not finished the request, an `engine.abort`. It is
synchronous, so it is safe under cancellation (a client disconnect cancels the consuming task).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from server.admission import Ticket
from server.engine.types import SamplingParams, TokenEvent
from server.state import ResolvedModel, ServerState
from server.tenancy import submit


class Generation:
    """A request admitted to the engine: `start()`, then iterate `events()` inside `with generation:`.

    Args:
        state: the app's state (engine, metrics, in-flight counts).
        request_id: unique id, also the engine's request id.
        tenant: the caller (the engine's fair share, in-use accounting, metrics).
        model: the resolved model (adapter or base).
        prompt_ids: the rendered prompt.
        sampling: decoding settings.
        ticket: the admission ticket this request holds until it is closed.
    """

    def __init__(
        self,
        state: ServerState,
        *,
        request_id: str,
        tenant: str,
        model: ResolvedModel,
        prompt_ids: list[int],
        sampling: SamplingParams,
        ticket: Ticket,
    ):
        self.state = state
        self.request_id = request_id
        self.tenant = tenant
        self.model = model
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.ticket = ticket
        self.started = False
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens the engine found in its prefix cache
        self.error: str | None = None  # the engine's reason when it aborted on its own
        self.error_code: str | None = None  # the contract's code for it, e.g. "non_finite_output"
        self.error_status: int | None = None  # the HTTP status the engine says it deserves
        self._closed = False
        self._stream: AsyncIterator[TokenEvent] | None = None
        self._started_at = 0.0
        # Counted from construction (no await since the model was resolved), so a DELETE
        # arriving before the first step still waits for this request.
        for adapter_id, sha256 in model.in_use():  # a mix's adapters each count
            state.inflight.enter(tenant, adapter_id, sha256)

    @property
    def _kind(self) -> str:
        """The metrics label for the model: never an adapter's name (other tenants' secrets)."""
        return "adapter" if self.model.adapter is not None else "base"

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Submit the request to the engine now, so its refusals become HTTP errors before any
        response starts (raises the engine's typed errors, e.g. PromptTooLong, EngineStopped,
        after releasing the ticket and in-flight count)."""
        try:
            self._stream = submit(
                self.state.engine, self.request_id, self.prompt_ids, self.model.adapter, self.sampling, self.tenant
            )
        except BaseException:
            self.close()  # refused: nobody will own a request that never ran
            raise
        self.started = True
        self._started_at = time.perf_counter()
        self.state.metrics.prompt_tokens.labels(self.tenant, self._kind).inc(len(self.prompt_ids))

    async def events(self) -> AsyncIterator[TokenEvent]:
        """The engine's events for this request, up to and including the one with a finish_reason."""
        if self._closed or self._stream is None:
            return
        # The labelled children once per request: a `labels()` lookup per token shows in a profile.
        metrics = self.state.metrics
        first_token = metrics.time_to_first_token.labels(self._kind)
        inter_token = metrics.inter_token_latency.labels(self._kind)
        tokens = metrics.generation_tokens.labels(self.tenant, self._kind)
        last = self._started_at  # TTFT counts from submission; ITL from the previous token
        async for event in self._stream:
            if event.token_id is not None:
                now = time.perf_counter()
                (inter_token if self.completion_tokens else first_token).observe(now - last)
                last = now
                self.completion_tokens += 1
                tokens.inc()
            self.cached_tokens = event.cached_tokens
            if event.finish_reason is not None:
                self.finish_reason = event.finish_reason
                self.error = event.error
                # COMPAT: `error_code` / `error_status` are TokenEvent fields once iso-engine is merged.
                self.error_code = event.error_code
                self.error_status = event.error_status
            yield event
            if event.finish_reason is not None:
                break
        if self.finish_reason is None:
            self.finish_reason = "stop"  # the engine ended the stream without saying why

    def close(self) -> None:
        """Release the ticket and in-flight count; abort the engine request if still running."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.started and self.finish_reason is None:
                self.state.engine.abort(self.request_id)
        finally:
            for adapter_id, _ in self.model.in_use():
                self.state.inflight.leave(self.tenant, adapter_id)
            self.ticket.release()
            status = self.finish_reason or "aborted"
            self.state.metrics.requests.labels(self.tenant, self._kind, status).inc()
