"""The edge limits (server/limits.py): one `limits` group of `ServerConfig`, every knob reachable
by flag (`--limits.<knob>`) and environment (`LORASWAP_LIMITS__<KNOB>`), validated with an error
that names it, and handed to the store as quotas where it takes them."""

from __future__ import annotations

import pytest

from server.cli import build_store, parse_args
from server.limits import Limits
from server.settings import ServerConfig


def test_every_limit_has_help_and_a_flag_that_reaches_the_config():
    for name, field in Limits.model_fields.items():
        assert field.description, f"limits.{name} has no help text"
        flag = f"--limits.{name.replace('_', '-')}"
        value = "0.25" if name == "tenant_queue_share" else "2"
        assert getattr(parse_args([flag, value]).limits, name) == float(value), flag
    config = parse_args(
        [
            "--admin-key",
            "sk-root",
            "--limits.max-request-bytes",
            "1000",
            "--limits.max-messages",
            "7",
            "--limits.tenant-queue-share",
            "0.25",
            "--limits.body-read-timeout-s",
            "2.5",
            "--limits.max-versions-kept",
            "2",
        ]
    )
    assert config.admin_key == "sk-root"
    assert (
        config.limits.max_request_bytes,
        config.limits.max_messages,
        config.limits.tenant_queue_share,
        config.limits.body_read_timeout_s,
        config.limits.max_versions_kept,
    ) == (1000, 7, 0.25, 2.5, 2)


def test_environment_reaches_the_limits_and_the_admin_key(monkeypatch):
    monkeypatch.setenv("LORASWAP_ADMIN_KEY", "sk-env-admin")
    monkeypatch.setenv("LORASWAP_LIMITS__MAX_PROMPT_CHARS", "1234")
    monkeypatch.setenv("LORASWAP_LIMITS__MAX_CONCURRENT_MERGES", "3")
    config = parse_args([])
    assert config.admin_key == "sk-env-admin"
    assert config.limits.max_prompt_chars == 1234 and config.limits.max_concurrent_merges == 3
    assert parse_args(["--limits.max-prompt-chars", "99"]).limits.max_prompt_chars == 99  # flags win


def test_a_blank_admin_key_is_no_admin_key(monkeypatch):
    monkeypatch.setenv("LORASWAP_ADMIN_KEY", "")
    assert parse_args([]).admin_key is None


@pytest.mark.parametrize(
    "overrides, name",
    [
        ({"max_request_bytes": 0}, "max_request_bytes"),
        ({"body_read_timeout_s": -1}, "body_read_timeout_s"),
        ({"tenant_queue_share": 1.5}, "tenant_queue_share"),
        ({"max_concurrent_uploads": 1, "max_concurrent_uploads_per_tenant": 2}, "max_concurrent_uploads_per_tenant"),
    ],
)
def test_bad_limits_name_the_setting(overrides, name):
    with pytest.raises(ValueError, match=name):
        Limits(**overrides)


def test_the_admin_key_must_differ_from_tenant_keys():
    with pytest.raises(ValueError, match="admin_key"):
        ServerConfig(api_keys=(("alice", "sk-same"),), admin_key="sk-same")


def test_tenant_capacity_is_a_share_of_the_queue_and_at_least_one():
    assert Limits(tenant_queue_share=0.5).tenant_capacity(96) == 48
    assert Limits(tenant_queue_share=0.01).tenant_capacity(10) == 1


def test_build_store_passes_the_quotas_the_store_accepts(tmp_path):
    store = build_store(ServerConfig(store=tmp_path / "store"))
    assert store.root == tmp_path / "store"
