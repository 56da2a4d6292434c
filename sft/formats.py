"""Dataset rows of common instruction formats -> one conversation form.

A conversation is a list of {"role", "content"} dicts: an optional leading system message, then
user and assistant turns that alternate, starting with user and ending with assistant. Every format
is converted to that one shape so the chat template and loss masking downstream handle one case.

A row that cannot be converted is rejected with a short, stable reason key (MalformedRow.reason),
so a run can report how many rows it dropped and why, instead of crashing on one bad row deep into
a large dataset or quietly training on a garbled conversation.

Format detection looks at column names only. Two formats share columns: dolphin and alpaca both
use instruction/input/output, and mean different things by `instruction` (a system prompt in
dolphin, the task in alpaca). Detection guesses dolphin only when the columns are exactly those
three; when the guess is wrong, name the format in the config instead of "auto".
"""

import re
from collections import Counter
from collections.abc import Callable, Iterable

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
    "turns_not_alternating",  # two user or two assistant turns in a row
    "no_assistant_turn",  # the conversation does not end with an assistant reply
)

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"
}
_GUANACO_MARKER = re.compile(r"###\s*(human|assistant)\s*:", re.IGNORECASE)


class MalformedRow(Exception):
    """A row that cannot become a conversation; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str):
        assert reason in REJECT_REASONS, reason
        super().__init__(reason)
        self.reason = reason


def _get(mapping, key: str, type_: type):
    if not isinstance(mapping, dict):
        raise MalformedRow("wrong_type")
    if key not in mapping:
        raise MalformedRow("missing_field")
    if not isinstance(mapping[key], type_):
        raise MalformedRow("wrong_type")
    return mapping[key]


def validate_conversation(messages: list[dict]) -> list[dict]:
    """The one place the conversation rules live; returns a copy with only role and content."""
    if not isinstance(messages, list):
        raise MalformedRow("wrong_type")
    for m in messages:
        role, content = _get(m, "role", str), _get(m, "content", str)
        if role not in ROLES:
            raise MalformedRow("unknown_role")
        if not content.strip():
            raise MalformedRow("empty_content")
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[:1] == ["system"] else roles
    if "system" in turns:
        raise MalformedRow("system_not_first")
    if turns and turns[0] != "user":
        raise MalformedRow("not_starting_with_user")
    if any(a == b for a, b in zip(turns, turns[1:])):
        raise MalformedRow("turns_not_alternating")
    if not turns or turns[-1] != "assistant":
        raise MalformedRow("no_assistant_turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _messages(row: dict) -> list:
    return _get(row, "messages", list)


def _sharegpt(row: dict) -> list:
    turns = []
    for t in _get(row, "conversations", list):
        source, value = _get(t, "from", str), _get(t, "value", str)
        if source not in _SHAREGPT_ROLES:
            raise MalformedRow("unknown_role")
        turns.append({"role": _SHAREGPT_ROLES[source], "content": value})
    return turns


def _prompt_completion(row: dict) -> list:
    return [
        {"role": "user", "content": _get(row, "prompt", str)},
        {"role": "assistant", "content": _get(row, "completion", str)},
    ]


def _dolphin(row: dict) -> list:
    system, user = _get(row, "instruction", str), _get(row, "input", str)
    answer = _get(row, "output", str)
    if not user.strip():  # no user turn: the instruction is the request itself, not a system prompt
        system, user = "", system
    head = [{"role": "system", "content": system}] if system.strip() else []
    return head + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _alpaca(row: dict) -> list:
    instruction, answer = _get(row, "instruction", str), _get(row, "output", str)
    # `input` is optional; a JSON file where only some rows have it loads the others with None.
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise MalformedRow("wrong_type")
    if not instruction.strip():
        raise MalformedRow("empty_content")
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _guanaco(row: dict) -> list:
    text = _get(row, "text", str)
    if not text.strip():
        raise MalformedRow("empty_content")
    before, *parts = _GUANACO_MARKER.split(text)  # [before, speaker, said, speaker, said, ...]
    if before.strip():
        raise MalformedRow("not_starting_with_user")
    # Whitespace around the markers is an artefact of the format, so here (only) content is stripped.
    return [
        {"role": "user" if speaker.lower() == "human" else "assistant", "content": said.strip()}
        for speaker, said in zip(parts[::2], parts[1::2])
    ]


_CONVERTERS: dict[str, Callable[[dict], list]] = {
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
        return "dolphin" if cols == set(FORMATS["dolphin"]) else "alpaca"
    if "text" in cols:
        return "guanaco"
    expected = "; ".join(f"{name} ({', '.join(req)})" for name, req in FORMATS.items())
    raise DataError(
        f"cannot detect the dataset format from its columns {sorted(cols)}; "
        f"expected the columns of one of: {expected}"
    )


def row_to_messages(row: dict, fmt: str) -> list[dict]:
    _check_format(fmt)
    return validate_conversation(_CONVERTERS[fmt](row))


def convert_rows(rows: Iterable[dict], fmt: str) -> tuple[list[list[dict]], Counter, list[int]]:
    """(conversations, rejects by reason, the row number each conversation came from, from 1). Rejects
    are counted rather than raised so the caller decides how many is too many."""
    _check_format(fmt)
    kept, rejected, numbers = [], Counter(), []
    for number, row in enumerate(rows, 1):
        try:
            kept.append(row_to_messages(row, fmt))
            numbers.append(number)
        except MalformedRow as e:
            rejected[e.reason] += 1
    return kept, rejected, numbers
