"""The seams between the parts: one settings model feeding the engine, one error family, imports
that only run downhill (`server -> adapters <- trainer`; inside `server/`, core modules never
import the API layer)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from adapters.errors import AdapterNotFound, InvalidAdapter, LoraswapError
from adapters.chat_template import TemplateError
from server.cli import parse_args
from server.engine.config import EngineConfig
from server.engine.errors import EngineStopped, PromptTooLong
from server.errors import Overloaded, RateLimited
from server.settings import ServerConfig

ROOT = Path(__file__).resolve().parents[2]


# -- settings -------------------------------------------------------------------------------------


def test_engine_knobs_default_to_the_engine_config_and_reach_it():
    engine_defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    config = ServerConfig()
    built = config.to_engine_config("/models/x")
    assert built == EngineConfig(base="/models/x", kv_cache_bytes=config.kv_cache_bytes)
    for name in (
        "quant",
        "dtype",
        "device",
        "max_loras",
        "max_cpu_loras",
        "max_rank",
        "max_model_len",
        "max_num_seqs",
        "fold",
    ):
        assert getattr(config, name) == engine_defaults[name], name
    assert config.kv_cache_bytes == engine_defaults["kv_cache_bytes"]
    tuned = parse_args(["--max-rank", "8", "--max-loras", "2", "--max-cpu-loras", "3", "--kv-cache-mb", "16"])
    assert tuned.to_engine_config("/m") == EngineConfig(
        base="/m", max_rank=8, max_loras=2, max_cpu_loras=3, kv_cache_bytes=16 << 20
    )


def test_every_setting_has_help_and_a_flag():
    for name, field in ServerConfig.model_fields.items():
        assert field.description, f"{name} has no help text"


def test_max_loras_zero_serves_the_base_as_the_engine_allows():
    assert ServerConfig(max_loras=0).to_engine_config("/m").max_loras == 0


def test_engine_rules_are_checked_once_when_the_settings_are_built():
    with pytest.raises(ValueError, match="max_cpu_loras"):
        ServerConfig(max_loras=8, max_cpu_loras=4)
    with pytest.raises(ValueError, match="max_rank"):
        parse_args(["--max-rank", "0"])


def test_sizes_may_be_given_in_bytes_by_code():
    assert ServerConfig(max_upload_bytes=1024).max_upload_bytes == 1024
    assert ServerConfig(kv_cache_bytes=64 << 20).kv_cache_mb == 64


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error, status, code, param",
    [
        (PromptTooLong("too long"), 400, "context_length_exceeded", "messages"),
        (TemplateError("bad role"), 400, "invalid_messages", "messages"),
        (InvalidAdapter("pickle", "pickle_file", 415, param="files"), 415, "pickle_file", "files"),
        (AdapterNotFound("x"), 404, "model_not_found", "model"),
        (RateLimited("slow down"), 429, "rate_limit_exceeded", None),
        (Overloaded("full"), 503, "server_overloaded", None),
        (EngineStopped("loop not running"), 503, "not_ready", None),
    ],
)
def test_every_error_is_one_family_with_its_envelope(error, status, code, param):
    assert isinstance(error, LoraswapError)
    assert error.status == status
    body = error.envelope()["error"]
    assert (body["code"], body["param"]) == (code, param) and body["message"] == error.message
    assert set(body) == {"message", "type", "param", "code"}


def test_there_is_one_prompt_too_long():
    import server.api.errors
    import server.errors

    assert server.errors.PromptTooLong is PromptTooLong is server.api.errors.PromptTooLong


# -- imports --------------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _package_imports(package: str) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT)): _imports(p) for p in (ROOT / package).rglob("*.py")}


def test_dependencies_run_downhill():
    for path, names in _package_imports("adapters").items():
        assert not any(n.split(".")[0] in ("server", "trainer") for n in names), path
    for path, names in _package_imports("trainer").items():
        assert not any(n.split(".")[0] == "server" for n in names), path
    for path, names in _package_imports("server").items():
        assert not any(n.split(".")[0] == "trainer" for n in names), path
        if not path.startswith(("server/api/", "server/app.py", "server/cli.py")):
            assert not any(n.startswith("server.api") for n in names), f"{path} imports the API layer"
        if path.startswith("server/engine/"):
            assert not any(n.startswith("server.") and not n.startswith("server.engine") for n in names), path
