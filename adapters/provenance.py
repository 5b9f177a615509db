"""`loraswap.json`: where an adapter came from, written beside its PEFT files.

The trainer and the merge tool write it; validation reads it when present. Typed fields are
checked (hex digests, positive vocabulary size); unknown keys are kept as they are, so newer
writers do not break older readers. This module knows nothing about the store or the base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters.errors import InvalidAdapter
from adapters.format import PROVENANCE_FILE
from adapters.strict_json import loads_strict

MAX_PROVENANCE_BYTES = 1 << 20
_SHA256 = r"^[0-9a-f]{64}$"


class Provenance(BaseModel):
    """The typed view of `loraswap.json`; every field is optional.

    Args:
        base_fingerprint: sha256 of the base's safetensors files (`BaseInfo.fingerprint`).
        chat_template_sha256: sha256 of the chat template the adapter was trained with.
        tokenizer_vocab_size: the tokenizer's vocabulary size at training time.
        training_data_sha256: sha256 of the training data file.
        hyperparameters: rank, alpha, learning rate, epochs, ... as the writer chose.
        metrics: final loss and friends.
        merge: free-form description of a merge (method, inputs, weights) when merged.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    format_version: int = Field(default=1, ge=1)
    base_fingerprint: str | None = Field(default=None, pattern=_SHA256)
    chat_template_sha256: str | None = Field(default=None, pattern=_SHA256)
    tokenizer_vocab_size: int | None = Field(default=None, gt=0)
    training_data_sha256: str | None = Field(default=None, pattern=_SHA256)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    merge: dict[str, Any] | None = None

    def to_json_dict(self) -> dict:
        """The canonical dict written to disk and hashed (None fields dropped)."""
        return self.model_dump(mode="json", exclude_none=True)


def parse_provenance(data: bytes | str) -> Provenance:
    """Parse `loraswap.json` content; InvalidAdapter (400 `invalid_provenance`) when it is not valid."""
    try:
        raw = loads_strict(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidAdapter(f"{PROVENANCE_FILE} is not valid JSON: {exc}", "invalid_provenance") from exc
    if not isinstance(raw, dict):
        raise InvalidAdapter(f"{PROVENANCE_FILE} must hold a JSON object", "invalid_provenance")
    try:
        return Provenance.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise InvalidAdapter(f"{PROVENANCE_FILE}: field '{where}': {first['msg']}", "invalid_provenance") from exc


def read_provenance(directory: Path | str) -> Provenance | None:
    """Read `loraswap.json` from an adapter directory; None when there is none."""
    path = Path(directory) / PROVENANCE_FILE
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_PROVENANCE_BYTES:
        raise InvalidAdapter(f"{PROVENANCE_FILE} is larger than {MAX_PROVENANCE_BYTES} bytes", "file_too_large", 413)
    return parse_provenance(path.read_bytes())


def write_provenance(provenance: Provenance, directory: Path | str) -> Path:
    """Write `loraswap.json` into `directory` (sorted keys, so the bytes are reproducible)."""
    path = Path(directory) / PROVENANCE_FILE
    path.write_text(json.dumps(provenance.to_json_dict(), indent=2, sort_keys=True))
    return path
