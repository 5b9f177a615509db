"""Incremental detokenization and stop strings, one `IncrementalText` per sequence.

Each appended token yields the newly completed text: decoding a small window of recent tokens
(seeded with the prompt's tail so tokenizers that drop a leading space still decode words right)
and emitting only what grew, holding back an incomplete multi-byte character. With stop strings,
text that could still turn into one is held back until it cannot, and a match cuts the text just
before the stop string, so a client never sees any part of it.
"""

from __future__ import annotations

from collections.abc import Callable

_PROMPT_CONTEXT = 5  # prompt tokens decoded along, for context-dependent decoders


def fast_decode(tokenizer) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, straight to the Rust backend when that is
    the same thing (a fast tokenizer that does not clean up spaces): the Python wrapper costs more
    than the decode of a few ids, twice per token per sequence on the engine thread."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):

        def decode(ids: list[int]) -> str:
            return backend.decode(ids, skip_special_tokens=True)
    else:

        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)

    return decode


class IncrementalText:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self._decode = fast_decode(tokenizer)
        self.ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # all completion text so far (cut at a stop string)
        self.emitted = 0  # characters of `text` already returned

    def append(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        before = len(self.text)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.stop:
            start = max(0, before - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.read_offset = len(self.ids)  # nothing after the stop string is ever emitted
                return self.flush(), True
        safe = len(self.text) - self.hold
        if safe <= self.emitted:
            return "", False
        out = self.text[self.emitted : safe]
        self.emitted = safe
        return out, False

    def flush(self) -> str:
        """Everything not yet returned, including bytes that never completed a character."""
        if self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            self.text += self._decode(self.ids[self.prefix_offset :])[len(prefix) :]
            self.prefix_offset = self.read_offset = len(self.ids)
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out
