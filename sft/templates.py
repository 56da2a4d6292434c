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

from jinja2 import TemplateError

from .errors import ConfigError, DataError

IGNORE_INDEX = -100

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


def setup_template(tokenizer, template: str = "auto", system_prompt: str | None = None) -> str:
    """Installs the plain template where asked or where the tokenizer has none, then the system prompt:
    None leaves the template's own behaviour, "" drops the system text it gives a conversation that has
    no system turn (where it gives one), any other string becomes that system text. Returns which
    template is used."""
    if template == "tokenizer" and not tokenizer.chat_template:
        raise ConfigError("template: 'tokenizer' was asked for, but this tokenizer has no chat template")
    used = "tokenizer"
    if template == "plain" or (template == "auto" and not tokenizer.chat_template):
        bos = tokenizer.bos_token if _adds_bos(tokenizer) else ""
        tokenizer.chat_template = PLAIN_TEMPLATE.replace("{{ bos }}", bos)
        used = "plain"
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


def end_of_turn(tokenizer) -> str:
    """The token string that closes an assistant turn: generation stops on it and training supervises it."""
    return tokenizer.eos_token


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return render_many(tokenizer, [messages], add_generation_prompt)[0]


def render_many(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
    """`render` of many conversations in one call of the template (its setup is paid once)."""
    if not conversations:
        return []
    return tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False,
                loss_on: str = "assistant") -> Encoded:
    """Token ids and labels of a conversation.

    Training: `messages` ends with an assistant turn; each assistant turn's content and end-of-turn
    token carry labels (every token does with loss_on="all"). Generation: `messages` ends with a user
    turn and `add_generation_prompt=True`; labels are all IGNORE_INDEX.
    """
    return encode_chats(tokenizer, [messages], add_generation_prompt=add_generation_prompt, loss_on=loss_on)[0]


def encode_chats(tokenizer, conversations: list[list[dict]], *, add_generation_prompt: bool = False,
                 loss_on: str = "assistant") -> list[Encoded]:
    """`encode_chat` of many conversations, with one tokenizer call over all their segments (a fast tokenizer
    encodes a batch in parallel, and each segment's ids are those of encoding it alone)."""
    all_segments = chat_segments_many(tokenizer, conversations, add_generation_prompt)
    texts = [text for segments in all_segments for text, _ in segments if text]
    encoded = iter(token_ids(tokenizer, texts))
    bos = tokenizer.bos_token_id
    out = []
    for segments in all_segments:
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
        out.append(Encoded(input_ids, labels))
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


def chat_segments(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, supervised) pieces: each assistant reply up to and including
    its end-of-turn token is supervised, everything else (system, user turns, the template's headers) is not."""
    return chat_segments_many(tokenizer, [messages], add_generation_prompt)[0]


def chat_segments_many(tokenizer, conversations: list[list[dict]],
                       add_generation_prompt: bool = False) -> list[list[tuple[str, bool]]]:
    """`chat_segments` of many conversations. Each assistant reply is located by rendering the conversation up
    to it twice: with the generation prompt (where the reply starts) and with the reply (where it ends, at its
    last end-of-turn token). The renderings of all conversations go to the template in two calls."""
    if add_generation_prompt and any(messages[-1]["role"] == "assistant" for messages in conversations):
        raise DataError("a generation prompt must end with a user turn, not an assistant turn")
    # what to render, with and without the generation prompt: the whole conversation, then for each reply the
    # prefix before it and the conversation up to it (the whole conversation itself, when the reply ends it)
    requests: dict[bool, list[list[dict]]] = {True: [], False: []}

    def ask(messages: list[dict], prompt: bool) -> tuple[bool, int]:
        requests[prompt].append(messages)
        return prompt, len(requests[prompt]) - 1

    plans = []
    for messages in conversations:
        full = ask(messages, add_generation_prompt)
        replies = [(ask(messages[:i], True), full if i == len(messages) - 1 else ask(messages[: i + 1], False))
                   for i, message in enumerate(messages) if message["role"] == "assistant"]
        plans.append((full, replies))
    rendered = {prompt: render_many(tokenizer, batch, prompt) for prompt, batch in requests.items()}
    eot = end_of_turn(tokenizer)
    out = []
    for (full_at, replies) in plans:
        full = rendered[full_at[0]][full_at[1]]
        segments: list[tuple[str, bool]] = []
        pos = 0
        for prefix_at, turn_at in replies:
            prefix, turn = rendered[prefix_at[0]][prefix_at[1]], rendered[turn_at[0]][turn_at[1]]
            if not (turn.startswith(prefix) and full.startswith(turn)):
                raise ConfigError("template: the chat template does not render conversations as prefixes of each "
                                  "other (it rewrites earlier turns), so assistant spans cannot be located; "
                                  "use template='plain' or a template without that behaviour")
            reply = turn[len(prefix):]
            cut = reply.rfind(eot)
            if cut < 0:
                raise ConfigError(f"template: the chat template does not end assistant turns with the EOS token "
                                  f"{eot!r}, so the model would never learn to stop; use template='plain'")
            supervised = reply[: cut + len(eot)]
            segments.append((full[pos:len(prefix)], False))
            segments.append((supervised, True))
            pos = len(prefix) + len(supervised)
        segments.append((full[pos:], False))
        out.append(segments)
    return out


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """Splits a conversation into the prompt (all turns before the last reply) and that reply."""
    return messages[:-1], messages[-1]["content"]
