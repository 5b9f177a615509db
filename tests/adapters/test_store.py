"""The store: names, tenants, idempotent publish, versions, delete, cleanup, default location."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from adapters.base import BaseInfo
from adapters.errors import AdapterNotFound, InvalidName
from adapters.format import read_peft, write_peft
from adapters.store import AdapterStore, default_store_root
from adapters.validate import validate_adapter_dir
from tests.adapters.helpers import make_weights, snapshot


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return BaseInfo.from_dir(tiny_base_dir)


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """Three validated adapters with different content."""
    root = tmp_path_factory.mktemp("adapters")
    return [
        validate_adapter_dir(write_peft(make_weights(base, rank=r, seed=s), root / f"a{s}"), base)
        for r, s in ((4, 1), (2, 2), (8, 3))
    ]


@pytest.fixture
def store(tmp_path):
    return AdapterStore(tmp_path / "store")


def test_publish_get_and_the_stored_files_are_the_same_adapter(store, adapters, base):
    record, created = store.publish("acme", "support-bot", adapters[0])
    assert created and record.version == 1 and record.name == "support-bot" and record.tenant == "acme"
    assert record.id == adapters[0].sha256[:16] and record.sha256 == adapters[0].sha256
    assert record.rank == 4 and record.target_modules == ("down_proj", "q_proj", "v_proj")
    assert record.template_sha256 is None
    assert store.get("acme", "support-bot") == record
    stored = store.adapter_dir(record)
    assert sorted(p.name for p in stored.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert validate_adapter_dir(stored, base).sha256 == record.sha256
    loaded = read_peft(stored)
    for path, module in adapters[0].weights.modules.items():
        assert torch.equal(loaded.modules[path].A, module.A) and torch.equal(loaded.modules[path].B, module.B)


def test_same_content_is_idempotent_different_content_is_a_new_version(store, adapters):
    first, _ = store.publish("acme", "bot", adapters[0])
    before = snapshot(store.root)
    again, created = store.publish("acme", "bot", adapters[0])
    assert (again, created) == (first, False)
    assert snapshot(store.root) == before
    second, created = store.publish("acme", "bot", adapters[1])
    assert created and second.version == 2 and second.sha256 == adapters[1].sha256
    assert store.get("acme", "bot") == second
    assert store.get("acme", "bot", version=1) == first
    assert [r.version for r in store.versions("acme", "bot")] == [1, 2]
    # Going back to old content is a new version too; the blob is stored once.
    third, created = store.publish("acme", "bot", adapters[0])
    assert created and third.version == 3 and third.id == first.id
    assert len(list((store.root / "blobs").iterdir())) == 2


def test_publish_accepts_the_validated_directory(store, adapters, base, tmp_path):
    directory = write_peft(adapters[2].weights, tmp_path / "upload")
    record, created = store.publish("acme", "from-dir", directory)
    assert created and record.sha256 == validate_adapter_dir(directory, base).sha256 == adapters[2].sha256


def test_tenants_are_separate_and_foreign_names_look_missing(store, adapters):
    store.publish("acme", "bot", adapters[0])
    store.publish("globex", "bot", adapters[1])
    assert store.get("acme", "bot").sha256 == adapters[0].sha256
    assert store.get("globex", "bot").sha256 == adapters[1].sha256
    store.publish("acme", "secret", adapters[2])
    with pytest.raises(AdapterNotFound) as foreign:
        store.get("globex", "secret")
    with pytest.raises(AdapterNotFound) as missing:
        store.get("globex", "never-existed")

    # Identical answers up to the name the caller typed: nothing says "exists elsewhere".
    def answer(error, name):
        return error.status, repr(error.envelope()).replace(name, "<name>")

    assert answer(foreign.value, "secret") == answer(missing.value, "never-existed")
    assert foreign.value.status == 404
    assert [r.name for r in store.list("acme")] == ["bot", "secret"]
    assert [r.name for r in store.list("globex")] == ["bot"]
    assert store.list("initech") == []
    with pytest.raises(AdapterNotFound):
        store.delete("globex", "secret")
    assert store.get("acme", "secret").sha256 == adapters[2].sha256


@pytest.mark.parametrize(
    "name",
    ["", ".hidden", "..", "a/b", "name\n", "a\\b", "x" * 65, "sp ace", "naïve", "a\x00b", "../etc"],
)
def test_invalid_names_are_refused_everywhere(store, adapters, name):
    for call in (
        lambda: store.publish("acme", name, adapters[0]),
        lambda: store.get("acme", name),
        lambda: store.delete("acme", name),
        lambda: store.publish(name, "ok", adapters[0]),
        lambda: store.list(name),
    ):
        with pytest.raises(InvalidName) as caught:
            call()
        assert caught.value.code == "invalid_name" and caught.value.status == 400
    assert snapshot(store.root) == {"blobs": "dir", "holds": "dir", "tenants": "dir", "tmp": "dir"}


@pytest.mark.parametrize("name", ["a", "x" * 64, "Model_v1.2-final", "-dash", "_under", "3"])
def test_valid_names(store, adapters, name):
    assert store.publish("acme", name, adapters[0])[0].name == name


def test_delete_removes_the_name_and_unshared_blobs_only(store, adapters):
    store.publish("acme", "bot", adapters[0])
    store.publish("acme", "bot", adapters[1])
    store.publish("globex", "twin", adapters[1])  # same content as acme/bot v2
    deleted = store.delete("acme", "bot")
    assert deleted.version == 2
    with pytest.raises(AdapterNotFound):
        store.get("acme", "bot")
    assert {p.name for p in (store.root / "blobs").iterdir()} == {adapters[1].sha256}
    assert store.get("globex", "twin").sha256 == adapters[1].sha256
    assert list((store.root / "tmp").iterdir()) == []


def test_startup_cleans_leftovers(tmp_path, adapters):
    store = AdapterStore(tmp_path / "store")
    kept, _ = store.publish("acme", "bot", adapters[0])
    (store.root / "tmp" / "stage-dead").mkdir()
    (store.root / "tmp" / "stage-dead" / "adapter_config.json").write_text("{")
    (store.root / "tmp" / "pointer-dead.json").write_text("{")
    orphan = store.root / "blobs" / adapters[1].sha256
    orphan.mkdir()
    (orphan / "adapter_model.safetensors").write_bytes(b"half")
    fresh = AdapterStore(tmp_path / "store")
    assert list((fresh.root / "tmp").iterdir()) == []
    assert [p.name for p in (fresh.root / "blobs").iterdir()] == [kept.sha256]
    assert fresh.get("acme", "bot") == kept


def test_concurrent_publishes_of_one_name_make_distinct_versions(store, adapters):
    results = []
    threads = [threading.Thread(target=lambda a=a: results.append(store.publish("acme", "race", a))) for a in adapters]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(created for _, created in results)
    assert sorted(r.version for r, _ in results) == [1, 2, 3]
    assert len(store.versions("acme", "race")) == 3


def test_publish_refuses_a_value_whose_sha_does_not_match(store, adapters):
    import dataclasses

    forged = dataclasses.replace(adapters[0], sha256=adapters[1].sha256)
    with pytest.raises(ValueError):
        store.publish("acme", "bot", forged)
    assert store.list("acme") == []


def test_default_location_is_outside_the_repo(monkeypatch, tmp_path):
    monkeypatch.setenv("LORASWAP_STORE", str(tmp_path / "custom"))
    assert default_store_root() == tmp_path / "custom"
    monkeypatch.delenv("LORASWAP_STORE")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_store_root() == tmp_path / "data" / "loraswap" / "store"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_store_root() == tmp_path / "home" / ".local" / "share" / "loraswap" / "store"
    repo = Path(__file__).resolve().parents[2]
    assert repo not in default_store_root().resolve().parents
