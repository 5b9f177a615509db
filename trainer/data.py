"""Training data: JSONL conversations -> token ids + a loss mask, through the served chat template.

Each line is `{"messages": [...]}` (OpenAI chat format) or `{"prompt": str, "completion": str}`
(one user turn, one assistant turn). Conversations are rendered by
`adapters.chat_template.ChatTemplate` — the same code the server renders prompts with — and
its assistant mask (every assistant turn's content plus its end-of-turn token) becomes the loss
mask. Every bad line is reported with its number and what is wrong before any training starts.
Rows truncated to `max_length` that keep no supervised token are counted and dropped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from adapters.chat_template import ChatTemplate, TemplateError
from jobs.data_format import MAX_REPORTED_ERRORS, row_messages  # shared with the files API

__all__ = ["DataError", "Dataset", "Example", "encode_messages", "load_jsonl", "row_messages"]


class DataError(ValueError):
    """The training data cannot be used; the message lists the bad lines."""


@dataclass(frozen=True)
class Example:
    """One conversation: `ids` and, per id, whether it is a loss target (assistant-produced)."""

    ids: tuple[int, ...]
    mask: tuple[bool, ...]
    line: int

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_targets(self) -> int:
        # Position 0 has no preceding token to predict it from, so it never counts.
        return sum(self.mask[1:])


@dataclass(frozen=True)
class Dataset:
    """Encoded examples plus the bookkeeping the run reports."""

    examples: tuple[Example, ...]
    sha256: str
    lines: int
    dropped: int  # rows left with no supervised token after truncation
    truncated: int

    @property
    def num_tokens(self) -> int:
        return sum(len(e) for e in self.examples)

    @property
    def num_targets(self) -> int:
        return sum(e.num_targets for e in self.examples)

    @property
    def trained_share(self) -> float:
        """Share of kept tokens that carry loss."""
        return self.num_targets / self.num_tokens if self.examples else 0.0

    def summary(self, name: str) -> str:
        return (
            f"{name}: {len(self.examples)} conversations from {self.lines} lines, {self.num_tokens} tokens, "
            f"{self.trained_share:.1%} trained; {self.truncated} truncated, {self.dropped} dropped "
            f"(no assistant token left after truncation)"
        )


def encode_messages(template: ChatTemplate, messages: list, max_length: int, line: int = 0) -> tuple[Example, bool]:
    """Render one conversation; returns the (possibly truncated) example and whether it was cut."""
    rendered = template.render(messages, add_generation_prompt=False, training=True)
    cut = len(rendered.ids) > max_length
    return (
        Example(ids=tuple(rendered.ids[:max_length]), mask=tuple(rendered.assistant_mask[:max_length]), line=line),
        cut,
    )


def load_jsonl(path: Path | str, template: ChatTemplate, max_length: int) -> Dataset:
    """Read, validate and encode a JSONL file; raise DataError listing every bad line.

    Args:
        path: the JSONL file.
        template: the base's chat template (the server's rendering code).
        max_length: tokens kept per conversation; longer ones are cut from the right.
    """
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}")
    path = Path(path)
    raw = path.read_bytes()
    examples: list[Example] = []
    errors: list[str] = []
    dropped = truncated = lines = 0
    for number, text in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not text.strip():
            continue
        lines += 1
        try:
            example, cut = encode_messages(template, row_messages(json.loads(text)), max_length, number)
        except json.JSONDecodeError as exc:
            errors.append(f"line {number}: invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        except TemplateError as exc:
            errors.append(f"line {number}: {exc}")
            continue
        truncated += cut
        if example.num_targets == 0:
            dropped += 1
        else:
            examples.append(example)
    if errors:
        shown = errors[:MAX_REPORTED_ERRORS]
        more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise DataError(f"{path}: {len(errors)} bad line(s):\n  " + "\n  ".join(shown) + more)
    if not examples:
        raise DataError(f"{path}: no usable conversation ({lines} lines, {dropped} dropped after truncation)")
    return Dataset(
        examples=tuple(examples),
        sha256=hashlib.sha256(raw).hexdigest(),
        lines=lines,
        dropped=dropped,
        truncated=truncated,
    )
