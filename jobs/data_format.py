"""The conversation format of training files, checked the same way by the API and the trainer.

A JSONL line is `{"messages": [...]}` (OpenAI chat format) or `{"prompt": str, "completion": str}`.
`row_messages` turns a parsed line into messages; `render_line` parses and renders one line with
the base's chat template (the server's renderer), which is the trainer's own check, so a file
the files API accepts is one the trainer can read. Imports no FastAPI and no training code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from adapters.chat_template import ChatTemplate, RenderedPrompt, TemplateError

MAX_REPORTED_ERRORS = 20


def row_messages(row: object) -> list:
    """The messages of a parsed JSONL row, or a TemplateError saying what is wrong with it."""
    if not isinstance(row, dict):
        raise TemplateError(f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        return row["messages"]
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        for key, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                raise TemplateError(f"{key!r} must be a string, got {type(value).__name__}")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    raise TemplateError('expected "messages" or "prompt" + "completion"')


def render_line(template: ChatTemplate, text: str, number: int) -> RenderedPrompt:
    """Parse and render line `number`; TemplateError names the line and what is wrong."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"line {number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise TemplateError(f"line {number}: JSON nested too deeply") from None
    try:
        return template.render(row_messages(row), add_generation_prompt=False, training=True)
    except TemplateError as exc:
        raise TemplateError(f"line {number}: {exc}") from None


def format_errors(errors: list[str]) -> str:
    """The first bad lines, one per line, and how many more there are."""
    shown = errors[:MAX_REPORTED_ERRORS]
    more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
    return f"{len(errors)} bad line(s):\n  " + "\n  ".join(shown) + more


@dataclass(frozen=True)
class FileCheck:
    """What checking a whole training file found."""

    lines: int  # non-blank lines
    trainable: int  # lines with at least one assistant token
    errors: tuple[str, ...]


def check_jsonl(raw: bytes, template: ChatTemplate, max_lines: int) -> FileCheck:
    """Check every line of a training file; `errors` lists every bad line (`format_errors` shows the first)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return FileCheck(0, 0, (f"the file is not UTF-8 (byte {exc.start})",))
    errors: list[str] = []
    lines = trainable = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        lines += 1
        if lines > max_lines:
            return FileCheck(lines, trainable, (f"the file has more than {max_lines} lines",))
        try:
            rendered = render_line(template, line, number)
        except TemplateError as exc:
            errors.append(str(exc)[:300])  # bounded: the file is, and so is each message
            continue
        trainable += any(rendered.assistant_mask[1:])
    if not errors and trainable == 0:
        errors.append("no line holds an assistant turn to train on")
    return FileCheck(lines, trainable, tuple(errors))
