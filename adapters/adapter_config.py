"""`adapter_config.json` as loraswap accepts it: the typed fields, the refused features, targeting.

PEFT writes many keys, and newer versions add more; unknown keys are allowed, but the ones that
change what the adapter computes (DoRA, biases, extra trainable modules, ...) or that make a
loader import code must be off. `AdapterConfig.targets(path)` answers PEFT's question "does this
config wrap that module?" with PEFT's own rules (exact name or dotted suffix, `layers_to_transform`,
`exclude_modules`), so validation can insist that every tensor belongs to a wrapped module.
Regular-expression forms (string `target_modules`, pattern keys with regex syntax) are refused:
they are rare in saved adapters and untrusted regexes can take exponential time.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters.errors import InvalidAdapter
from adapters.format import CONFIG_FILE
from adapters.strict_json import loads_strict

MAX_CONFIG_BYTES = 1 << 20
# Default cap on the entries of each list/dict field below; validation passes one derived from
# the base (its module count), since no config needs more entries than there are modules.
MAX_CONFIG_ENTRIES = 4096
COUNTED_FIELDS = ("target_modules", "rank_pattern", "alpha_pattern", "exclude_modules", "layers_to_transform")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.]{1,200}")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
# Keys a loader would use to import or run code.
CODE_LOADING_KEYS = ("auto_map", "trust_remote_code", "custom_code", "remote_code", "code_revision")
# Features that change the forward pass beyond `W + scaling * B @ A` on linear layers; each must
# be absent, null, false or empty. Init-only settings (loftq, eva, corda, lora_ga) are harmless.
UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save (extra fully-trained modules)",
    "fan_in_fan_out": "fan_in_fan_out (transposed Conv1D weights)",
    "lora_bias": "lora_bias (a bias on lora_B)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "trainable_token_indices": "trainable_token_indices (embedding updates)",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "layer_replication": "layer_replication",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "velora_config": "VeLoRA (velora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "megatron_config": "Megatron layers (megatron_config)",
}


def _invalid(message: str, code: str = "invalid_config", status: int = 400) -> InvalidAdapter:
    return InvalidAdapter(f"{CONFIG_FILE}: {message}", code, status)


class AdapterConfig(BaseModel):
    """The fields of a PEFT LoRA config that decide what the adapter computes (strict types)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    peft_type: str
    r: int
    lora_alpha: float
    target_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    auto_mapping: dict[str, Any] | None = None

    def targets(self, path: str) -> bool:
        """Whether PEFT would wrap the module at `path` (e.g. `model.layers.0.self_attn.q_proj`)."""
        if not any(_matches(path, t) for t in self.target_modules or []):
            return False
        if isinstance(self.exclude_modules, str):  # PEFT: a string is matched whole
            if re.fullmatch(self.exclude_modules, path):
                return False
        elif any(_matches(path, e) for e in self.exclude_modules or []):
            return False
        if self.layers_to_transform is not None:
            index = _LAYER_INDEX.search(f".{path}.")
            return index is not None and int(index[1]) in _as_list(self.layers_to_transform)
        return True


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def parse_config(data: bytes, *, max_entries: int = MAX_CONFIG_ENTRIES) -> tuple[dict, AdapterConfig]:
    """Parse and police `adapter_config.json`; returns the raw dict and its typed view.

    Args:
        data: the file's bytes.
        max_entries: cap on the entries of each of `COUNTED_FIELDS`, checked before typing the
            config (422 `too_many_entries`).

    Raises:
        InvalidAdapter: naming the key at fault (400 for malformed input, 422 for refused
            features and ranks).
    """
    try:
        raw = loads_strict(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _invalid(f"not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise _invalid("must hold a JSON object")
    for key in CODE_LOADING_KEYS:
        if key in raw:
            raise _invalid(f"key '{key}' would make a loader run code; it is not allowed", "code_loading_key")
    for key in COUNTED_FIELDS:
        value = raw.get(key)
        if isinstance(value, (list, dict)) and len(value) > max_entries:
            message = f"{key} has {len(value)} entries; at most {max_entries} (the base's module count) are allowed"
            raise _invalid(message, "too_many_entries", 422)
    try:
        config = AdapterConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise _invalid(f"field '{where}': {first['msg']}") from exc
    _check_policy(raw, config)
    return raw, config


def _check_policy(raw: dict, config: AdapterConfig) -> None:
    def refuse(message: str, code: str = "unsupported_feature") -> InvalidAdapter:
        return _invalid(message, code, 422)

    if config.peft_type != "LORA":
        raise refuse(f"peft_type is {config.peft_type!r}; only LORA adapters are served", "unsupported_peft_type")
    _check_auto_mapping(config.auto_mapping)
    if config.bias != "none":
        raise refuse(f"bias is {config.bias!r}; only 'none' is supported (base biases stay frozen)", "unsupported_bias")
    for key, feature in UNSUPPORTED_FEATURES.items():
        value = raw.get(key)
        if value not in (None, False, [], {}, ""):
            code = key if key in ("use_dora", "modules_to_save") else "unsupported_feature"
            raise refuse(f"{feature} is not supported (got {key}={value!r})", code)
    if isinstance(config.target_modules, str):
        raise refuse(
            f"target_modules is the regular expression {config.target_modules!r}; list module names instead",
            "regex_target_modules",
        )
    if not config.target_modules:
        raise refuse("target_modules is empty: the adapter wraps nothing", "no_target_modules")
    for key in [*config.rank_pattern, *config.alpha_pattern, *_as_list(config.exclude_modules)]:
        if not _PLAIN_NAME.fullmatch(key):
            raise refuse(f"pattern {key!r} is not a plain module name ([A-Za-z0-9_.])", "invalid_pattern")
    if config.layers_pattern not in (None, "layers", ["layers"]):
        raise refuse(f"layers_pattern {config.layers_pattern!r} is not supported (only 'layers')")
    if not all(math.isfinite(a) for a in [config.lora_alpha, *config.alpha_pattern.values()]):
        raise refuse("lora_alpha and alpha_pattern values must be finite", "invalid_alpha")


def _check_auto_mapping(mapping: dict | None) -> None:
    """PEFT records the base class here; AutoPeftModel imports `parent_library` from it."""
    if not mapping:
        return
    library = mapping.get("parent_library")
    cls = mapping.get("base_model_class")
    library_ok = isinstance(library, str) and re.fullmatch(r"transformers(\.[A-Za-z0-9_]+)*", library)
    class_ok = cls is None or (isinstance(cls, str) and cls.isidentifier())
    if not (library_ok and class_ok):
        raise _invalid(
            f"auto_mapping {mapping!r} points outside transformers and would make a loader import code",
            "code_loading_key",
        )


def check_ranks(config: AdapterConfig, max_rank: int) -> None:
    """`r` and every `rank_pattern` value must lie in 1..max_rank (422 `rank_out_of_range`)."""
    ranks = {"r": config.r, **{f"rank_pattern[{k!r}]": v for k, v in config.rank_pattern.items()}}
    for where, rank in ranks.items():
        if not 1 <= rank <= max_rank:
            raise _invalid(f"{where} = {rank} is outside 1..{max_rank}", "rank_out_of_range", 422)
