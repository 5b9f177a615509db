"""`loraswap serve` settings: flags, `LORASWAP_*` environment, API keys (env and file), validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import parse_args
from server.settings import ServerConfig, parse_api_keys


def test_every_documented_flag_is_accepted(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# tenants\nalice:sk-a\n\nbob:sk-b\n")
    config = parse_args(
        [
            "--host",
            "0.0.0.0",
            "--port",
            "9001",
            "--base",
            "/models/x",
            "--quant",
            "none",
            "--dtype",
            "bfloat16",
            "--store",
            str(tmp_path / "store"),
            "--max-loras",
            "4",
            "--max-cpu-loras",
            "16",
            "--max-model-len",
            "1024",
            "--max-num-seqs",
            "8",
            "--fold",
            "pinned",
            "--api-keys-file",
            str(keys),
        ]
    )
    assert (config.host, config.port, config.base, config.quant, config.dtype) == (
        "0.0.0.0",
        9001,
        "/models/x",
        "none",
        "bfloat16",
    )
    assert config.store == Path(tmp_path / "store")
    assert (config.max_loras, config.max_cpu_loras, config.max_model_len, config.max_num_seqs, config.fold) == (
        4,
        16,
        1024,
        8,
        "pinned",
    )
    assert config.api_keys == (("alice", "sk-a"), ("bob", "sk-b")) and config.auth_enabled


def test_environment_is_read_and_flags_win(monkeypatch):
    monkeypatch.setenv("LORASWAP_PORT", "9100")
    monkeypatch.setenv("LORASWAP_API_KEYS", "alice:k1, bob:k2")
    monkeypatch.setenv("LORASWAP_MAX_MODEL_LEN", "777")
    config = parse_args([])
    assert config.port == 9100 and config.max_model_len == 777
    assert config.api_keys == (("alice", "k1"), ("bob", "k2"))
    assert parse_args(["--port", "9200"]).port == 9200


def test_no_keys_means_auth_off(monkeypatch):
    monkeypatch.delenv("LORASWAP_API_KEYS", raising=False)
    config = parse_args([])
    assert config.api_keys == () and not config.auth_enabled
    assert (config.host, config.port, config.base) == ("127.0.0.1", 8000, "default")


@pytest.mark.parametrize("spec", ["alice", "alice:", ":key", "alice:k,bob"])
def test_malformed_api_keys_are_refused(spec):
    with pytest.raises(ValueError, match="api_keys"):
        parse_api_keys(spec)


@pytest.mark.parametrize(
    "overrides, name",
    [
        ({"api_keys": (("a/b", "k"),)}, "api_keys"),
        ({"api_keys": (("a", "k"), ("b", "k"))}, "api_keys"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"max_queue": -1}, "max_queue"),
        ({"port": 0}, "port"),
    ],
)
def test_invalid_config_names_the_setting(overrides, name):
    with pytest.raises(ValueError, match=name):
        ServerConfig(**overrides)


def test_invalid_flag_values_are_refused():
    with pytest.raises(ValueError):
        parse_args(["--quant", "int3"])


def test_lora_dtype_reaches_the_engine_and_bad_values_are_refused(tmp_path):
    """`--lora-dtype bfloat16` (bf16 adapter slots) is an opt-in; the default keeps float32 slots."""
    assert parse_args([]).to_engine_config(tmp_path).lora_dtype == "auto"
    assert parse_args(["--lora-dtype", "bfloat16"]).to_engine_config(tmp_path).lora_dtype == "bfloat16"
    with pytest.raises(ValueError):
        parse_args(["--lora-dtype", "int8"])
