"""Chat-template rendering and validation: the one source of truth for server and trainer.

`ChatTemplate.render` turns OpenAI-style messages into token ids plus an assistant mask:

- The template runs in a sandboxed Jinja environment (`ImmutableSandboxedEnvironment`).
- Each message's content reaches the template as an unguessable placeholder. The rendered text
  is split at the placeholders: the template's own text is tokenized with special tokens
  recognised, each message's content with special tokens *split* (as plain text). So the
  special-token ids in a prompt are exactly those the template itself wrote, whatever users type.
- The assistant mask covers each assistant message's content tokens plus the template tokens
  that follow it up to and including the first end-of-turn token: what the model must produce.

It knows nothing of HTTP, engines or training loops.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from adapters import tool_messages
from adapters.errors import LoraswapError

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role (coding agents send it)


class TemplateError(LoraswapError, ValueError):
    """The messages do not fit the template's contract (or the template itself refused them)."""

    status, code = 400, "invalid_messages"

    def __init__(self, message: str, *, param: str | None = "messages"):
        super().__init__(message, param=param)


@dataclass(frozen=True)
class RenderedPrompt:
    """Token ids of a rendered conversation and, per id, whether the assistant produced it."""

    ids: list[int]
    assistant_mask: list[bool]
    text: str


class _GenerationTag(jinja2.ext.Extension):
    """Accept HF's `{% generation %}...{% endgeneration %}`; masks are computed from placeholders."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise TemplateError(str(message))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _sandbox() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env


def message_text(message: Any, index: int) -> str:
    """The text of a message's content: a string, or OpenAI's list of `{"type": "text"}` parts."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise TemplateError(f"messages[{index}].content: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise TemplateError(f"messages[{index}].content must be a string or a list of text parts")


def _mark_strings(value: Any, nonce: str, strings: list[str], risky: re.Pattern | None) -> Any:
    """`value` with every string (dict keys too) that holds a control-token string replaced by a
    placeholder (`strings` collects them); others stay as they are, so templates can still compare
    and index them (`call.function.name`, `tool.type == 'function'`)."""
    if isinstance(value, str):
        if risky is None or not risky.search(value):
            return value
        strings.append(value)
        return f"\ue000{nonce}:t{len(strings) - 1}\ue001"
    if isinstance(value, dict):
        return {
            _mark_strings(k, nonce, strings, risky): _mark_strings(v, nonce, strings, risky) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_mark_strings(v, nonce, strings, risky) for v in value]
    return value


def reads_tools(source: str, env: jinja2.Environment | None = None) -> bool:
    """Whether a template has tool support: HF's convention is that it reads a `tools` variable."""
    try:
        return "tools" in jinja2.meta.find_undeclared_variables((env or _sandbox()).parse(source))
    except jinja2.TemplateSyntaxError:
        return False


def _as_rendered(text: str, quoted: bool) -> str:
    """A client string as the template would have written it: JSON-escaped inside a JSON string
    (the placeholder sat between quotes, i.e. `tojson` wrote it), else as it is."""
    return json.dumps(text, ensure_ascii=False)[1:-1] if quoted else text


class ChatTemplate:
    """A tokenizer's chat template, rendered safely into ids and masks.

    Args:
        tokenizer: a Hugging Face tokenizer (fast) of the base.
        template: the Jinja source; defaults to `tokenizer.chat_template`.
        end_of_turn_ids: ids that close an assistant turn; defaults to the tokenizer's eos id.
    """

    def __init__(self, tokenizer, template: str | None = None, end_of_turn_ids: list[int] | None = None):
        source = template if template is not None else getattr(tokenizer, "chat_template", None)
        if not isinstance(source, str) or not source:
            raise TemplateError("the base tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.source = source
        self.sha256 = hashlib.sha256(source.encode("utf-8")).hexdigest()
        env = _sandbox()
        try:
            self._template = env.from_string(source)
            self.supports_tools = reads_tools(source, env)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"chat template does not compile: {exc}") from exc
        if end_of_turn_ids is None:
            end_of_turn_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.end_of_turn_ids = list(end_of_turn_ids)
        added = sorted(getattr(tokenizer, "get_added_vocab", dict)(), key=len, reverse=True)
        # Strings holding any added token's text would be read as control tokens in template text.
        self._risky = re.compile("|".join(map(re.escape, added))) if added else None
        self._special_names = {
            key: value for key, value in (tokenizer.special_tokens_map or {}).items() if isinstance(value, str)
        }

    # ---------------------------------------------------------------- validation

    def validate(self, messages: Any, *, continue_final_message: bool = False, training: bool = False) -> list[dict]:
        """Check message structure; return the messages normalised to `{"role", "content": str}`
        (plus `tool_calls` / `tool_call_id` for tool traffic).

        Inference (default): the last message is the user's (or a tool result's, on a template with
        tool support), or the assistant's with `continue_final_message`. Training: the last message
        is the assistant's, and tool traffic is not accepted (its calls would not be supervised).
        """
        if not isinstance(messages, list) or not messages:
            raise TemplateError("messages must be a non-empty list")
        with_tools = self.supports_tools and not training
        roles = ROLES + ("tool",) if with_tools else ROLES
        normalised = []
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise TemplateError(f"messages[{index}] must be an object with role and content")
            role = message.get("role")
            role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
            if not isinstance(role, str) or role not in roles:
                raise TemplateError(f"messages[{index}].role {role!r} is not one of {', '.join(roles)}, developer")
            if role == "system" and index != 0:
                raise TemplateError(f"messages[{index}]: a system message may only come first")
            normalised.append(self._normalise(message, index, role, with_tools))
        last = normalised[-1]["role"]
        if training:
            if last != "assistant":
                raise TemplateError("a training conversation must end with an assistant message")
        elif continue_final_message:
            if last != "assistant":
                raise TemplateError("continue_final_message needs the last message to be the assistant's")
        elif last != "user" and not (last == "tool" and with_tools):
            raise TemplateError("the last message must be from the user" + (" or a tool" if with_tools else ""))
        if continue_final_message and "tool_calls" in normalised[-1]:
            raise TemplateError("continue_final_message cannot continue an assistant message with tool_calls")
        return normalised

    def _normalise(self, message: dict, index: int, role: str, with_tools: bool) -> dict:
        where = f"messages[{index}]"
        if message.get("tool_calls") and not (with_tools and role == "assistant"):
            raise TemplateError(f"{where}.tool_calls: only assistant messages at inference, on a template with tools")
        if message.get("tool_calls"):
            calls = tool_messages.tool_calls(message["tool_calls"], where, TemplateError)
            content = message.get("content")
            text = "" if content is None else message_text(message, index)  # the calls may stand alone
            return {"role": role, "content": text, "tool_calls": calls}
        text = message_text(message, index)
        if role == "tool":  # a tool may return nothing
            return {
                "role": role,
                "content": text,
                "tool_call_id": tool_messages.tool_call_id(message, where, TemplateError),
            }
        if not text.strip():
            raise TemplateError(f"messages[{index}].content is empty")
        return {"role": role, "content": text}

    # ---------------------------------------------------------------- rendering

    def render(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        training: bool = False,
        tools: list[dict] | None = None,
    ) -> RenderedPrompt:
        """Validate, render and tokenize `messages`.

        Args:
            messages: OpenAI-style `[{"role", "content"}]`.
            add_generation_prompt: append the template's assistant header (inference).
            continue_final_message: leave the final assistant message open for continuation.
            training: validate as a training conversation (ends with the assistant).
            tools: OpenAI tool definitions for a template that renders `tools` (None: not passed).
                Every string in them (keys included) that holds a control token's text reaches the
                template as a placeholder and is tokenized as plain text, like message content.
        """
        messages = self.validate(messages, continue_final_message=continue_final_message, training=training)
        if continue_final_message or training:
            add_generation_prompt = False
        nonce = secrets.token_hex(8)
        marks = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
        tool_strings: list[str] = []
        placeholders = [self._placeholder(m, mark, nonce, tool_strings) for m, mark in zip(messages, marks)]
        extra: dict[str, Any] = {}
        if tools is not None:
            extra["tools"] = _mark_strings(tools, nonce, tool_strings, self._risky)
        try:
            text = self._template.render(
                messages=placeholders, add_generation_prompt=add_generation_prompt, **self._special_names, **extra
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template error: {exc}") from exc
        if continue_final_message:
            text = text[: text.rfind(marks[-1]) + len(marks[-1])]
        return self._tokenize(text, messages, nonce, tool_strings)

    def _placeholder(self, message: dict, mark: str, nonce: str, tool_strings: list[str]) -> dict:
        """What the template sees of a message: its content as `mark` (empty content stays empty, so
        `{% if message.content %}` still reads false), tool fields with risky strings marked."""
        out = {key: _mark_strings(value, nonce, tool_strings, self._risky) for key, value in message.items()}
        out.update(role=message["role"], content=mark if message["content"] else "")
        return out

    def _tokenize(self, text: str, messages: list[dict], nonce: str, tool_strings: list[str]) -> RenderedPrompt:
        pieces = re.split(f"\ue000{nonce}:(t?\\d+)\ue001", text)
        # pieces alternate: template text, message index (or "t" + tool string index), template text, ...
        if any(nonce in piece for piece in pieces[::2]):
            raise TemplateError("the chat template altered a placeholder of client text (e.g. escaped it)")
        ids: list[int] = []
        mask: list[bool] = []
        plain: list[str] = []
        open_turn = False  # inside an assistant turn, waiting for its end-of-turn token
        for position, piece in enumerate(pieces):
            if position % 2 == 1 and piece.startswith("t"):
                quoted = pieces[position - 1].endswith('"') and pieces[position + 1].startswith('"')
                tool_text = _as_rendered(tool_strings[int(piece[1:])], quoted)
                tool_ids = self._encode(tool_text, as_text=True)
                ids += tool_ids
                mask += [False] * len(tool_ids)
                plain.append(tool_text)
                continue
            if position % 2 == 1:
                message = messages[int(piece)]
                content_ids = self._encode(message["content"], as_text=True)
                is_assistant = message["role"] == "assistant"
                ids += content_ids
                mask += [is_assistant] * len(content_ids)
                plain.append(message["content"])
                open_turn = is_assistant
                continue
            template_ids = self._encode(piece, as_text=False)
            supervised = 0
            if open_turn:
                # The turn closes at the first end-of-turn token the template writes after the
                # content; if it writes none right there, only the content itself is supervised.
                ends = [i for i, token in enumerate(template_ids) if token in self.end_of_turn_ids]
                supervised = ends[0] + 1 if ends else 0
                open_turn = False
            ids += template_ids
            mask += [True] * supervised + [False] * (len(template_ids) - supervised)
            plain.append(piece)
        return RenderedPrompt(ids=ids, assistant_mask=mask, text="".join(plain))

    def _encode(self, text: str, *, as_text: bool) -> list[int]:
        if not text:
            return []
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]
