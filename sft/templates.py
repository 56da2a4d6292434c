"""Chat templates: one function turns a conversation into token ids, for training and for generation.

`encode_chat` renders the conversation with the tokenizer's chat template (or the plain template for
base models that have none) and tokenizes it in segments cut at assistant-turn boundaries. Cutting
there means the prompt of a training example is tokenized exactly as the same prompt is at
generation time, and the supervised span of each assistant turn (its content and its end-of-turn
token) is known exactly, without guessing from token offsets. The template supplies BOS (if the
model uses one); text is tokenized without added special tokens, so BOS never appears twice.
"""
from __future__ import annotations

from dataclasses import dataclass

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


def setup_template(tokenizer, template: str = "auto") -> str:
    """Installs the plain template where asked or where the tokenizer has none; returns which is used."""
    if template == "tokenizer" and not tokenizer.chat_template:
        raise ConfigError("template: 'tokenizer' was asked for, but this tokenizer has no chat template")
    if template == "plain" or (template == "auto" and not tokenizer.chat_template):
        bos = tokenizer.bos_token if _adds_bos(tokenizer) else ""
        tokenizer.chat_template = PLAIN_TEMPLATE.replace("{{ bos }}", bos)
        return "plain"
    return "tokenizer"


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
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False,
                loss_on: str = "assistant") -> Encoded:
    """Token ids and labels of a conversation.

    Training: `messages` ends with an assistant turn; each assistant turn's content and end-of-turn
    token carry labels (every token does with loss_on="all"). Generation: `messages` ends with a user
    turn and `add_generation_prompt=True`; labels are all IGNORE_INDEX.
    """
    if add_generation_prompt and messages[-1]["role"] == "assistant":
        raise DataError("a generation prompt must end with a user turn, not an assistant turn")
    full = render(tokenizer, messages, add_generation_prompt)
    eot = end_of_turn(tokenizer)
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
        turn = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
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

    input_ids: list[int] = []
    labels: list[int] = []
    for text, supervised in segments:
        if not text:
            continue
        ids = tokenizer(text, add_special_tokens=False).input_ids
        input_ids += ids
        labels += ids if (supervised or loss_on == "all") and not add_generation_prompt else [IGNORE_INDEX] * len(ids)
    bos = tokenizer.bos_token_id
    if bos is not None and len(input_ids) > 1 and input_ids[0] == bos and input_ids[1] == bos:
        raise ConfigError("template: the rendered conversation starts with two BOS tokens; the template and "
                          "the tokenizer both add one")
    return Encoded(input_ids, labels)


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """Splits a conversation into the prompt (all turns before the last reply) and that reply."""
    return messages[:-1], messages[-1]["content"]
