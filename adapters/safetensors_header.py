"""A strict reader of the safetensors container, run before the bytes reach `safetensors`.

Layout: 8 bytes little-endian header length N, N bytes of JSON (an object mapping tensor names
to `{"dtype", "shape", "data_offsets": [begin, end]}` plus an optional `__metadata__` of
strings), then the data buffer. Offsets are relative to the buffer. We refuse anything the
format does not allow: short files, a header length past the file or past a cap, non-UTF-8 or
non-JSON or duplicate-key headers, unknown dtypes, negative shapes, byte lengths that disagree
with dtype x shape, offsets out of range, overlapping, leaving gaps or trailing bytes. Cheap
structural caps come first: the header's byte length and its tensor count (counted in the raw
bytes, before the JSON is parsed) are bounded by the caller, so a 240,000-entry header costs a
byte scan, not a parse. Every dimension must lie in 1..MAX_DIM and every offset inside the file,
so nothing the parser accepts can overflow a library's int64 arithmetic; `ndim` lets the caller
insist on a rank (an adapter's tensors are matrices). Dtype policy (which dtypes an adapter may
use) is the caller's business.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from adapters.errors import InvalidAdapter
from adapters.strict_json import loads_strict

MAX_HEADER_BYTES = 16 << 20
MAX_TENSORS = 65536
MAX_DIM = (1 << 31) - 1  # no real tensor dimension comes near; keeps every product inside int64
_ENTRY_MARK = b'"data_offsets"'  # one per tensor entry (more only if metadata strings repeat it)
# Every dtype the format defines, with its size in bytes.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry; `begin`/`end` are absolute offsets into the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _malformed(filename: str, problem: str) -> InvalidAdapter:
    return InvalidAdapter(f"{filename} is not a valid safetensors file: {problem}", "malformed_safetensors")


def parse_header(
    data: bytes,
    filename: str = "adapter_model.safetensors",
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_tensors: int = MAX_TENSORS,
    ndim: int | None = None,
) -> list[TensorInfo]:
    """Check the container structure of `data` and return its tensors sorted by offset.

    Args:
        data: the whole file.
        filename: named in error messages.
        max_header_bytes: cap on the JSON header's length.
        max_tensors: cap on the number of tensor entries, checked before the JSON is parsed.
        ndim: when given, every tensor must have exactly this many dimensions.

    Raises:
        InvalidAdapter: code `malformed_safetensors` (400) naming the first problem found, or
            `too_many_tensors` (413) when the header holds more than `max_tensors` entries.
    """
    if len(data) == 0:
        raise _malformed(filename, "the file is empty")
    if len(data) < 8:
        raise _malformed(filename, f"truncated: {len(data)} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > max_header_bytes:
        raise _malformed(filename, f"header length {header_len} overflows the {max_header_bytes}-byte cap")
    if 8 + header_len > len(data):
        raise _malformed(
            filename, f"header length {header_len} overflows the file ({len(data) - 8} bytes after the length)"
        )
    raw = data[8 : 8 + header_len]
    if raw.count(_ENTRY_MARK) > max_tensors:  # a byte scan: refuse before parsing any entry
        raise InvalidAdapter(
            f"{filename}: the header lists more than {max_tensors} tensors, the most this base allows",
            "too_many_tensors",
            413,
        )
    try:
        header = loads_strict(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _malformed(filename, f"the header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _malformed(filename, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _malformed(filename, "__metadata__ must map strings to strings")
    if len(header) > max_tensors:  # the byte scan cannot be fooled into a smaller count, but be sure
        raise InvalidAdapter(f"{filename}: more than {max_tensors} tensors", "too_many_tensors", 413)
    buffer_start = 8 + header_len
    tensors = [_entry(filename, name, entry, buffer_start, len(data), ndim) for name, entry in header.items()]
    tensors.sort(key=lambda t: (t.begin, t.end))
    _check_layout(filename, tensors, buffer_start, len(data))
    return tensors


def _entry(filename: str, name: str, entry, buffer_start: int, size: int, ndim: int | None) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _malformed(filename, f"tensor {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise _malformed(filename, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _malformed(filename, f"tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise _malformed(filename, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if begin > end:
        raise _malformed(filename, f"tensor {name!r} has data_offsets [{begin}, {end}] that run backwards")
    if buffer_start + end > size:
        raise _malformed(filename, f"tensor {name!r} data_offsets run past the end of the file (out of range)")
    if any(d > MAX_DIM for d in shape):
        raise _malformed(filename, f"tensor {name!r} has a dimension over {MAX_DIM} in shape {shape!r}")
    if ndim is not None and len(shape) != ndim:
        raise _malformed(filename, f"tensor {name!r} has {len(shape)} dimensions {shape!r}; {ndim} are required")
    if ndim is not None and 0 in shape:
        raise _malformed(filename, f"tensor {name!r} has a zero-size dimension in shape {shape!r}")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise _malformed(
            filename,
            f"tensor {name!r}: {dtype} {shape} needs {expected} bytes but data_offsets span {end - begin}",
        )
    return TensorInfo(name, dtype, tuple(shape), buffer_start + begin, buffer_start + end)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(filename: str, tensors: list[TensorInfo], buffer_start: int, size: int) -> None:
    """The tensors must tile the buffer exactly: in range, no overlap, no gap, no trailing bytes."""
    position = buffer_start
    for tensor in tensors:
        if tensor.end > size:
            raise _malformed(
                filename, f"tensor {tensor.name!r} data_offsets run past the end of the file (out of range)"
            )
        if tensor.begin < position:
            raise _malformed(filename, f"tensor {tensor.name!r} overlaps the previous tensor's bytes")
        if tensor.begin > position:
            raise _malformed(filename, f"a gap of unclaimed bytes lies before tensor {tensor.name!r}")
        position = tensor.end
    if position != size:
        raise _malformed(filename, f"{size - position} trailing bytes after the last tensor")
