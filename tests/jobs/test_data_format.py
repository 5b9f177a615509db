"""The training-file checks the files API runs are the trainer's own: same verdicts, same line numbers."""

from __future__ import annotations

import json

import pytest

from adapters.chat_template import ChatTemplate
from jobs.data_format import check_jsonl
from trainer.data import DataError, load_jsonl

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


@pytest.fixture(scope="module")
def template(tiny_base_dir):
    from transformers import AutoTokenizer

    return ChatTemplate(AutoTokenizer.from_pretrained(tiny_base_dir))


def test_good_file_passes_both(template, tmp_path):
    lines = [json.dumps(GOOD), "", json.dumps({"prompt": "a", "completion": "b"})]
    raw = "\n".join(lines).encode()
    check = check_jsonl(raw, template, 100)
    assert check.errors == () and check.lines == 2 and check.trainable == 2
    (tmp_path / "d.jsonl").write_bytes(raw)
    assert len(load_jsonl(tmp_path / "d.jsonl", template, 256).examples) == 2


def test_bad_lines_are_named_like_the_trainer_names_them(template, tmp_path):
    lines = [
        json.dumps(GOOD),
        "{not json",
        json.dumps({"prompt": 3, "completion": "x"}),
        json.dumps([1]),
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
    ]
    raw = "\n".join(lines).encode()
    check = check_jsonl(raw, template, 100)
    assert [e.split(":")[0] for e in check.errors] == ["line 2", "line 3", "line 4", "line 5"]
    (tmp_path / "d.jsonl").write_bytes(raw)
    with pytest.raises(DataError) as info:
        load_jsonl(tmp_path / "d.jsonl", template, 256)
    for error in check.errors:  # the trainer reports the same problems on the same lines
        assert error in str(info.value)


def test_caps_and_encodings(template):
    assert "not UTF-8" in check_jsonl(b"\xff\xfe", template, 10).errors[0]
    assert "more than 2 lines" in check_jsonl(b"{}\n{}\n{}\n", template, 2).errors[0]
    no_assistant = json.dumps({"messages": [{"role": "user", "content": "Hi"}]}).encode()
    assert "assistant" in check_jsonl(no_assistant, template, 10).errors[0]
