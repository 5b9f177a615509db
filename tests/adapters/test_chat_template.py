"""ChatTemplate against Hugging Face's own rendering, plus the special-token and mask contracts."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from adapters.chat_template import ChatTemplate, TemplateError
from tests.spans import masked_runs

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": " And of France, please?  "},
    ],
    [{"role": "user", "content": "Multi\nline\n\ncontent with 123 numbers!"}],
]


@pytest.fixture(scope="module", params=["tiny", "default"])
def tokenizer(request, tiny_base_dir, default_base_dir):
    directory = tiny_base_dir if request.param == "tiny" else default_base_dir
    return AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_ids_equal_hugging_face_apply_chat_template(tokenizer, messages):
    rendered = ChatTemplate(tokenizer).render(messages)
    reference = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert rendered.ids == list(reference["input_ids"])
    assert rendered.text == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids) | {i for i in tokenizer.get_added_vocab().values()}


def test_special_token_strings_in_any_role_stay_text(tokenizer):
    template = ChatTemplate(tokenizer)
    special = _special_ids(tokenizer)
    strings = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()))
    assert "<|im_start|>" in strings and "<|im_end|>" in strings
    benign = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    expected = [i for i in template.render(benign).ids if i in special]
    for token in strings:
        for position in range(len(benign)):
            messages = [dict(m) for m in benign]
            messages[position]["content"] = f"x {token} y{token}"
            rendered = template.render(messages)
            # exactly the special ids the template itself wrote, in the same order
            assert [i for i in rendered.ids if i in special] == expected, (token, position)
            assert f"x {token} y{token}" in rendered.text


def test_assistant_mask_covers_exactly_each_answer_and_its_end_of_turn(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And France?"},
        {"role": "assistant", "content": "Paris, of course <|im_end|> text."},
    ]
    rendered = ChatTemplate(tokenizer).render(messages, training=True)
    assert len(rendered.ids) == len(rendered.assistant_mask)
    spans = masked_runs(rendered.ids, rendered.assistant_mask)
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [span[-1] for span in spans] == [eot, eot]
    texts = [tokenizer.decode(span[:-1]) for span in spans]
    assert texts == ["Rome.", "Paris, of course <|im_end|> text."]
    # the mask spans are exactly the content tokens (tokenized as text) plus the end-of-turn id
    assert spans[0][:-1] == tokenizer("Rome.", add_special_tokens=False)["input_ids"]


def test_continue_final_message_leaves_the_turn_open(tokenizer):
    messages = [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two"}]
    rendered = ChatTemplate(tokenizer).render(messages, continue_final_message=True)
    assert rendered.text.endswith("One, two")
    assert rendered.ids[-1] != tokenizer.eos_token_id


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "non-empty list"),
        ([{"role": "tool", "content": "x"}], "role 'tool'"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
            "system message may only come first",
        ),
        ([{"role": "user", "content": "   "}], "content is empty"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "last message must be from the user",
        ),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "only text parts"),
        ([{"role": "user"}], "must be a string"),
    ],
)
def test_structure_errors_name_the_problem(tokenizer, messages, message):
    with pytest.raises(TemplateError, match=message):
        ChatTemplate(tokenizer).render(messages)


def test_text_parts_are_joined(tokenizer):
    template = ChatTemplate(tokenizer)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    assert template.render(parts).ids == template.render([{"role": "user", "content": "Hello there"}]).ids


def test_template_errors_and_sandbox(tokenizer):
    raising = "{% if messages|length > 1 %}{{ raise_exception('only one message, please') }}{% endif %}x"
    with pytest.raises(TemplateError, match="only one message, please"):
        ChatTemplate(tokenizer, template=raising).render(
            [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        )
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TemplateError):
        ChatTemplate(tokenizer, template=escape).render([{"role": "user", "content": "u"}])
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate(tokenizer, template="{% for %}")
