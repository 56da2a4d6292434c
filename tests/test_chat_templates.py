"""Supervised spans on the original chat templates of current model families (as shipped in `trl`).

Every template under `trl/chat_templates/` that renders text is loaded into a copy of the embedded tokenizer
with the template's special tokens added and its end-of-turn token as EOS. Six conversations go through the
data path's encoder (`encode_conversations`, default `multi_turn="per_turn"`). The expectation is built
apart from it, turn by turn, straight from the template: assistant turn i's prompt P_i is the conversation
before it rendered with the generation prompt, its rendering T_i the conversation up to it; the supervised
text is T_i after P_i, up to and including the last special token of that reply. Each turn must be
supervised exactly once, after exactly P_i's tokens (what inference is given), and nothing may be dropped: a
template that cannot render a turn's reasoning or tool calls must raise, never train without them.

Skipped: the templates that take image content only (idefics3, llava_next, smolvlm).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from sft.errors import SFTError
from sft.generation import stop_token_ids
from sft.templates import IGNORE_INDEX, encode_chat, encode_conversations, setup_template, stop_tokens

trl = pytest.importorskip("trl")
TEMPLATES = Path(trl.__file__).parent / "chat_templates"
VLM_ONLY = ("idefics3", "llava_next", "smolvlm")
NAMES = sorted(p.stem for p in TEMPLATES.glob("*.jinja")
               if not p.stem.endswith("_training") and not p.stem.startswith(VLM_ONLY))
# each family's end-of-turn token, as its tokenizer's EOS
EOS = {"cohere": "<|END_OF_TURN_TOKEN|>", "deepseek": "<｜end▁of▁sentence｜>", "gemma4": "<turn|>",
       "diffusion_gemma": "<turn|>", "gemma": "<end_of_turn>", "glm4moe": "<|user|>", "gptoss": "<|return|>",
       "llama3": "<|eot_id|>", "muse_glimmer": "<|eot|>", "phi3": "<|end|>"}
TOKENS = re.compile(r"<\|[^|<>\s]+\|>|<｜[^｜<>]+｜>|<\|[a-z_\"]+>|<[a-z_]+\|>|<(?:start_of_turn|end_of_turn|bos|eos)>")

SCHEMAS = [{"type": "function", "function": {"name": name, "description": f"The {name} tool.", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
    for name in ("weather", "clock")]


def call(name: str, query: str) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": {"query": query}}}


SYSTEM = {"role": "system", "content": "You are terse."}
PERU = {"role": "user", "content": "Capital of Peru?"}
SUM = {"role": "user", "content": "What is 17 + 25?"}
CONVERSATIONS = {
    "one_turn": ([SYSTEM, PERU, {"role": "assistant", "content": "Lima"}], None),
    "several_turns": ([SYSTEM, PERU, {"role": "assistant", "content": "Lima"},
                       {"role": "user", "content": "And of Chile?"}, {"role": "assistant", "content": "Santiago"}],
                      None),
    "reasoning_one_turn": ([SUM, {"role": "assistant", "content": "42",
                                  "reasoning_content": "17 + 25: 17 + 20 is 37, plus 5."}], None),
    "reasoning_several_turns": ([SUM, {"role": "assistant", "content": "42",
                                       "reasoning_content": "17 + 20 is 37, plus 5."},
                                 {"role": "user", "content": "And 42 - 2?"},
                                 {"role": "assistant", "content": "40", "reasoning_content": "Two less than 42."}],
                                None),
    "tool_call_result_answer": ([{"role": "user", "content": "Weather in Lima?"},
                                 {"role": "assistant", "content": "", "tool_calls": [call("weather", "Lima")]},
                                 {"role": "tool", "name": "weather", "content": "Sunny, 24 C"},
                                 {"role": "assistant", "content": "Sunny and 24 C."}], SCHEMAS),
    "several_calls_one_turn": ([{"role": "user", "content": "Weather and time in Oslo?"},
                                {"role": "assistant", "content": "",
                                 "tool_calls": [call("weather", "Oslo"), call("clock", "Oslo")]},
                                {"role": "tool", "name": "weather", "content": "Snow, -3 C"},
                                {"role": "tool", "name": "clock", "content": "14:05"},
                                {"role": "assistant", "content": "Snow at -3 C; it is 14:05."}], SCHEMAS),
}


@pytest.fixture(scope="module")
def tokenizers(chatml_tokenizer):
    out = {}
    for name in NAMES:
        text = (TEMPLATES / f"{name}.jinja").read_text()
        tok = copy.deepcopy(chatml_tokenizer)
        tok.add_special_tokens({"additional_special_tokens": sorted(set(TOKENS.findall(text)))})
        eos = next((v for k, v in EOS.items() if name.startswith(k)), "<|im_end|>")
        tok.add_special_tokens({"eos_token": eos, "bos_token": "<|test_bos|>"})  # the template's own BOS
        tok.chat_template = text
        out[name] = tok
    return out


def render(tok, messages, prompt, tools):
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=prompt)


def specials(tok) -> re.Pattern:
    texts = sorted({t.content for t in tok.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts)))


def expectation(tok, messages, tools) -> list[tuple[str, str]] | str:
    """(P_i, supervised text) of each assistant turn, straight from the template; or why it must be refused."""
    pattern = specials(tok)
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            prompt, turn = render(tok, messages[:i], True, tools), render(tok, messages[:i + 1], False, tools)
        except Exception:
            return "refused"
        if prompt.endswith("<think>\n") and not turn.startswith(prompt):
            # the template opens a reasoning block in the generation prompt and strips reasoning from turns:
            # the model emits the reasoning (if any), closes the block and answers
            plain = {k: v for k, v in m.items() if k != "reasoning_content"}
            head, tail = render(tok, [*messages[:i], {**plain, "content": "@@"}], False, tools).split("@@")
            if prompt == head + "<think>\n":
                turn = prompt + f"{m.get('reasoning_content', '')}\n</think>\n\n{m['content']}" + tail
        if not turn.startswith(prompt) and not m.get("reasoning_content"):
            # a turn without reasoning where the generation prompt opens a reasoning block: what the model
            # answers with thinking off, after the prompt it is then given
            prompt = tok.apply_chat_template(messages[:i], tools=tools, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
        if not turn.startswith(prompt):
            return "refused"
        if any(x["role"] != "assistant" and x["content"] not in turn for x in messages[:i]):
            return "dropped"
        reply = turn[len(prompt):]
        ends = [x.end() for x in pattern.finditer(reply)]
        if not ends:
            return "refused"
        span = reply[:ends[-1]]
        if m.get("reasoning_content") and m["reasoning_content"] not in span:
            return "no reasoning"
        if any(c["function"]["arguments"]["query"] not in span or c["function"]["name"] not in span
               for c in m.get("tool_calls", ())):
            return "no tool calls"
        if m["content"] and m["content"] not in span:
            return "refused"
        out.append((prompt, span, messages[:i]))
    return out


def runs(tok, encoded) -> list[tuple[list[int], list[int]]]:
    """(ids before, supervised ids) of each supervised run of an example."""
    out, start = [], None
    labels = encoded.labels + [IGNORE_INDEX]
    for k, label in enumerate(labels):
        if label != IGNORE_INDEX and start is None:
            start = k
        elif label == IGNORE_INDEX and start is not None:
            out.append((encoded.input_ids[:start], encoded.input_ids[start:k]))
            start = None
    return out


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", NAMES)
def test_supervised_spans_equal_the_templates_own_rendering(tokenizers, name, conversation):
    tok = tokenizers[name]
    messages, tools = CONVERSATIONS[conversation]
    expected = expectation(tok, messages, tools)
    (got,) = encode_conversations(tok, [messages], [tools])
    if isinstance(expected, str):
        assert isinstance(got, SFTError), f"{name} cannot render {conversation} ({expected}) but it was encoded"
        refused = "the chat template refuses" in str(got) or "the chat template fails" in str(got)
        if expected == "no reasoning":
            assert "reasoning_tags" in str(got) or refused
        elif expected in ("no tool calls", "dropped"):
            assert "does not render tool calls" in str(got) or "drops the content" in str(got) or refused
        return
    assert not isinstance(got, Exception), f"{name}: {got}"
    found = [run for example in got for run in runs(tok, example)]
    assert len(found) == len(expected)  # every assistant turn supervised once
    for (before, supervised), (prompt, span, history) in zip(sorted(found, key=lambda r: len(r[0])), expected):
        assert tok.decode(supervised) == span
        assert tok.decode(before) == prompt  # the generation prompt of that turn, as at inference
        if prompt == render(tok, history, True, tools):
            assert before == encode_chat(tok, history, add_generation_prompt=True, tools=tools).input_ids
        assert tok.convert_tokens_to_ids(_closer(tok, span)) in stop_token_ids(tok)
    if all((expected[-1][0] + expected[-1][1]).startswith(prompt + span) for prompt, span, _ in expected):
        assert len(got) == 1  # where every turn renders as a prefix of the last, one example, as before


def _closer(tok, span: str) -> str:
    return [m.group() for m in specials(tok).finditer(span)][-1]


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith(("llama3", "gemma", "phi3", "cohere"))])
def test_reasoning_tags_write_reasoning_inline_where_the_template_has_no_place_for_it(tokenizers, name):
    tok = copy.deepcopy(tokenizers[name])
    messages, tools = CONVERSATIONS["reasoning_one_turn"]
    plain = encode_conversations(tok, [messages])[0]
    if not isinstance(plain, Exception):
        pytest.skip(f"{name} renders reasoning itself")
    setup_template(tok, "tokenizer", None, ("<think>", "</think>"))
    (examples,) = encode_conversations(tok, [messages])
    ((_, supervised),) = runs(tok, examples[0])
    assert tok.decode(supervised).startswith("<think>\n17 + 25: 17 + 20 is 37, plus 5.\n</think>\n\n42")


def test_gpt_oss_closes_a_tool_call_with_call_and_an_answer_with_return(tokenizers):
    tok = tokenizers["gptoss"]
    messages, tools = CONVERSATIONS["tool_call_result_answer"]
    (examples,) = encode_conversations(tok, [messages], [tools])
    spans = [tok.decode(s) for e in examples for _, s in runs(tok, e)]
    assert len(spans) == 2 and spans[0].endswith("<|call|>") and spans[1].endswith("<|return|>")
    assert {"<|call|>", "<|return|>"} <= set(stop_tokens(tok))
    assert len(examples) == 1
    # with reasoning before the call: the prompt after the tool result keeps it (as at inference), while the
    # rendering with the answer drops it; the answer is trained after the prompt the model is given
    thinking = [messages[0], {**messages[1], "reasoning_content": "Look it up."}, *messages[2:]]
    (examples,) = encode_conversations(tok, [thinking], [tools])
    (call_before, call), (answer_before, answer) = runs(tok, examples[0])
    assert tok.decode(call) == ('<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant to=functions.'
                                'weather<|channel|>commentary json<|message|>{"query": "Lima"}<|call|>')
    assert tok.decode(answer) == "<|channel|>final<|message|>Sunny and 24 C.<|return|>"
    assert tok.decode(answer_before) == render(tok, thinking[:3], True, tools)


def test_qwen3_keeps_earlier_reasoning_out_of_later_turns_and_trains_each_turn_with_its_own(tokenizers):
    tok = tokenizers["qwen3"]
    messages, _ = CONVERSATIONS["reasoning_several_turns"]
    (examples,) = encode_conversations(tok, [messages])
    assert len(examples) == 2
    first, second = (tok.decode(s) for e in examples for _, s in runs(tok, e))
    assert first == "<think>\n17 + 20 is 37, plus 5.\n</think>\n\n42<|im_end|>"
    assert second == "<think>\nTwo less than 42.\n</think>\n\n40<|im_end|>"
    assert "17 + 20" not in tok.decode(examples[1].input_ids)  # the history as the template gives it at inference
    with pytest.raises(SFTError, match="rewrites earlier turns"):
        encode_chat(tok, messages)  # one example of both turns cannot be right
    (last_only,) = encode_conversations(tok, [messages], multi_turn="last_turn")
    assert len(last_only) == 1 and [tok.decode(s) for _, s in runs(tok, last_only[0])] == [second]


def test_deepseek_r1_distill_trains_the_reasoning_after_the_think_it_prefills(tokenizers):
    tok = tokenizers["deepseek_r1_distill"]
    messages, _ = CONVERSATIONS["reasoning_one_turn"]
    ((example,),) = encode_conversations(tok, [messages])
    ((before, supervised),) = runs(tok, example)
    assert tok.decode(before).endswith("<｜Assistant｜><think>\n")
    assert tok.decode(supervised) == "17 + 25: 17 + 20 is 37, plus 5.\n</think>\n\n42<｜end▁of▁sentence｜>"


def test_every_template_is_tried(tokenizers):
    assert len(NAMES) >= 30 and {"qwen3", "gptoss", "llama3_1", "gemma3", "deepseek_r1_distill"} <= set(NAMES)
    assert not {n for n in NAMES if n.startswith(VLM_ONLY)}
