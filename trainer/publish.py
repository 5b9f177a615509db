"""Publish a trained adapter to a running loraswap server through its public API.

`POST {url}/v1/adapters` as multipart: field `name`, and the adapter's files under `files`
(adapter_config.json, adapter_model.safetensors, loraswap.json). The server validates the
upload like any other and publishes atomically, so a failure here leaves nothing half
published; this module only reports why, using the server's OpenAI-style error message.
The trainer never imports server code: the HTTP API is the only contract.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import httpx

from adapters.format import CONFIG_FILE, PROVENANCE_FILE, WEIGHTS_FILE

REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)


class PublishError(Exception):
    """The upload did not succeed; the message says why (status and the server's message)."""


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        code = f" ({error['code']})" if error.get("code") else ""
        return f"{error['message']}{code}"
    return str(body)[:500]


def publish(
    adapter_dir: Path | str,
    url: str,
    name: str,
    *,
    api_key: str | None = None,
    timeout: float = 300.0,
    transport: httpx.BaseTransport | None = None,
) -> dict:
    """Upload `adapter_dir` as adapter `name`; returns the server's adapter object.

    Args:
        adapter_dir: a directory written by the trainer (PEFT files + loraswap.json).
        url: the server's base URL, e.g. http://127.0.0.1:8000.
        name: the adapter name in the caller's tenant namespace.
        api_key: bearer key mapping to the tenant (omit when the server runs without auth).
        timeout: seconds for the whole upload (validation happens before the answer).
        transport: an httpx transport (tests pass an in-process ASGI/mock transport).

    Raises PublishError on a missing file, a connection failure or a non-2xx answer.
    """
    adapter_dir = Path(adapter_dir)
    present = [f for f in (CONFIG_FILE, WEIGHTS_FILE, PROVENANCE_FILE) if (adapter_dir / f).is_file()]
    missing = [f for f in REQUIRED_FILES if f not in present]
    if missing:
        raise PublishError(f"{adapter_dir} lacks {', '.join(missing)}")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = url.rstrip("/") + "/v1/adapters"
    with ExitStack() as stack, httpx.Client(timeout=timeout, transport=transport) as client:
        files = [
            ("files", (f, stack.enter_context(open(adapter_dir / f, "rb")), "application/octet-stream"))
            for f in present
        ]
        try:
            response = client.post(endpoint, data={"name": name}, files=files, headers=headers)
        except httpx.HTTPError as exc:
            raise PublishError(f"could not reach {endpoint}: {exc}") from exc
    if response.status_code not in (200, 201):
        raise PublishError(f"{endpoint} answered {response.status_code}: {_error_message(response)}")
    try:
        return response.json()
    except ValueError as exc:
        raise PublishError(f"{endpoint} answered {response.status_code} with a non-JSON body") from exc
