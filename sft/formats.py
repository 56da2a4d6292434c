"""Dataset rows of common instruction formats -> one conversation form.

A conversation is a list of messages: an optional leading system message, then user and assistant
turns that alternate, starting with user and ending with assistant. An assistant turn may call tools;
the tool results follow it as tool messages, and the assistant speaks again after them. Every format is
converted to that one shape so the chat template and loss masking downstream handle one case.

The messages, as validation returns them (the keys follow transformers' chat-templating conventions;
an optional key is present only when it has a value, so a template can test `'tool_calls' in message`):

    {"role": "system" | "user", "content": str}
    {"role": "assistant", "content": str,                   # "" when the turn only reasons or calls
     "reasoning_content": str,                              # optional
     "tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict}, "id": str}]}
    {"role": "tool", "content": str, "name": str, "tool_call_id": str}  # name and id optional

Reasoning is read from a `reasoning_content`, `reasoning` or `thinking` key, or from a leading
`<think>...</think>` block in an assistant's content. A conversation also carries the tools it may call
(`tools`, a list of function schemas, or None).

A row that cannot be converted is rejected with a short, stable reason key (MalformedRow.reason),
so a run can report how many rows it dropped and why, instead of crashing on one bad row deep into
a large dataset or quietly training on a garbled conversation. Message keys outside the ones above
are not trained on; `row_to_conversation` names them, so a run can say which it ignored.

Format detection looks at column names only. Two formats share columns: dolphin and alpaca both
use instruction/input/output, and mean different things by `instruction` (a system prompt in
dolphin, the task in alpaca). Detection guesses dolphin only when the columns are exactly those
three (and at most a reasoning column); when the guess is wrong, name the format in the config
instead of "auto".
"""

import json
import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

from .errors import ConfigError, DataError

FORMATS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "dolphin": ("instruction", "input", "output"),
    "alpaca": ("instruction", "output"),
    "guanaco": ("text",),
}

# Every reason a row can be rejected for; the keys end up in run logs, so they do not change.
REJECT_REASONS = (
    "missing_field",  # a required column or message key is absent
    "wrong_type",  # a value is None, or not the str/list/dict expected
    "empty_content",  # a message would be empty or whitespace only
    "unknown_role",  # a role (or sharegpt `from`) outside the accepted set
    "system_not_first",  # a system message after the first position
    "not_starting_with_user",  # the first turn after any system message is not the user's
    "turns_not_alternating",  # two user or two assistant turns in a row, or a user turn right after tool results
    "no_assistant_turn",  # the conversation does not end with an assistant reply
    "reasoning_twice",  # one assistant turn gives its reasoning twice: in two keys, or in a key and in <think> tags
    "bad_tool_call",  # a tool call without a name, or whose arguments are not a JSON object
    "tool_without_call",  # a tool result that does not follow an assistant turn with tool calls
    "call_without_result",  # an assistant turn with tool calls followed by something other than tool results
    "bad_tools",  # the row's tools are not a list of function schemas (each an object with a name)
)

ROLES = ("system", "user", "assistant", "tool")
# Where datasets keep an assistant turn's reasoning; normalized to the first.
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
_KEYS = {
    "system": {"role", "content"},
    "user": {"role", "content"},
    "assistant": {"role", "content", "tool_calls", *REASONING_KEYS},
    "tool": {"role", "content", "name", "tool_call_id"},
}
_SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "observation": "tool", "tool": "tool",
}
_SHAREGPT_CALL = "function_call"
_SHAREGPT_KEYS = {"from", "value", *REASONING_KEYS}
_GUANACO_MARKER = re.compile(r"###\s*(human|assistant)\s*:", re.IGNORECASE)
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


class MalformedRow(Exception):
    """A row that cannot become a conversation; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str):
        assert reason in REJECT_REASONS, reason
        super().__init__(reason)
        self.reason = reason


class Conversation(NamedTuple):
    """A converted row: its messages, the tools they may call, and the message keys left out of them."""

    messages: list[dict]
    tools: list[dict] | None
    ignored: tuple[str, ...]  # sorted key names, e.g. ("weight",)


def _get(mapping, key: str, type_: type):
    if not isinstance(mapping, dict):
        raise MalformedRow("wrong_type")
    if key not in mapping:
        raise MalformedRow("missing_field")
    if not isinstance(mapping[key], type_):
        raise MalformedRow("wrong_type")
    return mapping[key]


def _optional_str(mapping: dict, key: str) -> str | None:
    """A key that may be absent or None (datasets fills the keys some rows lack with None); blank counts as absent."""
    value = mapping.get(key)
    if value is not None and not isinstance(value, str):
        raise MalformedRow("wrong_type")
    return value if value and value.strip() else None


def split_inline_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a reply that opens with a <think> block; (None, text) when it does not.

    >>> split_inline_reasoning("<think>\\n2 and 2 make 4.\\n</think>\\n\\nIt is 4.")
    ('2 and 2 make 4.', 'It is 4.')
    >>> split_inline_reasoning("<think></think>It is 4.")  # an empty block: no reasoning, but tags were there
    ('', 'It is 4.')
    >>> split_inline_reasoning("It is 4. <think>later</think>")
    (None, 'It is 4. <think>later</think>')
    """
    body = text.lstrip()
    if not body.startswith(_THINK_OPEN) or _THINK_CLOSE not in body:
        return None, text
    reasoning, _, answer = body[len(_THINK_OPEN):].partition(_THINK_CLOSE)
    return reasoning.strip("\n"), answer.lstrip()


def parse_arguments(value) -> dict:
    """A tool call's arguments, given as an object or as JSON text of one.

    >>> parse_arguments('{"city": "Paris", "days": 2}') == parse_arguments({"city": "Paris", "days": 2})
    True
    >>> parse_arguments('["Paris"]')
    Traceback (most recent call last):
    sft.formats.MalformedRow: bad_tool_call
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise MalformedRow("bad_tool_call") from None
    if not isinstance(value, dict):
        raise MalformedRow("bad_tool_call")
    return dict(value)


def _tool_call(call) -> dict:
    """OpenAI's {"type": "function", "function": {"name", "arguments"}, "id"}, or the flat {"name", "arguments"}."""
    if not isinstance(call, dict):
        raise MalformedRow("bad_tool_call")
    function = call if call.get("function") is None else call["function"]
    if not isinstance(function, dict) or call.get("type") not in (None, "function"):
        raise MalformedRow("bad_tool_call")
    name, call_id = function.get("name"), call.get("id")
    if not isinstance(name, str) or not name.strip() or not isinstance(call_id, (str, type(None))):
        raise MalformedRow("bad_tool_call")
    out = {"type": "function", "function": {"name": name, "arguments": parse_arguments(function.get("arguments"))}}
    return {**out, "id": call_id} if call_id else out


def _assistant(m: dict) -> dict:
    content = m.get("content")
    if content is not None and not isinstance(content, str):
        raise MalformedRow("wrong_type")
    given = [r for r in (_optional_str(m, k) for k in REASONING_KEYS) if r is not None]
    if len(given) > 1:
        raise MalformedRow("reasoning_twice")
    reasoning = given[0] if given else None
    inline, answer = split_inline_reasoning(content or "")
    if inline is not None:
        if reasoning is not None or split_inline_reasoning(answer)[0] is not None:
            raise MalformedRow("reasoning_twice")
        reasoning, content = inline if inline.strip() else None, answer
    calls = m.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        raise MalformedRow("wrong_type")
    calls = [_tool_call(c) for c in calls or ()]
    if reasoning is None and not calls:  # a plain reply: the rules every format had before reasoning and tools
        if content is None:
            raise MalformedRow("missing_field" if "content" not in m else "wrong_type")
        if not content.strip():
            raise MalformedRow("empty_content")
    out = {"role": "assistant", "content": content if content and content.strip() else ""}
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    if calls:
        out["tool_calls"] = calls
    return out


def _message(m) -> tuple[dict, set[str]]:
    """One message normalized, and the keys of it that were left out (those holding a value)."""
    role = _get(m, "role", str)
    if role == "assistant":
        out = _assistant(m)
    else:
        content = _get(m, "content", str)
        if role not in ROLES:
            raise MalformedRow("unknown_role")
        if not content.strip():
            raise MalformedRow("empty_content")
        out = {"role": role, "content": content}
        for key in ("name", "tool_call_id") if role == "tool" else ():
            if (value := _optional_str(m, key)) is not None:
                out[key] = value
    return out, {k for k, v in m.items() if v is not None and k not in _KEYS[role]}


def _check_order(messages: list[dict]) -> None:
    turns = messages[1:] if messages[:1] and messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in turns):
        raise MalformedRow("system_not_first")
    if turns and turns[0]["role"] != "user":
        raise MalformedRow("not_starting_with_user")
    for before, m in zip(turns, turns[1:]):
        if m["role"] == "tool":
            if "tool_calls" not in before and before["role"] != "tool":
                raise MalformedRow("tool_without_call")
        elif "tool_calls" in before:
            raise MalformedRow("call_without_result")
        elif before["role"] == m["role"] or (before["role"] == "tool" and m["role"] != "assistant"):
            raise MalformedRow("turns_not_alternating")
    # An assistant turn that ends with tool calls may end the conversation: agent data often stops at the call.
    if not turns or turns[-1]["role"] != "assistant":
        raise MalformedRow("no_assistant_turn")


def _validate(messages: list[dict]) -> tuple[list[dict], set[str]]:
    if not isinstance(messages, list):
        raise MalformedRow("wrong_type")
    normalized, ignored = [], set()
    for m in messages:
        out, left_out = _message(m)
        normalized.append(out)
        ignored |= left_out
    _check_order(normalized)
    return normalized, ignored


def validate_conversation(messages: list[dict]) -> list[dict]:
    """The one place the conversation rules live; returns the messages in the normalized form (a copy)."""
    return _validate(messages)[0]


def validate_tools(value) -> list[dict] | None:
    """A row's tools: a list of function schemas, or JSON text of one (LLaMA-Factory stores text); None for none.
    A bare schema is wrapped the way transformers' chat templates expect it.

    >>> validate_tools('[{"name": "now", "parameters": {}}]')
    [{'type': 'function', 'function': {'name': 'now', 'parameters': {}}}]
    >>> validate_tools("[]") is None
    True
    """
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise MalformedRow("bad_tools") from None
    if value is None:
        return None
    if not isinstance(value, list):
        raise MalformedRow("bad_tools")
    return [_tool_schema(t) for t in value] or None


def _tool_schema(tool) -> dict:
    if not isinstance(tool, dict) or tool.get("type") not in (None, "function"):
        raise MalformedRow("bad_tools")
    function = tool.get("function")
    if function is None:
        function, tool = tool, {"type": "function", "function": tool}
    elif tool.get("type") is None:
        tool = {**tool, "type": "function"}
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
        raise MalformedRow("bad_tools")
    return tool


def content_chars(messages: list[dict]) -> int:
    """The characters a normalized conversation holds: content, reasoning and the JSON of its tool calls.

    >>> content_chars([{"role": "user", "content": "Time?"},
    ...                {"role": "assistant", "content": "", "reasoning_content": "Ask the clock.",
    ...                 "tool_calls": [{"type": "function", "function": {"name": "now", "arguments": {}}}]}])
    51
    """
    return sum(len(m["content"]) + len(m.get("reasoning_content", ""))
               + sum(len(json.dumps(c["function"], ensure_ascii=False)) for c in m.get("tool_calls", ()))
               for m in messages)


def _messages(row: dict) -> Conversation:
    return Conversation(_get(row, "messages", list), row.get("tools"), ())


def _sharegpt_calls(value: str) -> list:
    """A function_call turn's value: JSON text of one {"name", "arguments"} or of a list of them."""
    try:
        calls = json.loads(value)
    except (ValueError, RecursionError):
        raise MalformedRow("bad_tool_call") from None
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls:
        raise MalformedRow("bad_tool_call")
    return calls


def _sharegpt(row: dict) -> Conversation:
    """LLaMA-Factory's sharegpt layout: `conversations` turns of human/gpt/function_call/observation (and
    system), with optional `system` and `tools` columns. A function_call turn right after a gpt turn is that
    turn's tool calls; otherwise it is an assistant turn of its own."""
    messages, ignored, after_reply = [], set(), False
    for t in _get(row, "conversations", list):
        source, value = _get(t, "from", str), _get(t, "value", str)
        ignored |= {k for k, v in t.items() if v is not None and k not in _SHAREGPT_KEYS}
        reasoning = {k: t[k] for k in REASONING_KEYS if t.get(k) is not None}
        if source == _SHAREGPT_CALL:
            calls = _sharegpt_calls(value)
            if after_reply:
                if any(messages[-1].get(k) is not None for k in reasoning):
                    raise MalformedRow("reasoning_twice")
                messages[-1] = {**messages[-1], **reasoning, "tool_calls": calls}
            else:
                messages.append({"role": "assistant", "content": "", **reasoning, "tool_calls": calls})
        elif source in _SHAREGPT_ROLES:
            messages.append({"role": _SHAREGPT_ROLES[source], "content": value, **reasoning})
        else:
            raise MalformedRow("unknown_role")
        after_reply = _SHAREGPT_ROLES.get(source) == "assistant"
    system = _optional_str(row, "system")
    head = [{"role": "system", "content": system}] if system is not None else []
    # A system turn as well as a system column gives two system messages: rejected as system_not_first.
    return Conversation(head + messages, row.get("tools"), tuple(ignored))


def _answer(row: dict, key: str) -> dict:
    """The reply of a single-answer format, with its reasoning column when the row has one."""
    return {"role": "assistant", "content": _get(row, key, str), **{k: row[k] for k in REASONING_KEYS if k in row}}


def _prompt_completion(row: dict) -> Conversation:
    return Conversation([{"role": "user", "content": _get(row, "prompt", str)}, _answer(row, "completion")], None, ())


def _dolphin(row: dict) -> Conversation:
    system, user = _get(row, "instruction", str), _get(row, "input", str)
    answer = _answer(row, "output")
    if not user.strip():  # no user turn: the instruction is the request itself, not a system prompt
        system, user = "", system
    head = [{"role": "system", "content": system}] if system.strip() else []
    return Conversation(head + [{"role": "user", "content": user}, answer], None, ())


def _alpaca(row: dict) -> Conversation:
    instruction, answer = _get(row, "instruction", str), _answer(row, "output")
    # `input` is optional; a JSON file where only some rows have it loads the others with None.
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise MalformedRow("wrong_type")
    if not instruction.strip():
        raise MalformedRow("empty_content")
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return Conversation([{"role": "user", "content": user}, answer], None, ())


def _guanaco(row: dict) -> Conversation:
    text = _get(row, "text", str)
    if not text.strip():
        raise MalformedRow("empty_content")
    before, *parts = _GUANACO_MARKER.split(text)  # [before, speaker, said, speaker, said, ...]
    if before.strip():
        raise MalformedRow("not_starting_with_user")
    # Whitespace around the markers is an artefact of the format, so here (only) content is stripped.
    return Conversation([
        {"role": "user" if speaker.lower() == "human" else "assistant", "content": said.strip()}
        for speaker, said in zip(parts[::2], parts[1::2])
    ], None, ())


# Each returns the row's messages and tools as found (validation normalizes them) and the turn keys it left out.
_CONVERTERS: dict[str, Callable[[dict], Conversation]] = {
    "messages": _messages,
    "sharegpt": _sharegpt,
    "prompt_completion": _prompt_completion,
    "dolphin": _dolphin,
    "alpaca": _alpaca,
    "guanaco": _guanaco,
}


def _check_format(fmt: str) -> None:
    if fmt not in _CONVERTERS:
        raise ConfigError(f"unknown dataset format {fmt!r}; known formats: {', '.join(FORMATS)} (or 'auto')")


def detect_format(columns: Iterable[str]) -> str:
    """Structured columns win over a bare `text` column: tatsu-lab/alpaca ships both."""
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "sharegpt"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if {"instruction", "output"} <= cols:
        answer_only = cols - set(REASONING_KEYS)
        return "dolphin" if answer_only == set(FORMATS["dolphin"]) and len(cols - answer_only) <= 1 else "alpaca"
    if "text" in cols:
        return "guanaco"
    expected = "; ".join(f"{name} ({', '.join(req)})" for name, req in FORMATS.items())
    raise DataError(
        f"cannot detect the dataset format from its columns {sorted(cols)}; "
        f"expected the columns of one of: {expected}"
    )


def row_to_conversation(row: dict, fmt: str) -> Conversation:
    """A row of format `fmt` as a validated conversation; raises MalformedRow."""
    _check_format(fmt)
    found = _CONVERTERS[fmt](row)
    messages, ignored = _validate(found.messages)
    return Conversation(messages, validate_tools(found.tools), tuple(sorted(ignored | set(found.ignored))))


def row_to_messages(row: dict, fmt: str) -> list[dict]:
    return row_to_conversation(row, fmt).messages
