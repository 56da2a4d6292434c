"""What a chat template does with reasoning, tool calls and the end of a turn, found by rendering probes.

Templates of current model families differ in where reasoning goes (a `reasoning_content` field, a
`thinking` field, inline `<think>` tags that the generation prompt opens, or nowhere), whether they render
tool calls and tool results, and which token closes a turn (`<|im_end|>`, `<|eot_id|>`, `<|return|>` after a
final answer and `<|call|>` after a tool call in gpt-oss). Nothing here is a table of model names: each
property is read off the template by rendering short conversations made of probe words and looking for them
in the output. The same renderings give the parser that splits a generated reply into reasoning, answer and
tool calls (`parse_reply`), so generation reads replies in the template's own format, and the checks that an
encoded example holds what the model emits for each turn and every turn of its history
(`check_supervised`, `check_rendered`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from jinja2 import TemplateError

from .errors import DataError

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' conventions, in that order
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

_USER = "PROBEUSERTEXT"
_CONTENT = "PROBEANSWERTEXT"
_REASONING = "PROBEREASONINGTEXT"
_TOOL = "probe_tool_name"
_VALUE = "PROBEARGVALUE"
_RESULT = "PROBETOOLRESULT"
_SENTINEL = "PROBESENTINELTEXT"
_ARGUMENTS = {"probe_arg": _VALUE}
_SCHEMA = {"type": "function", "function": {"name": _TOOL, "description": "A probe.", "parameters": {
    "type": "object", "properties": {"probe_arg": {"type": "string"}}, "required": ["probe_arg"]}}}


@dataclass(frozen=True)
class Traits:
    """What the template does; see the module docstring. `reasoning`: the message field it renders reasoning
    from, "prefill" (it strips inline `<think>` from assistant turns and opens one in the generation prompt:
    the reasoning is written after that opening, as the model emits it), or None (no place for reasoning).
    `closers`: the tokens that close a final assistant turn (plain, with reasoning, with a tool call): each is
    supervised where it closes a turn and stops generation."""
    reasoning: str | None
    prefill: str  # what the generation prompt opens the reply with, in "prefill" mode ("<think>\n")
    tool_calls: bool
    tool_results: bool
    closers: tuple[str, ...]
    special: tuple[str, ...]  # the tokenizer's special token texts, longest first
    reply_heads: tuple[str, ...]  # what precedes the answer in a reply, with reasoning and without (parse_reply)
    call_format: tuple[str, str, str] | None  # one tool call's text around its name and arguments (parse_reply)
    tool_error: str | None = None  # why tool calls cannot be rendered, when the template says

    def record(self) -> dict:
        """What config.json's `derived` keeps."""
        return {"reasoning": self.reasoning, "tool_calls": self.tool_calls, "tool_results": self.tool_results,
                "end_of_turn": list(self.closers)}


_CACHE: dict[tuple, Traits] = {}


def special_tokens(tokenizer) -> tuple[str, ...]:
    texts = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content}
    texts |= {t for t in (tokenizer.eos_token, tokenizer.bos_token) if t}
    return tuple(sorted(texts, key=lambda t: (-len(t), t)))


def traits(tokenizer) -> Traits:
    """The template's traits, probed once per template and tokenizer vocabulary."""
    key = (tokenizer.chat_template, special_tokens(tokenizer), tokenizer.eos_token)
    if key not in _CACHE:
        _CACHE[key] = _probe(tokenizer)
    return _CACHE[key]


def _render(tokenizer, messages, prompt: bool, tools=None) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=prompt)
    except (TemplateError, TypeError, KeyError, IndexError, AttributeError, ValueError):
        return None


def _reply(tokenizer, messages, tools=None) -> str | None:
    """The text the template renders for the last (assistant) message after its generation prompt (with
    thinking off, for a turn without reasoning whose rendering only that prompt begins: Nemotron 3)."""
    prompt, turn = _render(tokenizer, messages[:-1], True, tools), _render(tokenizer, messages, False, tools)
    if prompt is not None and turn is not None and not turn.startswith(prompt) and not any(
            f in messages[-1] for f in REASONING_FIELDS):
        try:
            prompt = tokenizer.apply_chat_template(messages[:-1], tools=tools, tokenize=False,
                                                   add_generation_prompt=True, enable_thinking=False)
        except TemplateError:
            return None
    if prompt is None or turn is None or not turn.startswith(prompt):
        return None
    return turn[len(prompt):]


def last_special(text: str, special: tuple[str, ...]) -> tuple[int, str] | None:
    """(end position, token) of the last special token in `text`."""
    found = None
    for m in _special_pattern(special).finditer(text):
        found = (m.end(), m.group())
    return found


_PATTERNS: dict[tuple, re.Pattern] = {}


def _special_pattern(special: tuple[str, ...]) -> re.Pattern:
    if special not in _PATTERNS:
        _PATTERNS[special] = re.compile("|".join(map(re.escape, special)) or r"(?!)")
    return _PATTERNS[special]


def _probe(tokenizer) -> Traits:
    special = special_tokens(tokenizer)
    user = {"role": "user", "content": _USER}
    plain = [user, {"role": "assistant", "content": _CONTENT}]
    replies = {"plain": _reply(tokenizer, plain)}
    reasoning, prefill = None, ""
    for name in REASONING_FIELDS:
        reply = _reply(tokenizer, [user, {"role": "assistant", "content": _CONTENT, name: _REASONING}])
        if reply and _REASONING in reply and _CONTENT in reply:
            reasoning, replies["reasoning"] = name, reply
            break
    if reasoning is None:
        prefill = _prefill(tokenizer, user)
        if prefill:
            reasoning = "prefill"
            before = _render(tokenizer, [user], True)
            turn = _render(tokenizer, [user, {"role": "assistant", "content": _SENTINEL}], False)
            written = inline_reasoning(prefill, _REASONING, _CONTENT)
            replies["reasoning"] = turn.replace(_SENTINEL, written)[len(before):]
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": _TOOL, "arguments": _ARGUMENTS}}]}
    tool_error = None
    try:
        tokenizer.apply_chat_template([user, call], tools=[_SCHEMA], tokenize=False)
    except TemplateError as e:
        tool_error = str(e)
    except Exception as e:  # a template that indexes a field the call lacks
        tool_error = f"{type(e).__name__}: {e}"
    reply = _reply(tokenizer, [user, call], [_SCHEMA])
    tool_calls = bool(reply and _VALUE in reply)
    if tool_calls:
        replies["tool_call"] = reply
        if reasoning not in (None, "prefill"):
            replies["reasoning_call"] = _reply(tokenizer, [user, {**call, reasoning: _REASONING}], [_SCHEMA])
    result = {"role": "tool", "name": _TOOL, "content": _RESULT}
    after = _render(tokenizer, [user, call, result, {"role": "assistant", "content": _CONTENT}], False, [_SCHEMA])
    tool_results = bool(after and _RESULT in after)
    closers = []
    for reply in replies.values():
        found = reply and last_special(reply, special)
        if found and found[1] not in closers:
            closers.append(found[1])
    call_format = _call_format(replies["tool_call"], replies.get("plain"), special) if tool_calls else None
    return Traits(reasoning, prefill, tool_calls, tool_results, tuple(closers), special,
                  _reply_heads(replies, call_format), call_format, tool_error)


def _prefill(tokenizer, user: dict) -> str:
    """The opening of a reasoning block that the generation prompt writes and the rendered turn lacks, when the
    template also strips inline reasoning from assistant turns (DeepSeek-R1 distills); "" otherwise."""
    prompt = _render(tokenizer, [user], True)
    inline = _render(tokenizer, [user, {"role": "assistant",
                                        "content": inline_reasoning(f"{THINK_OPEN}\n", _REASONING, _CONTENT)}], False)
    turn = _render(tokenizer, [user, {"role": "assistant", "content": _SENTINEL}], False)
    if None in (prompt, inline, turn) or _REASONING in inline or _CONTENT not in inline:
        return ""
    before = turn[:turn.find(_SENTINEL)]
    opened = prompt[len(before):] if prompt.startswith(before) else ""
    return opened if opened.strip().startswith(THINK_OPEN) else ""


def inline_reasoning(opening: str, reasoning: str, content: str) -> str:
    """The reasoning written inline as the R1-style models emit it, after the opening tag.

    >>> inline_reasoning("<think>\\n", "2 + 3 is 5.", "5")
    '<think>\\n2 + 3 is 5.\\n</think>\\n\\n5'
    """
    return f"{opening}{reasoning.strip()}\n{THINK_CLOSE}\n\n{content.lstrip()}"


def with_reasoning_tags(chat_template: str, tags: tuple[str, str]) -> str:
    """The template, first writing each assistant turn's `reasoning_content` inline at the start of its content
    between `tags`, for templates that have no place for reasoning of their own.

    >>> from jinja2 import Environment
    >>> t = Environment().from_string(with_reasoning_tags("{{ messages[0]['content'] }}", ("<think>", "</think>")))
    >>> t.render(messages=[{"role": "assistant", "content": "5", "reasoning_content": "2 + 3 = 5"}])
    '<think>\\n2 + 3 = 5\\n</think>\\n\\n5'
    """
    opening, closing = (json.dumps(t, ensure_ascii=False) for t in tags)
    return ("{%- set _sft = namespace(messages=[]) %}"
            "{%- for m in messages %}"
            "{%- if m['role'] == 'assistant' and m['reasoning_content'] is defined and m['reasoning_content'] %}"
            f"{{%- set _sft.messages = _sft.messages + [dict(m, content={opening} + '\\n' + m['reasoning_content']"
            f" + '\\n' + {closing} + '\\n\\n' + m['content'])] %}}"
            "{%- else %}{%- set _sft.messages = _sft.messages + [m] %}{%- endif %}"
            "{%- endfor %}"
            "{%- set messages = _sft.messages %}" + chat_template)


@dataclass(frozen=True)
class Reply:
    """A generated reply in its parts."""
    content: str
    reasoning: str | None = None
    tool_calls: tuple[dict, ...] = ()  # {"name", "arguments"} each; arguments parsed from JSON where they are JSON

    def record(self) -> dict:
        out = {"response": self.content}
        if self.reasoning is not None:
            out["reasoning"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = list(self.tool_calls)
        return out


def parse_reply(tokenizer, text: str) -> Reply:
    """Splits a generated reply (decoded with its special tokens) into reasoning, answer and tool calls, in the
    template's format: the probe replies, with their probe words turned into groups. A reply that fits none
    of them is all answer. The answer has no special tokens and no surrounding whitespace."""
    t = traits(tokenizer)
    reasoning, rest = None, text
    for head in t.reply_heads:
        pattern = _loose(head).replace(re.escape(_REASONING), "(?P<reasoning>.*?)", 1)
        match = re.match(pattern, text, re.DOTALL)
        if match:
            reasoning = match.group("reasoning").strip() if "reasoning" in match.groupdict() else None
            rest = text[match.end():]
            break
    calls = []
    if t.call_format:
        lead, middle, trail = t.call_format
        pattern = re.compile(_loose(lead) + r"(?P<name>[\w.\-]+)" + _loose(middle))
        decoder, kept, pos = json.JSONDecoder(), [], 0
        for match in pattern.finditer(rest):
            if match.start() < pos:
                continue
            at = len(rest) - len(rest[match.end():].lstrip())
            try:
                arguments, end = decoder.raw_decode(rest, at)
            except ValueError:
                continue
            tail = re.match(_loose(trail), rest[end:])
            end += tail.end() if tail else 0
            calls.append({"name": match.group("name"), "arguments": arguments})
            kept.append(rest[pos:match.start()])
            pos = end
        rest = "".join(kept) + rest[pos:]
    content = _special_pattern(t.special).sub("", rest).strip()
    return Reply(content, reasoning, tuple(calls))


def _loose(literal: str) -> str:
    """A regex for `literal` in which each run of whitespace matches any run of whitespace, or none."""
    return r"\s*".join(re.escape(part) for part in re.split(r"\s+", literal))


def _reply_heads(replies: dict, call_format: tuple[str, str, str] | None) -> tuple[str, ...]:
    """What comes before the answer in each probe reply, longest first: with reasoning, then without."""
    heads = []
    for key in ("reasoning", "reasoning_call", "plain"):
        reply = replies.get(key)
        if not reply:
            continue
        end = reply.find(_CONTENT) if _CONTENT in reply else reply.find(_TOOL)
        head = reply[:end] if end >= 0 else ""
        if key == "reasoning_call" and call_format and head.endswith(call_format[0]):
            head = head[:len(head) - len(call_format[0])]
        if head.strip() and head not in heads:
            heads.append(head)
    return tuple(heads)


def _call_format(reply: str, plain: str | None, special: tuple[str, ...]) -> tuple[str, str, str] | None:
    """(text before the name, text between the name and the arguments, text after the arguments) of one tool
    call in the template's tool-call probe reply: the call block, from where a plain answer would start to the
    special token that closes the turn."""
    name_at, value_at = reply.find(_TOOL), reply.find(_VALUE)
    args_at = reply.rfind("{", 0, value_at)
    if name_at < 0 or value_at < 0 or args_at < name_at:
        return None
    head = plain[:plain.find(_CONTENT)] if plain and _CONTENT in plain else ""
    start = len(head) if head and reply.startswith(head) else 0
    try:
        args_end = json.JSONDecoder().raw_decode(reply, args_at)[1]
    except ValueError:
        return None
    closer = last_special(reply, special)
    stop = closer[0] - len(closer[1]) if closer and closer[0] > args_end else len(reply)
    return reply[start:name_at], reply[name_at + len(_TOOL):args_at], reply[args_end:stop]


def check_rendered(text: str, messages: list[dict]) -> None:
    """Every system, user and tool turn's content appears in the rendered text: a template that drops one (a
    tool result it has no place for, a system turn it ignores) would train on a history that is not the row's."""
    for m in messages:
        if m["role"] != "assistant" and m["content"].strip() and m["content"].strip() not in text:
            raise DataError(f"the chat template drops the content of a {m['role']} turn, so the example would not "
                            f"hold the row's conversation")


def check_supervised(span: str, message: dict, closer: str, t) -> None:
    """The supervised text of an assistant turn holds what the model emits for it: its content, its reasoning
    and each tool call's name and string arguments, and ends with the token that closes the turn. A template
    that drops any of them cannot train it; that stops here, before any training."""
    if message.get("reasoning_content") and t.reasoning is None:
        raise DataError("an assistant turn has reasoning, and the chat template has no place for it (it renders no "
                        "reasoning field and keeps no inline <think>); set reasoning_tags=('<think>', '</think>') "
                        "to write it inline in the content, in tags of your choice")
    if message.get("tool_calls") and not t.tool_calls:
        raise DataError(f"an assistant turn calls a tool, and the chat template does not render tool calls"
                        f"{f' ({t.tool_error})' if t.tool_error else ''}; use a template that does")
    for call in message.get("tool_calls", ()):
        function = call["function"]
        if function["name"] not in span or not all(_rendered(v, span) for v in _leaves(function["arguments"])):
            raise DataError(f"the chat template does not render tool calls of this turn as given: its call of "
                            f"{function['name']!r} is not in the supervised text (a template may render only "
                            f"the first of several calls)")
    missing = []
    if message["content"].strip() and message["content"].strip() not in span:
        missing.append("its content")
    if message.get("reasoning_content") and message["reasoning_content"].strip() not in span:
        missing.append("its reasoning")
    if not span.endswith(closer):
        missing.append(f"the end-of-turn token {closer!r}")
    if missing:
        raise DataError(f"the supervised text of an assistant turn lacks {' and '.join(missing)}: the chat "
                        f"template does not render it where the reply is supervised")


def _leaves(value) -> list:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in _leaves(v)]
    return [value]


def _rendered(value, span: str) -> bool:
    if isinstance(value, str):
        return value in span or json.dumps(value, ensure_ascii=False)[1:-1] in span or json.dumps(value)[1:-1] in span
    return json.dumps(value) in span or str(value) in span
