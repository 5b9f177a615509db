"""Check an uploaded adapter directory against a base before anything serves or stores it.

`validate_adapter_dir` refuses, each with an `InvalidAdapter` whose message names the problem:
files that are not the known ones (pickles, code, tokenizer or chat-template files, symlinks,
folders), size caps, a missing or invalid `adapter_config.json`, refused PEFT features, ranks
outside 1..max_rank, malformed safetensors, unsupported dtypes, tensors for modules the base
does not have (or the config does not target), shapes that disagree with the base and the rank,
NaN/Inf values, and numbers out of proportion to the base (`adapters.bounds`). Structural caps
derived from the base (config entries, header bytes, tensor count) come before any parse, and
the whole structure is checked from the safetensors header before any tensor is read. Files
are read only as JSON and as a safetensors container whose header we parse ourselves first;
nothing is unpickled and no model is loaded. The result carries the
content sha256 the store files the adapter under. `check_template` is the separate
chat-template contract the server applies at upload.
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from adapters.adapter_config import AdapterConfig, check_ranks, parse_config
from adapters.base import BaseInfo
from adapters.bounds import AdapterBounds, check_bounds
from adapters.errors import InvalidAdapter
from adapters.format import (
    CONFIG_FILE,
    PROVENANCE_FILE,
    WEIGHTS_FILE,
    LoraWeights,
    Patterns,
    pair_keys,
    tensors_to_modules,
)
from adapters.provenance import Provenance, parse_provenance
from adapters.safetensors_header import parse_header

README_FILE = "README.md"
ALLOWED_FILES = (CONFIG_FILE, WEIGHTS_FILE, PROVENANCE_FILE, README_FILE)
ACCEPTED_DTYPES = ("F32", "F16", "BF16")
DEFAULT_MAX_BYTES = 512 << 20
MAX_SMALL_FILE_BYTES = 1 << 20  # config, provenance, README
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".h5", ".msgpack")
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so", ".dll", ".dylib", ".sh", ".js", ".ipynb", ".exe")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)  # fmt: skip
TENSOR_SLACK = 16  # room beyond two tensors per module, for nothing legitimate but harmless
HEADER_BYTES_PER_TENSOR = 512  # a PEFT entry is ~130 bytes: key, dtype, shape, offsets
HEADER_SLACK_BYTES = 64 << 10  # __metadata__ and alignment padding
_LAYER_PATH = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)$")


@dataclass(frozen=True)
class ValidatedAdapter:
    """An adapter that passed validation: its weights, provenance and content sha256."""

    weights: LoraWeights
    provenance: Provenance | None
    sha256: str

    @property
    def rank(self) -> int:
        return self.weights.max_rank

    @property
    def target_modules(self) -> list[str]:
        return self.weights.target_modules


def validate_adapter_dir(
    directory: Path | str,
    base: BaseInfo,
    *,
    max_rank: int = 64,
    max_bytes: int = DEFAULT_MAX_BYTES,
    bounds: AdapterBounds | None = None,
) -> ValidatedAdapter:
    """Validate a PEFT LoRA directory against `base`.

    Cheapest first: files and sizes, the config (with entry counts capped by the base's module
    count), the safetensors header (byte length and tensor count capped the same way, every tensor
    2-D with dimensions in range), then the structure (keys, modules, shapes) from the header
    alone; only then are tensors loaded, checked finite and checked against `bounds`.

    Args:
        directory: holds `adapter_config.json`, `adapter_model.safetensors` and optionally
            `loraswap.json` and `README.md` (which is ignored); nothing else.
        base: the loaded base's description (depth, linear shapes, weight norms).
        max_rank: the largest `r` (and `rank_pattern` value) accepted.
        max_bytes: cap on the directory's total size.
        bounds: numeric bounds (scaling, |A|, |B|, update vs base norm); None means the defaults.

    Raises:
        InvalidAdapter: the first problem found, with its code and HTTP status
            (`AdapterOutOfRange`, 422 `adapter_out_of_range`, for the numeric bounds).
    """
    directory = Path(directory)
    caps = StructuralCaps.for_base(base)
    sizes = _check_files(directory, max_bytes)
    config_raw, config = parse_config(_read_small(directory, CONFIG_FILE), max_entries=caps.max_entries)
    check_ranks(config, max_rank)
    data = (directory / WEIGHTS_FILE).read_bytes()
    if len(data) != sizes[WEIGHTS_FILE]:
        raise InvalidAdapter(f"{WEIGHTS_FILE} changed while it was being validated", "malformed_safetensors")
    infos = parse_header(
        data, WEIGHTS_FILE, max_header_bytes=caps.max_header_bytes, max_tensors=caps.max_tensors, ndim=2
    )
    for info in infos:
        if info.dtype not in ACCEPTED_DTYPES:
            accepted = ", ".join(ACCEPTED_DTYPES)
            message = f"{WEIGHTS_FILE}: tensor {info.name!r} has dtype {info.dtype}; accepted: {accepted}"
            raise InvalidAdapter(message, "unsupported_dtype", 422)
    try:
        pairs = pair_keys(info.name for info in infos)
    except ValueError as exc:
        raise InvalidAdapter(f"{WEIGHTS_FILE}: {exc}", "unexpected_tensor", 422) from exc
    shapes = {info.name: info.shape for info in infos}
    _check_against_base(config, {path: (shapes[k["A"]], shapes[k["B"]]) for path, k in pairs.items()}, base)
    # Structure is sound: from here on tensors are read.
    modules = tensors_to_modules(config_raw, load_safetensors(data))
    weights = LoraWeights(config=config_raw, modules=modules)
    _check_finite(weights)
    check_bounds(weights, base.weight_norms(), bounds or AdapterBounds())
    provenance = parse_provenance(_read_small(directory, PROVENANCE_FILE)) if PROVENANCE_FILE in sizes else None
    return ValidatedAdapter(weights=weights, provenance=provenance, sha256=content_sha256(weights, provenance))


@dataclass(frozen=True)
class StructuralCaps:
    """Counts no valid adapter for a base can exceed, checked before anything is parsed fully.

    A PEFT adapter has two tensors per adapted module and its config lists at most one entry per
    module (or projection name), so the caps follow from the base's module count.
    """

    max_entries: int
    max_tensors: int
    max_header_bytes: int

    @classmethod
    def for_base(cls, base: BaseInfo) -> "StructuralCaps":
        modules = base.num_layers * len(base.linear_shapes)
        max_tensors = 2 * modules + TENSOR_SLACK
        return cls(
            max_entries=modules + len(base.linear_shapes) + base.num_layers,
            max_tensors=max_tensors,
            max_header_bytes=max_tensors * HEADER_BYTES_PER_TENSOR + HEADER_SLACK_BYTES,
        )


def _check_files(directory: Path, max_bytes: int) -> dict[str, int]:
    """Only the known files, plain and within caps; returns name -> size."""
    if not directory.is_dir():
        raise InvalidAdapter(f"{directory.name!r} is not an adapter directory", "missing_config")
    sizes = {}
    for entry in sorted(directory.iterdir()):
        info = entry.lstat()  # never follow a link
        _check_entry(entry.name, info.st_mode)
        sizes[entry.name] = info.st_size
        if entry.name != WEIGHTS_FILE and info.st_size > MAX_SMALL_FILE_BYTES:
            raise InvalidAdapter(
                f"{entry.name} is {info.st_size} bytes, over the {MAX_SMALL_FILE_BYTES}-byte cap", "file_too_large", 413
            )
    if sum(sizes.values()) > max_bytes:
        total = sum(sizes.values())
        raise InvalidAdapter(f"the adapter is {total} bytes, over the {max_bytes}-byte cap", "adapter_too_large", 413)
    if CONFIG_FILE not in sizes:
        raise InvalidAdapter(f"{CONFIG_FILE} is missing", "missing_config")
    if WEIGHTS_FILE not in sizes:
        raise InvalidAdapter(f"{WEIGHTS_FILE} is missing", "missing_weights")
    return sizes


def refuse_forbidden_name(name: str, param: str | None = None) -> None:
    """Refuse, by name alone, files an adapter never holds: pickles, code, tokenizer/template files.

    The server applies it to a client's file names before staging anything, `validate_adapter_dir`
    to the staged files: one set of codes and statuses for both.
    """
    lowered = name.lower()
    if lowered.endswith(PICKLE_SUFFIXES):
        message = f"{name}: pickle-based files are refused; weights must be {WEIGHTS_FILE}"
        raise InvalidAdapter(message, "pickle_file", 415, param=param)
    if lowered.endswith(CODE_SUFFIXES):
        raise InvalidAdapter(f"{name}: code files are refused in an adapter", "code_file", 415, param=param)
    if lowered in TOKENIZER_FILES:
        message = f"{name}: an adapter cannot change the tokenizer or the chat template; remove it"
        raise InvalidAdapter(message, "tokenizer_file", 422, param=param)


def unknown_file(name: str, param: str | None = None) -> InvalidAdapter:
    message = f"{name}: unexpected file; an adapter holds only {', '.join(ALLOWED_FILES)}"
    return InvalidAdapter(message, "unknown_file", 415, param=param)


def _check_entry(name: str, mode: int) -> None:
    refuse_forbidden_name(name)
    if stat.S_ISLNK(mode):
        raise InvalidAdapter(f"{name} is a symbolic link; upload plain files", "symlink", 415)
    if name not in ALLOWED_FILES or not stat.S_ISREG(mode):
        raise unknown_file(name)


def _read_small(directory: Path, name: str) -> bytes:
    with open(directory / name, "rb") as fh:
        data = fh.read(MAX_SMALL_FILE_BYTES + 1)
    if len(data) > MAX_SMALL_FILE_BYTES:
        raise InvalidAdapter(f"{name} is over the {MAX_SMALL_FILE_BYTES}-byte cap", "file_too_large", 413)
    return data


def _check_against_base(config: AdapterConfig, shapes: dict[str, tuple[tuple, tuple]], base: BaseInfo) -> None:
    """Targets exist in the base, every tensor belongs to a targeted module, shapes fit.

    `shapes` maps each module path in the file to (lora_A shape, lora_B shape), read from the header.
    """
    base_paths = base.all_module_paths()
    assert config.target_modules is not None  # parse_config refuses a missing/empty target_modules
    for target in config.target_modules:
        if not any(path == target or path.endswith("." + target) for path in base_paths):
            _refuse_unknown_module(target, base, what="target module")
    if not any(config.targets(path) for path in base_paths):
        raise InvalidAdapter(
            f"{CONFIG_FILE}: no module of the base matches target_modules {config.target_modules}",
            "nothing_matched",
            422,
        )
    if not shapes:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no LoRA tensors", "no_modules", 422)
    ranks = Patterns(config.rank_pattern)
    for path, (got_a, got_b) in shapes.items():
        if path not in base_paths:
            _refuse_unknown_module(path, base, what="tensor for module")
        if not config.targets(path):
            raise InvalidAdapter(
                f"{WEIGHTS_FILE} has tensors for {path!r}, which target_modules does not cover "
                "(PEFT would ignore them)",
                "untargeted_module",
                422,
            )
        in_features, out_features = base_paths[path]
        rank = ranks.value(path, config.r)
        want_a, want_b = (rank, in_features), (out_features, rank)
        if got_a != want_a or got_b != want_b:
            raise InvalidAdapter(
                f"{path}: lora_A is {list(got_a)} and lora_B is {list(got_b)}, but r={rank} on this base "
                f"needs lora_A {list(want_a)} and lora_B {list(want_b)}",
                "shape_mismatch",
                422,
            )


def _refuse_unknown_module(name: str, base: BaseInfo, what: str) -> None:
    match = _LAYER_PATH.match(name)
    if match and int(match[1]) >= base.num_layers:
        depth = base.num_layers
        message = f"{what} {name!r}: layer {match[1]} is past the base's depth ({depth} layers, 0..{depth - 1})"
        raise InvalidAdapter(message, "layer_out_of_range", 422)
    raise InvalidAdapter(
        f"{what} {name!r} is not a linear layer of the base; LoRA may target {', '.join(base.linear_shapes)}",
        "unknown_target_module",
        422,
    )


def _check_finite(weights: LoraWeights) -> None:
    for path, module in weights.modules.items():
        for which, tensor in (("lora_A", module.A), ("lora_B", module.B)):
            if not bool(torch.isfinite(tensor).all()):
                raise InvalidAdapter(f"{path}.{which} holds NaN or Inf values", "nan_values", 422)


def content_sha256(weights: LoraWeights, provenance: Provenance | None) -> str:
    """sha256 over the canonical content: config, tensors (name, dtype, shape, bytes), provenance.

    Independent of file layout (key order, header padding, metadata), so the same content gives
    the same id however it was serialized. Each piece is length-prefixed to keep it unambiguous.
    """
    digest = hashlib.sha256(b"loraswap-adapter/1")

    def feed(piece: bytes) -> None:
        digest.update(len(piece).to_bytes(8, "little"))
        digest.update(piece)

    feed(_canonical_json(weights.config))
    for path in sorted(weights.modules):
        module = weights.modules[path]
        for which, tensor in (("lora_A", module.A), ("lora_B", module.B)):
            feed(_canonical_json({"key": f"{path}.{which}", "dtype": str(tensor.dtype), "shape": list(tensor.shape)}))
            feed(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    if provenance is not None:
        feed(_canonical_json(provenance.to_json_dict()))
    return digest.hexdigest()


def _canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def check_template(provenance: Provenance | None, base: BaseInfo, allow_mismatch: bool = False) -> None:
    """Refuse an adapter trained with another chat template than the base serves.

    Serving off-template silently degrades outputs, so the default is to refuse (422
    `template_mismatch`). Adapters without provenance, or without a recorded template, pass.

    Args:
        provenance: the adapter's `loraswap.json`, or None.
        base: the base being served.
        allow_mismatch: the operator's explicit override.
    """
    if provenance is None or provenance.chat_template_sha256 is None or allow_mismatch:
        return
    if provenance.chat_template_sha256 != base.template_sha256:
        raise InvalidAdapter(
            f"the adapter was trained with chat template sha256 {provenance.chat_template_sha256}, "
            f"but the base serves chat template sha256 {base.template_sha256}; retrain on the base's "
            "template or allow the mismatch explicitly",
            "template_mismatch",
            422,
        )
