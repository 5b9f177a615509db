"""`loraswap.json`: typed fields, extra keys kept, absent means None, and the template contract."""

from __future__ import annotations

import json

import pytest

from adapters.base import BaseInfo, sha256_text
from adapters.errors import InvalidAdapter
from adapters.format import PROVENANCE_FILE, write_peft
from adapters.provenance import Provenance, read_provenance, write_provenance
from adapters.validate import check_template, validate_adapter_dir
from tests.adapters.helpers import make_weights

SHA_A, SHA_B = "a" * 64, "b" * 64


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return BaseInfo.from_dir(tiny_base_dir)


def test_absent_provenance_reads_as_none(tmp_path):
    assert read_provenance(tmp_path) is None


def test_round_trip_keeps_typed_fields_and_extra_keys(tmp_path):
    written = Provenance(
        base_fingerprint=SHA_A,
        chat_template_sha256=SHA_B,
        tokenizer_vocab_size=49152,
        training_data_sha256=SHA_A,
        hyperparameters={"rank": 8, "lr": 2e-4},
        metrics={"loss": [2.1, 1.3]},
        merge={"method": "ties", "inputs": ["a", "b"]},
        trainer="loraswap 0.1",
    )
    write_provenance(written, tmp_path)
    on_disk = json.loads((tmp_path / PROVENANCE_FILE).read_text())
    assert on_disk["trainer"] == "loraswap 0.1" and "merge" in on_disk
    again = read_provenance(tmp_path)
    assert again == written
    assert again.model_extra == {"trainer": "loraswap 0.1"}


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"base_fingerprint": "xyz"}, "base_fingerprint"),
        ({"chat_template_sha256": "A" * 64}, "chat_template_sha256"),  # digests are lower-case hex
        ({"tokenizer_vocab_size": -1}, "tokenizer_vocab_size"),
        ({"hyperparameters": [1, 2]}, "hyperparameters"),
        ({"format_version": 0}, "format_version"),
    ],
)
def test_typed_fields_are_checked(tmp_path, raw, field):
    (tmp_path / PROVENANCE_FILE).write_text(json.dumps(raw))
    with pytest.raises(InvalidAdapter) as caught:
        read_provenance(tmp_path)
    assert caught.value.code == "invalid_provenance" and f"'{field}'" in caught.value.message


def test_validated_adapter_carries_provenance_and_it_changes_the_sha(base, tmp_path):
    weights = make_weights(base, seed=5)
    plain = validate_adapter_dir(write_peft(weights, tmp_path / "plain"), base)
    with_prov = validate_adapter_dir(
        write_peft(weights, tmp_path / "prov", provenance={"chat_template_sha256": base.template_sha256}), base
    )
    assert plain.provenance is None
    assert with_prov.provenance.chat_template_sha256 == base.template_sha256
    assert plain.sha256 != with_prov.sha256
    # README.md is documentation, not content: it does not change the id.
    (tmp_path / "plain" / "README.md").write_text("# my adapter")
    assert validate_adapter_dir(tmp_path / "plain", base).sha256 == plain.sha256


def test_check_template_refuses_another_template_and_names_it(base):
    other = sha256_text("{{ messages }}")
    with pytest.raises(InvalidAdapter) as caught:
        check_template(Provenance(chat_template_sha256=other), base, allow_mismatch=False)
    error = caught.value
    assert (error.code, error.status) == ("template_mismatch", 422)
    assert other in error.message and base.template_sha256 in error.message


def test_check_template_passes_matching_missing_or_allowed(base):
    check_template(Provenance(chat_template_sha256=base.template_sha256), base)
    check_template(None, base)
    check_template(Provenance(), base)
    check_template(Provenance(chat_template_sha256=SHA_A), base, allow_mismatch=True)
