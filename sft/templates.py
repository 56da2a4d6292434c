"""Chat templates: one function turns a conversation into token ids, for training and for generation.

`encode_chat` renders the conversation with the tokenizer's chat template (or the plain template for
base models that have none) and tokenizes it in segments cut at assistant-turn boundaries. Cutting
there means the prompt of a training example is tokenized exactly as the same prompt is at
generation time, and the supervised span of each assistant turn (its content and its end-of-turn
token) is known exactly, without guessing from token offsets. The template supplies BOS (if the
model uses one); text is tokenized without added special tokens, so BOS never appears twice.

A system prompt (TrainConfig.system_prompt) is written into the chat template by `setup_template`, so
every rendering agrees on it: training examples, held-out prompts, generation, and the tokenizer saved
with the model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from jinja2 import TemplateError

from .config import MultiTurn
from .errors import ConfigError, DataError, SFTError
from .template_traits import (check_rendered, check_supervised, inline_reasoning, last_special, traits,
                              with_reasoning_tags)

IGNORE_INDEX = -100
CHAT_TEMPLATES = Path(__file__).parent / "chat_templates"  # the templates this project ships

# For base models without a chat template (MPT-7B, Llama base). Every assistant turn ends with EOS,
# which the model learns, so generation stops. The assistant text starts on a new line so that the
# prompt never ends in a space, which BPE tokenizers would otherwise split unnaturally.
PLAIN_TEMPLATE = (
    "{{ bos }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Human: {{ m['content'] }}\n"
    "{% else %}### Assistant:\n{{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX where no loss is taken


def setup_template(tokenizer, template: str = "auto", system_prompt: str | None = None,
                   reasoning_tags: tuple[str, str] | None = None) -> str:
    """Installs the plain template where asked or where the tokenizer has none (or the Jinja file given), then
    the reasoning tags and the system prompt. `reasoning_tags`: for a template with no place for reasoning,
    each assistant turn's reasoning is written inline before its content between them. `system_prompt`: None
    leaves the template's own behaviour, "" drops the system text it gives a conversation that has no system
    turn (where it gives one), any other string becomes that system text. Returns which template is used."""
    if template == "tokenizer" and not tokenizer.chat_template:
        raise ConfigError("template: 'tokenizer' was asked for, but this tokenizer has no chat template")
    used = "tokenizer"
    if template == "plain" or (template == "auto" and not tokenizer.chat_template):
        bos = tokenizer.bos_token if _adds_bos(tokenizer) else ""
        tokenizer.chat_template = PLAIN_TEMPLATE.replace("{{ bos }}", bos)
        used = "plain"
    elif template not in ("auto", "tokenizer"):
        path = CHAT_TEMPLATES / "chatml_tools.jinja" if template == "chatml-tools" else Path(template).expanduser()
        tokenizer.chat_template = path.read_text()
        used = template
    if reasoning_tags is not None:
        if traits(tokenizer).reasoning is not None:
            raise ConfigError(f"reasoning_tags: the chat template renders reasoning itself "
                              f"({traits(tokenizer).reasoning}); leave reasoning_tags unset")
        tokenizer.chat_template = with_reasoning_tags(tokenizer.chat_template, tuple(reasoning_tags))
    if system_prompt is not None and (system_prompt or template_system_prompt(tokenizer)):
        special = [t.content for t in tokenizer.added_tokens_decoder.values()
                   if t.special and t.content and t.content in system_prompt]
        if special:
            raise ConfigError(f"system_prompt: holds the text of the special token {special[0]!r}, which the "
                              f"tokenizer would turn into the token itself")
        tokenizer.chat_template = with_system_prompt(tokenizer.chat_template, system_prompt)
    return used


def with_system_prompt(chat_template: str, text: str) -> str:
    """The template, first giving a conversation that has no system turn the system message `text`.

    >>> from jinja2 import Template
    >>> template = with_system_prompt("{{ messages[0]['content'] }}", 'Say "yes".')
    >>> Template(template).render(messages=[{"role": "user", "content": "Hi"}])
    'Say "yes".'
    >>> Template(template).render(messages=[{"role": "system", "content": "Be terse."}])
    'Be terse.'
    """
    literal = json.dumps(text, ensure_ascii=False)  # a JSON string is a valid Jinja string literal
    return ("{%- if messages and messages[0]['role'] != 'system' %}"
            f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
            "{%- endif %}" + chat_template)


def template_system_prompt(tokenizer) -> str:
    """The system text the chat template gives a conversation that has no system turn; "" for none.

    Found by rendering one user turn with a system turn and without: the default is whatever the
    second holds where the first holds the given system text. SmolLM2's template gives
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face".
    """
    user = [{"role": "user", "content": "PROBE_USER_TEXT"}]
    try:
        given = render(tokenizer, [{"role": "system", "content": "PROBE_SYSTEM_TEXT"}, *user], False)
        bare = render(tokenizer, user, False)
    except TemplateError:  # a template that refuses system turns gives none of its own
        return ""
    head, found, tail = given.partition("PROBE_SYSTEM_TEXT")
    if found and bare.startswith(head) and bare.endswith(tail) and len(bare) >= len(head) + len(tail):
        return bare[len(head):len(bare) - len(tail)]
    return ""


def system_prompt_record(tokenizer, system_prompt: str | None) -> tuple[str | None, str | None]:
    """After `setup_template`: the system text a conversation without a system turn is given, as the
    run folder records it (None for none; "template default: ..." when it is the template's own, not
    the one asked for), and a note for the console where the template's own text applies."""
    text = template_system_prompt(tokenizer)
    if not text or text == system_prompt:
        return text or None, None
    if system_prompt is None:
        note = (f"the chat template gives every conversation without a system turn the system prompt {text!r}; "
                f'SYSTEM_PROMPT = "" drops it, a string of your own replaces it')
    else:
        note = (f"system_prompt: the chat template gives a conversation without a system turn {text!r}, not "
                f"{system_prompt!r}, whatever system message it is given; it cannot be changed with this template")
    return f"template default: {text}", note


def _adds_bos(tokenizer) -> bool:
    """Whether the model expects BOS first: its tokenizer puts one there by default."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def stop_tokens(tokenizer) -> list[str]:
    """The tokens that close an assistant turn: generation stops on each, and training supervises the one that
    closes each turn. EOS, and what the template closes a final turn with (plain, with reasoning, with a tool
    call: gpt-oss's `<|return|>` and `<|call|>`)."""
    closers = list(traits(tokenizer).closers)
    return closers + [t for t in (tokenizer.eos_token,) if t and t not in closers]


def render(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list | None = None) -> str:
    return render_many(tokenizer, [messages], add_generation_prompt, [tools])[0]


def render_many(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool,
                tools: list | None = None) -> list[str]:
    """`render` of many conversations, one template call per distinct tool list (its setup is paid once).
    `tools`: each conversation's function schemas (None for none), or None for no tools at all. A template
    error names the conversation's turns."""
    if not conversations:
        return []
    tools = tools or [None] * len(conversations)
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(tools):
        groups.setdefault(json.dumps(t, sort_keys=True) if t else "", []).append(i)
    out: list[str] = [""] * len(conversations)
    for idx in groups.values():
        batch = [conversations[i] for i in idx]
        try:
            texts = tokenizer.apply_chat_template(batch, tools=tools[idx[0]] or None, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        except TemplateError as e:
            raise TemplateRefusal(f"the chat template refuses this conversation: {e}") from None
        except (TypeError, KeyError, IndexError, AttributeError) as e:
            raise TemplateRefusal(f"the chat template fails on this conversation ({type(e).__name__}: {e})") from None
        for i, text in zip(idx, texts):
            out[i] = text
    return out


class TemplateRefusal(DataError):
    """The chat template raised on a conversation (a role, a field or a shape it does not take)."""


def encode_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False,
                loss_on: str = "assistant", tools: list | None = None) -> Encoded:
    """Token ids and labels of a conversation, as one example.

    Training: `messages` ends with an assistant turn; each assistant turn's reasoning, content, tool calls and
    end-of-turn token carry labels (every token does with loss_on="all"). Generation: `messages` ends with a
    user or tool turn and `add_generation_prompt=True`; labels are all IGNORE_INDEX. A template that renders
    earlier turns differently from the last one cannot make one example of several replies: that is an error
    here (`encode_conversations` makes one example per turn instead).
    """
    return encode_chats(tokenizer, [messages], add_generation_prompt=add_generation_prompt, loss_on=loss_on,
                        tools=[tools])[0]


def encode_chats(tokenizer, conversations: list[list[dict]], *, add_generation_prompt: bool = False,
                 loss_on: str = "assistant", tools: list | None = None) -> list[Encoded]:
    """`encode_chat` of many conversations, with one tokenizer call over all their segments."""
    out = []
    for examples in encode_conversations(tokenizer, conversations, tools, loss_on=loss_on, multi_turn="error",
                                         add_generation_prompt=add_generation_prompt):
        if isinstance(examples, Exception):
            raise examples
        out.append(examples[0])
    return out


MULTI_TURN = get_args(MultiTurn)  # the choices of TrainConfig.multi_turn


def encode_conversations(tokenizer, conversations: list[list[dict]], tools: list | None = None, *,
                         loss_on: str = "assistant", multi_turn: str = "per_turn",
                         add_generation_prompt: bool = False) -> list[list[Encoded] | SFTError]:
    """Each conversation's examples, or the error that stops it (a ConfigError for the template, a DataError for
    the row), with one tokenizer call over all segments (a fast tokenizer encodes a batch in parallel, and each
    segment's ids are those of encoding it alone). See `chat_segments_many` for `multi_turn`."""
    planned = chat_segments_many(tokenizer, conversations, add_generation_prompt, tools, multi_turn=multi_turn,
                                 loss_on=loss_on)
    texts = [text for examples in planned if not isinstance(examples, Exception)
             for segments in examples for text, _ in segments if text]
    encoded = iter(token_ids(tokenizer, texts))
    bos = tokenizer.bos_token_id
    out: list = []
    for examples in planned:
        if isinstance(examples, Exception):
            out.append(examples)
            continue
        made = []
        for segments in examples:
            input_ids: list[int] = []
            labels: list[int] = []
            for text, supervised in segments:
                if not text:
                    continue
                ids = next(encoded)
                input_ids += ids
                supervise = (supervised or loss_on == "all") and not add_generation_prompt
                labels += ids if supervise else [IGNORE_INDEX] * len(ids)
            if bos is not None and len(input_ids) > 1 and input_ids[0] == bos and input_ids[1] == bos:
                raise ConfigError("template: the rendered conversation starts with two BOS tokens; the template and "
                                  "the tokenizer both add one")
            made.append(Encoded(input_ids, labels))
        out.append(made)
    return out


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """The ids of each text, without added special tokens; a fast tokenizer's batch call that skips the
    character offsets nothing here reads (the same ids as `tokenizer(texts)`)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False).input_ids


def chat_segments_many(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool = False,
                       tools: list | None = None, *, multi_turn: str = "per_turn",
                       loss_on: str = "assistant") -> list[list[list[tuple[str, bool]]] | SFTError]:
    """Each conversation's examples as (text, supervised) segments, or the error that stops it.

    Assistant turn i is located in a text X when the conversation up to it rendered with the generation prompt
    (P_i: what the model is given at inference) and the conversation up to and including it (T_i) are both
    prefixes of X: its reply is T_i after P_i, supervised up to and including the special token that closes it.
    Segments are cut at every located reply, so a prompt is tokenized alike in training and generation.

    Templates that render every turn as a prefix of the next (ChatML, Llama 3) give one example per
    conversation, the whole rendering. Templates that rewrite earlier turns (Qwen3 and gpt-oss drop the
    reasoning of earlier turns; gpt-oss also closes them with another token) cannot supervise an earlier reply
    inside a later rendering. `multi_turn` says what then happens: "per_turn" gives the last turn's rendering
    as an example, and every turn not located in it an example of its own, its rendering T_i, which may locate
    further turns (so each turn is supervised once, after exactly the history the template gives it at
    inference); "last_turn" supervises the last turn only; "error" refuses. With loss_on="all" a
    conversation is one example, every token supervised.
    """
    if add_generation_prompt and any(messages[-1]["role"] == "assistant" for messages in conversations):
        raise DataError("a generation prompt must end with a user turn, not an assistant turn")
    if multi_turn not in MULTI_TURN:
        raise ConfigError(f"multi_turn: one of {MULTI_TURN}, got {multi_turn!r}")
    t = traits(tokenizer)
    stops = tuple(stop_tokens(tokenizer))
    tools = tools or [None] * len(conversations)
    # what to render, with and without the generation prompt: each assistant turn's P_i and T_i, and for a
    # generation prompt the whole conversation
    requests: dict[bool, list[tuple[list[dict], list | None]]] = {True: [], False: []}

    def ask(messages: list[dict], prompt: bool, k: int) -> tuple[bool, int]:
        requests[prompt].append((messages, tools[k]))
        return prompt, len(requests[prompt]) - 1

    plans = []
    for k, messages in enumerate(conversations):
        turns = [(i, ask(messages[:i], True, k), ask(_turn_to_render(t, messages, i), False, k))
                 for i, m in enumerate(messages) if m["role"] == "assistant"]
        whole = ask(messages, True, k) if add_generation_prompt else None
        plans.append((turns, whole))
    rendered: dict[bool, list] = {}
    for prompt, batch in requests.items():
        rendered[prompt] = _render_each(tokenizer, batch, prompt)
    out: list = []
    for k, (turns, whole) in enumerate(plans):
        try:
            texts = _turn_texts(tokenizer, t, conversations[k], tools[k], turns, rendered)
            if whole is not None:
                out.append([_segments(t, stops, _get(rendered, whole), texts, set(), conversations[k])])
            else:
                out.append(_examples(t, stops, conversations[k], texts, multi_turn, loss_on))
        except SFTError as e:
            out.append(e)
    return out


def _turn_texts(tokenizer, t, messages: list[dict], tools, turns: list, rendered: dict) -> dict:
    """(P_i, T_i) of each assistant turn i, from the renderings, where the template's generation prompt and
    its rendering of the turn disagree on what comes first: see `_non_thinking_prompt` and `_after_prompt`."""
    texts = {}
    for i, p, x in turns:
        prompt, turn = _get(rendered, p), _finish_turn(t, messages, i, _get(rendered, x))
        if not turn.startswith(prompt) and not messages[i].get("reasoning_content"):
            prompt = _non_thinking_prompt(tokenizer, messages[:i], tools) or prompt
        if not turn.startswith(prompt):
            turn = _after_prompt(prompt, turn, messages[i - 1]) or turn
        texts[i] = (prompt, turn)
    return texts


def _non_thinking_prompt(tokenizer, messages: list[dict], tools) -> str | None:
    """The generation prompt with thinking off, for a turn without reasoning on a template whose generation
    prompt opens a reasoning block and whose turns without reasoning render closed (Nemotron 3): such a turn
    is what the model answers when thinking is off, after the prompt it is then given."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
    except TemplateError:
        return None


def _after_prompt(prompt: str, turn: str, before: dict) -> str | None:
    """For a template that renders the history of a final turn otherwise than the generation prompt of that turn
    (gpt-oss keeps the reasoning of a tool call in the prompt that follows its result, and drops it once an
    answer follows): the prompt, then the reply as the template renders it after its own rendering of the
    same last message. None where that message cannot be found in both."""
    anchor = before["content"].strip()
    at = prompt.rfind(anchor) if anchor else -1
    if at < 0:
        return None
    tail = prompt[at:]
    found = turn.rfind(tail)
    if found < 0 or turn.find(tail) != found:
        return None
    return prompt + turn[found + len(tail):]


def _render_each(tokenizer, batch: list[tuple[list[dict], list | None]], prompt: bool) -> list:
    """The renderings of a batch; where the template refuses one, that conversation gets the error."""
    conversations, tools = [m for m, _ in batch], [t for _, t in batch]
    try:
        return render_many(tokenizer, conversations, prompt, tools)
    except TemplateRefusal:
        out = []
        for messages, t in batch:
            try:
                out.append(render_many(tokenizer, [messages], prompt, [t])[0])
            except TemplateRefusal as e:
                out.append(e)
        return out


def _get(rendered: dict, at: tuple[bool, int]) -> str:
    text = rendered[at[0]][at[1]]
    if isinstance(text, Exception):
        raise text
    return text


def _turn_to_render(t, messages: list[dict], i: int) -> list[dict]:
    """The conversation up to assistant turn i, as given to the template for T_i. A template that prefills a
    reasoning block strips inline reasoning: the turn's content is a placeholder, replaced after rendering."""
    if t.reasoning != "prefill":
        return messages[: i + 1]
    turn = {k: v for k, v in messages[i].items() if k != "reasoning_content"}
    return [*messages[:i], {**turn, "content": _PLACEHOLDER}]


_PLACEHOLDER = "SFTREPLYPLACEHOLDER"


def _finish_turn(t, messages: list[dict], i: int, text: str) -> str:
    if t.reasoning != "prefill":
        return text
    m = messages[i]
    return text.replace(_PLACEHOLDER, inline_reasoning(t.prefill, m.get("reasoning_content", ""), m["content"]), 1)


def _examples(t, stops: tuple, messages: list[dict], texts: dict, multi_turn: str,
              loss_on: str) -> list[list[tuple[str, bool]]]:
    """The examples of a training conversation: see `chat_segments_many`."""
    order = sorted(texts)
    last = order[-1]
    if loss_on == "all":
        return [[(texts[last][1], True)]]
    examples, left = [], set(order)
    for j in reversed(order):
        if j not in left:
            continue
        located = _located(texts, texts[j][1])
        if j not in located:
            raise ConfigError("template: the chat template does not render conversations as prefixes of each other: "
                              "an assistant turn's rendering does not start with the generation prompt it is given "
                              "at inference (the template rewrites earlier turns or the turn's opening), so the "
                              "reply cannot be located")
        if multi_turn == "error" and len(located) < len(order):
            raise ConfigError("template: the chat template does not render conversations as prefixes of each other "
                              "(it rewrites earlier turns), so assistant spans cannot be located in one example; "
                              "set multi_turn='per_turn' (an example per turn) or 'last_turn'")
        supervised = {j} if multi_turn == "last_turn" else left & set(located)
        examples.append(_segments(t, stops, texts[j][1], texts, supervised, messages))
        left -= supervised
        if multi_turn == "last_turn":
            break
    return examples[::-1]


def _located(texts: dict, text: str) -> list[int]:
    return [i for i, (prompt, turn) in sorted(texts.items()) if text.startswith(turn) and turn.startswith(prompt)]


def _segments(t, stops: tuple, text: str, texts: dict, supervised: set,
              messages: list[dict]) -> list[tuple[str, bool]]:
    """`text` cut at every assistant turn located in it, the turns in `supervised` marked, each checked."""
    segments, pos = [], 0
    for i in _located(texts, text):
        prompt, turn = texts[i]
        if len(prompt) < pos:
            continue
        reply = turn[len(prompt):]
        closed = last_special(reply, t.special)
        if closed is None or closed[1] not in stops:
            raise ConfigError(f"template: the chat template does not end assistant turns with the EOS token or "
                              f"another token it closes turns with ({', '.join(stops) or 'none found'}), so the "
                              f"model would never learn to stop; use template='plain'")
        span = reply[:closed[0]]
        if i in supervised:
            check_supervised(span, messages[i], closed[1], t)
        segments.append((text[pos:len(prompt)], False))
        segments.append((span, i in supervised))
        pos = len(prompt) + len(span)
    segments.append((text[pos:], False))
    check_rendered(text, messages[:max(supervised, default=len(messages) - 1) + 1])
    return segments


def prompt_and_reference(messages: list[dict], task_metric: str | None = "exact_match") -> tuple[list[dict], str]:
    """Splits a conversation into the prompt and the reference reply: for "tool_call_match" the turns before the
    last assistant turn that calls tools, and its calls as JSON (name and arguments; `[]` for a conversation
    that calls none); otherwise the turns before the last reply, and its answer (without its reasoning)."""
    if task_metric == "tool_call_match":  # a conversation without calls: the reply should make none
        calling = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("tool_calls")]
        at = calling[-1] if calling else len(messages) - 1
        calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                 for c in messages[at].get("tool_calls", ())]
        return messages[:at], json.dumps(calls, ensure_ascii=False)
    return messages[:-1], messages[-1]["content"]
