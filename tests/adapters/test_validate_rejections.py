"""One fixture per validation rejection: each is refused with its own code, status and message,
and a publish attempt through validation leaves the store exactly as it was.

Every case starts from a good adapter (written by `write_peft` for the tiny base) and breaks one
thing. The good adapter itself must validate, so a case cannot pass by accident.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapters.base import BaseInfo
from adapters.bounds import AdapterBounds
from adapters.errors import InvalidAdapter
from adapters.format import CONFIG_FILE, PROVENANCE_FILE, WEIGHTS_FILE, write_peft
from adapters.store import AdapterStore
from adapters.validate import validate_adapter_dir
from tests.adapters.helpers import entry, make_weights, raw_safetensors, snapshot

PREFIX = "base_model.model."


@dataclass
class Case:
    id: str
    break_it: Callable[[Path], None]
    code: str
    status: int
    fragment: str  # must appear in the message
    options: dict = field(default_factory=dict)


def edit_config(**changes) -> Callable[[Path], None]:
    def apply(d: Path):
        config = json.loads((d / CONFIG_FILE).read_text())
        for key, value in changes.items():
            if value is _DROP:
                config.pop(key, None)
            else:
                config[key] = value
        (d / CONFIG_FILE).write_text(json.dumps(config))

    return apply


_DROP = object()


def write(name: str, content: bytes | str) -> Callable[[Path], None]:
    def apply(d: Path):
        (d / name).write_bytes(content.encode() if isinstance(content, str) else content)

    return apply


def remove(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def tensors(mutate: Callable[[dict], None]) -> Callable[[Path], None]:
    """Rewrite the safetensors file after `mutate` edits its tensor dict."""

    def apply(d: Path):
        from safetensors.torch import load_file

        state = load_file(str(d / WEIGHTS_FILE))
        mutate(state)
        save_file(state, str(d / WEIGHTS_FILE))

    return apply


def key(path: str, which: str) -> str:
    return f"{PREFIX}{path}.lora_{which}.weight"


Q0, K0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
F32_4x4 = entry("F32", [4, 4], 0, 64)


def _set(name: str, value) -> Callable[[dict], None]:
    return lambda state: state.__setitem__(name, value)


def _symlink_config(d: Path):
    outside = d.parent / "elsewhere.json"  # a link could point anywhere on the server
    outside.write_text((d / CONFIG_FILE).read_text())
    (d / CONFIG_FILE).unlink()
    os.symlink(outside, d / CONFIG_FILE)


def _duplicate_key_file() -> bytes:
    """A header naming tensor 'a' twice (json.dumps cannot write that)."""
    one = json.dumps(F32_4x4)
    header = f'{{"a": {one}, "a": {one}}}'.encode()
    return struct.pack("<Q", len(header)) + header + bytes(64)


def _nan_in_b(state):
    state[key(Q0, "B")][0, 0] = float("nan")


def _inf_in_a(state):
    state[key(Q0, "A")][1, 2] = float("inf")


CASES = [
    # -- files ---------------------------------------------------------------------------------
    *[
        Case(f"pickle{suffix}", write(f"adapter_model{suffix}", b"\x80\x04K\x01."), "pickle_file", 415, "pickle")
        for suffix in (".bin", ".pt", ".pkl", ".ckpt")
    ],
    Case("code_file", write("modeling_lora.py", "import os\n"), "code_file", 415, "code files"),
    Case("unknown_file", write("notes.txt", "hi"), "unknown_file", 415, "notes.txt: unexpected file"),
    Case("subdirectory", lambda d: (d / "extra").mkdir(), "unknown_file", 415, "extra: unexpected file"),
    Case("symlink", _symlink_config, "symlink", 415, "symbolic link"),
    Case("tokenizer_json", write("tokenizer.json", "{}"), "tokenizer_file", 422, "cannot change the tokenizer"),
    Case("tokenizer_config", write("tokenizer_config.json", "{}"), "tokenizer_file", 422, "tokenizer_config.json"),
    Case("chat_template", write("chat_template.jinja", "{{ x }}"), "tokenizer_file", 422, "chat template"),
    Case("missing_config", remove(CONFIG_FILE), "missing_config", 400, "adapter_config.json is missing"),
    Case("missing_weights", remove(WEIGHTS_FILE), "missing_weights", 400, "adapter_model.safetensors is missing"),
    Case("adapter_too_large", lambda d: None, "adapter_too_large", 413, "over the 1000-byte cap", {"max_bytes": 1000}),
    Case("readme_too_large", write("README.md", "x" * ((1 << 20) + 1)), "file_too_large", 413, "README.md"),
    # -- config --------------------------------------------------------------------------------
    Case("config_not_json", write(CONFIG_FILE, "{r: 4"), "invalid_config", 400, "not valid JSON"),
    Case("config_not_object", write(CONFIG_FILE, "[1, 2]"), "invalid_config", 400, "must hold a JSON object"),
    Case(
        "config_duplicate_key",
        write(CONFIG_FILE, '{"peft_type": "LORA", "r": 4, "r": 8}'),
        "invalid_config",
        400,
        "duplicate key 'r'",
    ),
    Case(
        "config_nan",
        write(CONFIG_FILE, '{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}'),
        "invalid_config",
        400,
        "NaN",
    ),
    Case("config_deep_nesting", write(CONFIG_FILE, "[" * 200_000), "invalid_config", 400, "nested too deeply"),
    Case("config_r_string", edit_config(r="4"), "invalid_config", 400, "field 'r'"),
    Case("config_no_r", edit_config(r=_DROP), "invalid_config", 400, "field 'r'"),
    Case("rank_zero", edit_config(r=0), "rank_out_of_range", 422, "r = 0 is outside 1..64"),
    Case("rank_over_cap", edit_config(r=65), "rank_out_of_range", 422, "r = 65 is outside 1..64"),
    Case("rank_over_custom_cap", lambda d: None, "rank_out_of_range", 422, "r = 4 is outside 1..2", {"max_rank": 2}),
    Case(
        "rank_pattern_over_cap",
        edit_config(rank_pattern={"q_proj": 128}),
        "rank_out_of_range",
        422,
        "rank_pattern['q_proj'] = 128",
    ),
    Case("use_dora", edit_config(use_dora=True), "use_dora", 422, "DoRA"),
    Case("modules_to_save", edit_config(modules_to_save=["lm_head"]), "modules_to_save", 422, "modules_to_save"),
    Case("bias_all", edit_config(bias="all"), "unsupported_bias", 422, "bias is 'all'"),
    Case("fan_in_fan_out", edit_config(fan_in_fan_out=True), "unsupported_feature", 422, "fan_in_fan_out"),
    Case("lora_bias", edit_config(lora_bias=True), "unsupported_feature", 422, "lora_bias"),
    Case("not_lora", edit_config(peft_type="IA3"), "unsupported_peft_type", 422, "only LORA"),
    Case(
        "auto_map",
        edit_config(auto_map={"AutoModel": "evil.Model"}),
        "code_loading_key",
        400,
        "'auto_map' would make a loader run code",
    ),
    Case("trust_remote_code", edit_config(trust_remote_code=True), "code_loading_key", 400, "trust_remote_code"),
    Case(
        "auto_mapping_outside",
        edit_config(auto_mapping={"base_model_class": "X", "parent_library": "os"}),
        "code_loading_key",
        400,
        "outside transformers",
    ),
    Case("regex_targets", edit_config(target_modules=".*proj"), "regex_target_modules", 422, "regular expression"),
    Case(
        "regex_pattern_key", edit_config(rank_pattern={"(a+)+$": 2}), "invalid_pattern", 422, "not a plain module name"
    ),
    Case("empty_targets", edit_config(target_modules=[]), "no_target_modules", 422, "wraps nothing"),
    # -- against the base ------------------------------------------------------------------------
    Case(
        "unknown_target",
        edit_config(target_modules=["q_proj", "v_proj", "down_proj", "foo_proj"]),
        "unknown_target_module",
        422,
        "'foo_proj' is not a linear layer of the base",
    ),
    Case(
        "nothing_matched", edit_config(layers_to_transform=[7]), "nothing_matched", 422, "no module of the base matches"
    ),
    Case("no_tensors", write(WEIGHTS_FILE, raw_safetensors({})), "no_modules", 422, "holds no LoRA tensors"),
    Case(
        "untargeted_tensor",
        tensors(lambda s: s.update({key(K0, "A"): torch.ones(4, 64), key(K0, "B"): torch.ones(32, 4)})),
        "untargeted_module",
        422,
        "'model.layers.0.self_attn.k_proj', which target_modules does not cover",
    ),
    Case(
        "layer_past_depth",
        tensors(
            lambda s: s.update(
                {
                    key("model.layers.7.self_attn.q_proj", "A"): torch.ones(4, 64),
                    key("model.layers.7.self_attn.q_proj", "B"): torch.ones(64, 4),
                }
            )
        ),
        "layer_out_of_range",
        422,
        "layer 7 is past the base's depth (2 layers",
    ),
    Case(
        "module_not_in_base",
        tensors(
            lambda s: s.update(
                {
                    key("model.layers.0.self_attn.rotary", "A"): torch.ones(4, 64),
                    key("model.layers.0.self_attn.rotary", "B"): torch.ones(64, 4),
                }
            )
        ),
        "unknown_target_module",
        422,
        "rotary",
    ),
    Case(
        "shape_in_features",
        tensors(_set(key(Q0, "A"), torch.ones(4, 65))),
        "shape_mismatch",
        422,
        "needs lora_A [4, 64]",
    ),
    Case("shape_rank_vs_config", edit_config(r=8), "shape_mismatch", 422, "r=8 on this base"),
    Case(
        "shape_rank_pattern",
        edit_config(rank_pattern={"down_proj": 2}),
        "shape_mismatch",
        422,
        "model.layers.0.mlp.down_proj",
    ),
    Case("lone_lora_a", tensors(lambda s: s.pop(key(Q0, "B"))), "unexpected_tensor", 422, "has no lora_B tensor"),
    Case(
        "stray_key",
        tensors(_set(f"{PREFIX}lm_head.weight", torch.ones(2, 2))),
        "unexpected_tensor",
        422,
        "unexpected tensor key",
    ),
    Case(
        "dtype_f64",
        tensors(_set(key(Q0, "A"), torch.ones(4, 64, dtype=torch.float64))),
        "unsupported_dtype",
        422,
        "dtype F64",
    ),
    Case(
        "dtype_i32",
        tensors(_set(key(Q0, "B"), torch.ones(64, 4, dtype=torch.int32))),
        "unsupported_dtype",
        422,
        "dtype I32",
    ),
    Case("nan_values", tensors(_nan_in_b), "nan_values", 422, f"{Q0}.lora_B holds NaN or Inf"),
    Case("inf_values", tensors(_inf_in_a), "nan_values", 422, f"{Q0}.lora_A holds NaN or Inf"),
    # -- malformed safetensors -------------------------------------------------------------------
    Case("st_empty", write(WEIGHTS_FILE, b""), "malformed_safetensors", 400, "the file is empty"),
    Case("st_short", write(WEIGHTS_FILE, b"\x10\x00\x00"), "malformed_safetensors", 400, "truncated"),
    Case(
        "st_truncated_data",
        lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:-10]),
        "malformed_safetensors",
        400,
        "run past the end of the file",
    ),
    Case(
        "st_header_overflow",
        write(WEIGHTS_FILE, struct.pack("<Q", 2**63) + b"{}"),
        "malformed_safetensors",
        400,
        "overflows the",
    ),
    Case(
        "st_header_past_file",
        write(WEIGHTS_FILE, raw_safetensors({}, header_len=4096)),
        "malformed_safetensors",
        400,
        "overflows the file",
    ),
    Case(
        "st_not_json",
        write(WEIGHTS_FILE, struct.pack("<Q", 6) + b"\xff{oops"),
        "malformed_safetensors",
        400,
        "the header is not JSON",
    ),
    Case(
        "st_header_list", write(WEIGHTS_FILE, raw_safetensors([1])), "malformed_safetensors", 400, "not a JSON object"
    ),
    Case(
        "st_overlap",
        write(
            WEIGHTS_FILE,
            raw_safetensors({key(Q0, "A"): F32_4x4, key(Q0, "B"): entry("F32", [4, 4], 32, 96)}, bytes(96)),
        ),
        "malformed_safetensors",
        400,
        "overlaps",
    ),
    Case(
        "st_out_of_range",
        write(WEIGHTS_FILE, raw_safetensors({key(Q0, "A"): entry("F32", [4, 4], 1000, 1064)}, bytes(64))),
        "malformed_safetensors",
        400,
        "out of range",
    ),
    Case(
        "st_size_vs_shape",
        write(WEIGHTS_FILE, raw_safetensors({key(Q0, "A"): entry("F32", [4, 5], 0, 64)}, bytes(64))),
        "malformed_safetensors",
        400,
        "needs 80 bytes but data_offsets span 64",
    ),
    Case(
        "st_backwards",
        write(WEIGHTS_FILE, raw_safetensors({key(Q0, "A"): entry("F32", [0], 64, 0)}, bytes(64))),
        "malformed_safetensors",
        400,
        "run backwards",
    ),
    Case(
        "st_gap",
        write(WEIGHTS_FILE, raw_safetensors({key(Q0, "A"): entry("F32", [4, 4], 8, 72)}, bytes(72))),
        "malformed_safetensors",
        400,
        "gap of unclaimed bytes",
    ),
    Case(
        "st_trailing",
        write(WEIGHTS_FILE, raw_safetensors({key(Q0, "A"): F32_4x4}, bytes(80))),
        "malformed_safetensors",
        400,
        "16 trailing bytes",
    ),
    Case(
        "st_unknown_dtype",
        write(WEIGHTS_FILE, raw_safetensors({key(Q0, "A"): entry("F12", [4, 4], 0, 64)}, bytes(64))),
        "malformed_safetensors",
        400,
        "unknown dtype 'F12'",
    ),
    Case(
        "st_bad_shape",
        write(WEIGHTS_FILE, raw_safetensors({key(Q0, "A"): entry("F32", [-4, 4], 0, 64)}, bytes(64))),
        "malformed_safetensors",
        400,
        "invalid shape",
    ),
    Case(
        "st_duplicate_tensor",
        write(WEIGHTS_FILE, _duplicate_key_file()),
        "malformed_safetensors",
        400,
        "duplicate key 'a'",
    ),
    Case(
        "st_deep_header",
        write(WEIGHTS_FILE, raw_safetensors({}, header_len=60_000)[:8] + b"[" * 60_000),
        "malformed_safetensors",
        400,
        "nested too deeply",
    ),
    Case(
        "st_metadata_not_strings",
        write(WEIGHTS_FILE, raw_safetensors({"__metadata__": {"format": 1}})),
        "malformed_safetensors",
        400,
        "__metadata__",
    ),
    Case(
        "st_pickle_bytes", write(WEIGHTS_FILE, b"\x80\x04\x95" + bytes(64)), "malformed_safetensors", 400, "overflows"
    ),
    # -- numeric bounds (adapters/bounds.py, defaults) --------------------------------------------
    Case(
        "alpha_1e300",
        edit_config(lora_alpha=1e300),
        "adapter_out_of_range",
        422,
        "model.layers.0.mlp.down_proj: scaling = 2.5e+299 exceeds 1024",
    ),
    Case(
        "alpha_pattern_one_module",
        edit_config(alpha_pattern={"model.layers.1.self_attn.v_proj": 1e6}),
        "adapter_out_of_range",
        422,
        "model.layers.1.self_attn.v_proj: scaling = 2.5e+05 exceeds 1024",
    ),
    Case(
        "rslora_alpha",
        edit_config(use_rslora=True, lora_alpha=4096),
        "adapter_out_of_range",
        422,
        "scaling = 2.05e+03 exceeds 1024",
    ),
    Case(
        "a_near_float32_max",
        tensors(lambda s: s[key(Q0, "A")].__setitem__((0, 0), 3e38)),
        "adapter_out_of_range",
        422,
        f"{Q0}: max |lora_A| = 3e+38 exceeds 10000",
    ),
    Case(
        "b_over_magnitude",
        tensors(lambda s: s[key(Q0, "B")].__setitem__((1, 1), -2e4)),
        "adapter_out_of_range",
        422,
        f"{Q0}: max |lora_B| = 2e+04 exceeds 10000",
    ),
    Case(
        "update_ratio",
        tensors(lambda s: s[key(Q0, "B")].mul_(100)),
        "adapter_out_of_range",
        422,
        f"{Q0}: ||scaling*B@A||/||W|| = ",
    ),
    Case(
        "update_ratio_custom_bound",
        lambda d: None,
        "adapter_out_of_range",
        422,
        "exceeds 0.01",
        {"bounds": AdapterBounds(max_delta_ratio=0.01)},
    ),
    # -- shapes the library would choke on ---------------------------------------------------------
    Case(
        "zero_rank",
        tensors(lambda s: s.update({key(Q0, "A"): torch.ones(0, 64), key(Q0, "B"): torch.ones(64, 0)})),
        "malformed_safetensors",
        400,
        "zero-size dimension",
    ),
    Case(
        "zero_d_lora_a",
        write(WEIGHTS_FILE, raw_safetensors({key(Q0, "A"): entry("F32", [], 0, 4)}, bytes(4))),
        "malformed_safetensors",
        400,
        "has 0 dimensions []; 2 are required",
    ),
    Case(
        "one_d_lora_a",
        write(WEIGHTS_FILE, raw_safetensors({key(Q0, "A"): entry("F32", [4], 0, 16)}, bytes(16))),
        "malformed_safetensors",
        400,
        "has 1 dimensions [4]",
    ),
    Case(
        "dim_2_64_by_0",
        write(WEIGHTS_FILE, raw_safetensors({key(Q0, "A"): entry("F32", [2**64, 0], 0, 0)})),
        "malformed_safetensors",
        400,
        "dimension over 2147483647",
    ),
    Case(
        "dim_huge_product",
        write(WEIGHTS_FILE, raw_safetensors({key(Q0, "A"): entry("F32", [2**31 - 1, 2**31 - 1], 0, 2**66)})),
        "malformed_safetensors",
        400,
        "run past the end of the file",
    ),
    # -- structural caps derived from the base ------------------------------------------------------
    Case(
        "too_many_tensors",
        write(
            WEIGHTS_FILE,
            raw_safetensors({f"t{i}": entry("F32", [1, 1], 4 * i, 4 * i + 4) for i in range(45)}, bytes(180)),
        ),
        "too_many_tensors",
        413,
        "more than 44 tensors",
    ),
    Case(
        "header_240k_tensors",
        write(
            WEIGHTS_FILE,
            raw_safetensors({f"t{i}": entry("F32", [1, 1], 4 * i, 4 * i + 4) for i in range(240_000)}, bytes(960_000)),
        ),
        "malformed_safetensors",
        400,
        "overflows the 88064-byte cap",
    ),
    Case(
        "alpha_pattern_70k",
        edit_config(alpha_pattern={f"m{i}": 1.0 for i in range(70_000)}),
        "too_many_entries",
        422,
        "alpha_pattern has 70000 entries; at most 23",
    ),
    Case(
        "rank_pattern_too_many",
        edit_config(rank_pattern={f"m{i}": 4 for i in range(24)}),
        "too_many_entries",
        422,
        "rank_pattern has 24 entries",
    ),
    Case(
        "target_modules_too_many",
        edit_config(target_modules=[f"q_proj{i}" for i in range(24)]),
        "too_many_entries",
        422,
        "target_modules has 24 entries",
    ),
    # -- provenance ------------------------------------------------------------------------------
    Case(
        "provenance_not_json", write(PROVENANCE_FILE, "{"), "invalid_provenance", 400, "loraswap.json is not valid JSON"
    ),
    Case(
        "provenance_bad_sha",
        write(PROVENANCE_FILE, '{"chat_template_sha256": "abc"}'),
        "invalid_provenance",
        400,
        "field 'chat_template_sha256'",
    ),
    Case(
        "provenance_bad_vocab",
        write(PROVENANCE_FILE, '{"tokenizer_vocab_size": 0}'),
        "invalid_provenance",
        400,
        "field 'tokenizer_vocab_size'",
    ),
]


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return BaseInfo.from_dir(tiny_base_dir)


@pytest.fixture(scope="module")
def good_weights(base):
    return make_weights(base, rank=4, seed=7)


@pytest.fixture
def good_dir(tmp_path, good_weights, base):
    directory = write_peft(good_weights, tmp_path / "upload")
    validate_adapter_dir(directory, base)  # the starting point is valid
    return directory


@pytest.fixture
def store(tmp_path, base):
    """A store in which tenant `acme` already has `helper` (version 1): the state to protect."""
    store = AdapterStore(tmp_path / "store")
    previous = write_peft(make_weights(base, rank=2, seed=99), tmp_path / "previous")
    store.publish("acme", "helper", validate_adapter_dir(previous, base))
    return store


def test_every_case_has_its_own_fixture():
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rejection(case: Case, good_dir, base, store):
    before = snapshot(store.root)
    previous = store.get("acme", "helper")
    case.break_it(good_dir)
    with pytest.raises(InvalidAdapter) as caught:
        store.publish("acme", "helper", validate_adapter_dir(good_dir, base, **case.options))
    error = caught.value
    assert (error.code, error.status) == (case.code, case.status), error.message
    assert case.fragment in error.message
    assert error.envelope()["error"]["code"] == case.code
    assert snapshot(store.root) == before
    assert store.get("acme", "helper") == previous
