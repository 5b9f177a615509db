"""Training data: the loss mask is exactly the assistant spans of the served template's rendering."""

from __future__ import annotations

import json

import pytest

from adapters.chat_template import ChatTemplate
from trainer.data import DataError, encode_messages, load_jsonl
from tests.spans import masked_runs

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hello! How can I help you today?"},
    {"role": "user", "content": "Capital of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_base_dir))


@pytest.fixture(scope="module")
def template(tokenizer):
    return ChatTemplate(tokenizer)


def supervised_runs(tokenizer, example) -> list[str]:
    """Decode each maximal run of masked tokens: what the loss trains the model to write."""
    runs = masked_runs(example.ids, example.mask)
    return [tokenizer.decode(run) for run in runs]


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_multi_turn_mask_is_every_assistant_turn_with_its_end_token(tokenizer, template):
    example, cut = encode_messages(template, CONVERSATION, max_length=1024)
    assert not cut
    # the rendered ids are HF's own rendering of the same conversation
    reference = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(list(example.ids)) == reference
    assert supervised_runs(tokenizer, example) == [
        "Hello! How can I help you today?<|im_end|>",
        "Rome.<|im_end|>",
    ]
    assert example.num_targets == sum(example.mask)


def test_default_system_prompt_is_never_trained(tokenizer, template):
    messages = CONVERSATION[1:]  # the template inserts its own system prompt
    example, _ = encode_messages(template, messages, max_length=1024)
    assert "You are a helpful AI assistant." in tokenizer.decode(list(example.ids))
    assert supervised_runs(tokenizer, example) == ["Hello! How can I help you today?<|im_end|>", "Rome.<|im_end|>"]


def test_prompt_completion_rows_and_reported_share(tmp_path, tokenizer, template):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "Capital of France?", "completion": "Paris."},
            {"messages": CONVERSATION},
        ],
    )
    data = load_jsonl(path, template, max_length=1024)
    assert len(data.examples) == 2 and data.dropped == 0 and data.truncated == 0
    assert supervised_runs(tokenizer, data.examples[0]) == ["Paris.<|im_end|>"]
    assert [e.line for e in data.examples] == [1, 2]
    masked = sum(sum(e.mask) for e in data.examples)
    assert data.num_targets == masked
    assert data.trained_share == pytest.approx(masked / sum(len(e) for e in data.examples))


def test_truncation_keeps_the_prefix_and_drops_rows_with_nothing_to_learn(tmp_path, tokenizer, template):
    full, _ = encode_messages(template, CONVERSATION, max_length=1024)
    first_target = full.mask.index(True)
    # cut inside the first assistant answer: kept, with a prefix of its mask
    keep_len = first_target + 3
    cut_example, cut = encode_messages(template, CONVERSATION, max_length=keep_len)
    assert cut and cut_example.ids == full.ids[:keep_len] and cut_example.mask == full.mask[:keep_len]
    assert cut_example.num_targets == 3
    # cut before any assistant token: counted and dropped
    long_system = [{"role": "system", "content": "You are a careful and polite assistant. " * 4}] + CONVERSATION[1:]
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"messages": long_system},
            {"prompt": "Hi", "completion": "Hello."},
        ],
    )
    short, _ = encode_messages(
        template, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], 1024
    )
    max_length = short.mask.index(True) + 2
    long_example, _ = encode_messages(template, long_system, 1024)
    assert long_example.mask.index(True) >= max_length  # the long one loses all its assistant tokens
    data = load_jsonl(path, template, max_length=max_length)
    assert data.dropped == 1 and data.truncated == 2
    assert [e.line for e in data.examples] == [2]
    assert data.examples[0].num_targets == 2


def test_bad_lines_are_reported_with_numbers_and_reasons(tmp_path, template):
    good = {"prompt": "a", "completion": "b"}
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            good,
            '{"messages": [',
            {"text": "no messages"},
            good,
            {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "hi"}]},
            "",
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
            {"prompt": "a", "completion": 3},
            "[1, 2]",
        ],
    )
    with pytest.raises(DataError) as info:
        load_jsonl(path, template, max_length=64)
    message = str(info.value)
    assert "7 bad line(s)" in message
    for expected in (
        "line 2: invalid JSON",
        'line 3: expected "messages" or "prompt" + "completion"',
        "line 5: messages[0].role 'bot'",
        "line 6: a training conversation must end with an assistant message",
        "line 8: messages[1].content is empty",
        "line 9: 'completion' must be a string",
        "line 10: expected a JSON object",
    ):
        assert expected in message
    assert "line 1:" not in message and "line 4:" not in message and "line 7:" not in message
