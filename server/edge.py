"""`Edge`: the pure ASGI middleware every HTTP request passes before the app reads its body.

In order, with nothing read from the socket but the headers:
1. a request id (`X-Request-Id` on every response; logs carry it next to the detail a client
   never sees);
2. authentication: a tenant key for the API (401), the admin key for `/metrics` (401); `/health`,
   `/ready` and the OpenAPI schema are public;
3. the size cap: a declared `Content-Length` over the cap is refused at once (413); a streamed
   (chunked) body is counted while it arrives and refused as soon as it passes the cap;
4. the read deadline: the whole body must arrive within its timeout (408), so a slow client
   cannot hold a connection and a worker open forever.
Uploads (`POST /v1/adapters`, and the trainer sidecar's `/internal/` publish route, which takes
the service key instead of a tenant key) get their own, larger cap and deadline; training files
(`POST /v1/files`) get the jobs' file cap. A refused body is never
parsed: the app's own answer (if it started one) is dropped and replaced by ours.

After a refusal the answer is sent at once, then whatever the client is still sending is
discarded for a moment (at most `LINGER_BYTES`, `LINGER_S` in all and `LINGER_IDLE_S` without
data; never buffered or parsed) before the
connection closes: closing a socket with unread data makes the kernel send a reset, which would
destroy the answer before a client that is still writing its body could read it ("lingering
close", as nginx does).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import uuid

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from adapters.errors import LoraswapError
from server.errors import BadRequest, RequestTimeout, RequestTooLarge, Unauthorized
from server.settings import DEFAULT_TENANT, ServerConfig

log = logging.getLogger("loraswap.server")

PUBLIC_PATHS = frozenset({"/health", "/ready", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
ADMIN_PATHS = frozenset({"/metrics"})
UPLOAD_PATH = "/v1/adapters"
FILES_PATH = "/v1/files"  # training files (fine-tuning jobs): their own cap, the upload deadline
SERVICE_PREFIX = "/internal/"  # the trainer sidecar's routes (it publishes adapters): the service key
MULTIPART_SLACK = 64 * 1024  # form boundaries and headers around a training file
LINGER_BYTES = 32 * 1024 * 1024
LINGER_IDLE_S = 2.0  # stop when the client pauses this long...
LINGER_S = 10.0  # ...or after this long in all, however it trickles


class BodyRejected(HTTPException):
    """Raised from `receive` when a body passes its cap or deadline; carries the error to answer.

    An `HTTPException` so that FastAPI's body parsing re-raises it instead of turning it into a
    generic 400; the middleware answers with `error`'s envelope either way.
    """

    def __init__(self, error: LoraswapError):
        super().__init__(status_code=error.status, detail=error.message)
        self.error = error


def tenant_for_key(api_keys: tuple[tuple[str, str], ...], presented: str) -> str | None:
    """The tenant whose key equals `presented`, checking every key in constant time (no early exit)."""
    found = None
    candidate = presented.encode("utf-8")
    for tenant, key in api_keys:
        if hmac.compare_digest(candidate, key.encode("utf-8")):
            found = tenant
    return found


def bearer(headers: Headers) -> str | None:
    scheme, _, key = headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


class _BodyGuard:
    """Wraps `receive`: counts body bytes against `limit` and enforces one deadline for the body."""

    def __init__(self, receive, limit: int, timeout_s: float, upload: bool):
        self._receive = receive
        self.limit, self.timeout_s, self.upload = limit, timeout_s, upload
        self.deadline = asyncio.get_running_loop().time() + timeout_s
        self.received = 0
        self.done = False  # the body is complete: later receives wait for a disconnect, no deadline
        self.failure: BodyRejected | None = None

    async def receive(self):
        if self.done or self.failure is not None:
            return await self._receive()
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:
            message = await asyncio.wait_for(self._receive(), timeout=max(remaining, 0.0))
        except asyncio.TimeoutError:
            self.failure = BodyRejected(
                RequestTimeout(f"the request body did not arrive within {self.timeout_s:g} seconds")
            )
            raise self.failure from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                self.failure = BodyRejected(too_large(self.limit, self.upload))
                raise self.failure
            self.done = not message.get("more_body", False)
        else:
            self.done = True
        return message


def too_large(limit: int, upload: bool) -> RequestTooLarge:
    what = "an adapter upload" if upload else "a request body"
    return RequestTooLarge(f"{what} may be at most {limit} bytes")


class Edge:
    """The ASGI middleware; `app.add_middleware(Edge, config=config)`."""

    def __init__(self, app, config: ServerConfig):
        self.app = app
        self.config = config
        self.max_file_bytes = config.jobs.max_file_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = f"req-{uuid.uuid4().hex[:24]}"
        scope.setdefault("state", {})["request_id"] = request_id
        send = _with_header(send, b"x-request-id", request_id.encode())
        headers = Headers(scope=scope)
        path = scope["path"]
        post = scope["method"] == "POST"
        # An adapter upload, from a tenant or from the sidecar publishing a job's adapter.
        upload = post and (path == UPLOAD_PATH or path.startswith(SERVICE_PREFIX))
        limits = self.config.limits
        limit = self.config.max_upload_bytes if upload else limits.max_request_bytes
        if post and path == FILES_PATH:
            upload, limit = True, self.max_file_bytes + MULTIPART_SLACK
        try:
            scope["state"]["tenant"] = self._authenticate(scope["path"], headers)
            declared = headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                if not declared.isdigit():
                    raise BadRequest("Content-Length must be a non-negative integer")
                raise too_large(limit, upload)
        except LoraswapError as rejection:
            log.info(
                "%s %s %s refused before the body: %d %s",
                request_id,
                scope["method"],
                scope["path"],
                rejection.status,
                rejection.code,
            )
            return await _answer(send, receive, rejection)
        guard = _BodyGuard(
            receive, limit, limits.upload_read_timeout_s if upload else limits.body_read_timeout_s, upload
        )
        started = False

        async def guarded_send(message):
            nonlocal started
            if guard.failure is not None:
                return  # the app's answer to a refused body is replaced by ours
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, guard.receive, guarded_send)
        except Exception:
            if guard.failure is None or started:
                raise
        if guard.failure is not None and not started:
            failure = guard.failure.error
            log.info(
                "%s %s %s body refused: %d %s", request_id, scope["method"], scope["path"], failure.status, failure.code
            )
            await _answer(send, receive, failure)

    def _authenticate(self, path: str, headers: Headers) -> str | None:
        """The caller's tenant (None on public and admin paths); raises Unauthorized (401)."""
        config = self.config
        if path in PUBLIC_PATHS:
            return None
        presented = bearer(headers)
        if path.startswith(SERVICE_PREFIX):
            key = self.config.service_key
            if key is None or presented is None or not hmac.compare_digest(presented.encode(), key.encode()):
                raise Unauthorized("this endpoint needs the service key")
            return None  # the route reads the job owner's tenant from its own header
        if path in ADMIN_PATHS:
            if config.admin_key is None:
                if config.auth_enabled:
                    raise Unauthorized("this endpoint needs the admin key; start the server with --admin-key")
                return None  # a single-user server with no keys at all: open, like everything else
            if presented is None or not hmac.compare_digest(presented.encode(), config.admin_key.encode()):
                raise Unauthorized("this endpoint needs the admin key")
            return None
        if not config.auth_enabled:
            return DEFAULT_TENANT
        if presented is None:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        tenant = tenant_for_key(config.api_keys, presented)
        if tenant is None:
            raise Unauthorized("incorrect API key provided")
        return tenant


def _with_header(send, name: bytes, value: bytes):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = dict(message)
            message["headers"] = [*message.get("headers", []), (name, value)]
        await send(message)

    return wrapped


async def _answer(send, receive, error: LoraswapError) -> None:
    """Send `error`'s envelope now, discard what the client still sends, then close."""
    body = json.dumps(error.envelope()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    headers += [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": True})  # on the wire now
    await _linger(receive)
    await send({"type": "http.response.body", "body": b""})


async def _linger(receive) -> None:
    """Discard the rest of a refused body, bounded in bytes and time (see the module docstring)."""
    loop = asyncio.get_running_loop()
    deadline, discarded = loop.time() + LINGER_S, 0
    while discarded <= LINGER_BYTES:
        try:
            remaining = min(deadline - loop.time(), LINGER_IDLE_S)
            message = await asyncio.wait_for(receive(), timeout=max(remaining, 0.0))
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        discarded += len(message.get("body", b""))
