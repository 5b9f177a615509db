"""What the ingress answers when the replica side fails: typed, retryable, in the OpenAI envelope.

A replica lost while serving a request is the cluster's version of "the engine is not running":
a 503 with `Retry-After`, code `replica_lost` (`ReplicaEngineClient._failed`), never a 500 (a 500
means a bug). Errors a replica raised on purpose (a deleted adapter's 404, a prompt too long)
travel back through Ray wrapped in `RayTaskError`; `unwrap` gives the original back so the ingress
answers as the single-process server would.
"""

from __future__ import annotations

from adapters.errors import LoraswapError

LOST = "the engine replica serving this request was lost; retry the request"


def replica_lost(exc: BaseException) -> bool:
    """Whether `exc` (as Serve raises it through a handle) means the replica went away."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    lost = (RayActorError, ActorDiedError, ActorUnavailableError)
    return isinstance(exc, lost) or isinstance(getattr(exc, "cause", None), lost)


def unwrap(exc: BaseException) -> BaseException:
    """The `LoraswapError` a replica raised, if `exc` carries one; else `exc` itself."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, LoraswapError) else exc
