"""Chat templates: which tokens are supervised, and that training and generation share one encoding."""
from __future__ import annotations

import copy
import json

import pytest
from tokenizers import processors

from sft.analysis import read_samples
from sft.errors import ConfigError
from sft.templates import (IGNORE_INDEX, chat_segments_many, encode_chat, encode_chats, render,
                           setup_template, system_prompt_record, token_ids)

SINGLE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
          {"role": "assistant", "content": "5"}]
MULTI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
         {"role": "assistant", "content": "5"}, {"role": "user", "content": "and 3+4?"},
         {"role": "assistant", "content": "7"}]

# ChatML without SmolLM's default system prompt, so a test can prepend things to it.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def supervised_tokens(tokenizer, enc) -> list[str]:
    return [tokenizer.convert_ids_to_tokens(t) for t in enc.labels if t != IGNORE_INDEX]


def supervised_runs(tokenizer, enc) -> list[list[str]]:
    """Contiguous runs of supervised positions, as token strings."""
    runs, current = [], []
    for tok_id, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE_INDEX:
            current.append(tokenizer.convert_ids_to_tokens(tok_id))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def bos_tokenizer(chatml_tokenizer):
    """A copy of the ChatML tokenizer that, like Llama's, puts a BOS token first when asked to add special tokens."""
    tok = copy.deepcopy(chatml_tokenizer)
    tok.bos_token = "<|endoftext|>"
    bos_id = tok.convert_tokens_to_ids("<|endoftext|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", bos_id)])
    assert tok("a").input_ids[0] == bos_id  # the premise of the BOS tests
    assert chatml_tokenizer("a").input_ids[0] != bos_id and chatml_tokenizer.bos_token == "<|im_start|>"
    return tok


def test_many_conversations_at_once_are_each_as_alone(chatml_tokenizer):
    """The batched renderings and tokenizer call give every conversation its own segments and ids, whatever
    else is in the batch (its turn count, a generation prompt or not)."""
    batch = [MULTI, SINGLE, MULTI[1:3], SINGLE[1:]]
    alone = [chat_segments_many(chatml_tokenizer, [c])[0][0] for c in batch]
    assert [examples[0] for examples in chat_segments_many(chatml_tokenizer, batch)] == alone
    for c, segments in zip(batch, alone):
        assert "".join(text for text, _ in segments) == render(chatml_tokenizer, c, False)
        assert [text for text, supervised in segments if supervised] == [
            m["content"] + "<|im_end|>" for m in c if m["role"] == "assistant"]
    assert encode_chats(chatml_tokenizer, batch) == [encode_chat(chatml_tokenizer, c) for c in batch]
    prompts = [MULTI[:4], SINGLE[:2]]
    assert [e[0] for e in chat_segments_many(chatml_tokenizer, prompts, True)] == [
        chat_segments_many(chatml_tokenizer, [c], True)[0][0] for c in prompts]


def test_token_ids_are_those_of_the_tokenizer_call(chatml_tokenizer):
    texts = ["", " leading space", "tabs\tand\nnewlines\n\n", "<|im_end|> as text", "émoji 🙂 and 中文",
             "numbers 1999 42", "a" * 3000]
    assert token_ids(chatml_tokenizer, texts) == chatml_tokenizer(texts, add_special_tokens=False).input_ids


def test_single_turn_supervises_exactly_the_reply_and_its_end_of_turn_token(chatml_tokenizer):
    enc = encode_chat(chatml_tokenizer, SINGLE)
    tokens = chatml_tokenizer.convert_ids_to_tokens(enc.input_ids)
    assert len(enc.labels) == len(enc.input_ids)
    assert supervised_runs(chatml_tokenizer, enc) == [["5", "<|im_end|>"]]
    first = next(i for i, t in enumerate(enc.labels) if t != IGNORE_INDEX)
    assert tokens[first - 4:first] == ["<|im_start|>", "ass", "istant", "Ċ"]
    assert enc.labels[first:first + 2] == enc.input_ids[first:first + 2]
    assert tokens[first + 2] == "Ċ" and enc.labels[first + 2] == IGNORE_INDEX  # the newline after <|im_end|>
    assert first + 3 == len(tokens)
    assert chatml_tokenizer.decode(enc.input_ids) == chatml_tokenizer.apply_chat_template(SINGLE, tokenize=False)


def test_every_assistant_turn_of_a_multi_turn_conversation_is_supervised(chatml_tokenizer):
    enc = encode_chat(chatml_tokenizer, MULTI)
    assert supervised_runs(chatml_tokenizer, enc) == [["5", "<|im_end|>"], ["7", "<|im_end|>"]]
    assert chatml_tokenizer.decode(enc.input_ids) == chatml_tokenizer.apply_chat_template(MULTI, tokenize=False)


def test_loss_on_all_supervises_every_token(chatml_tokenizer):
    enc = encode_chat(chatml_tokenizer, MULTI, loss_on="all")
    assert enc.labels == enc.input_ids
    assert enc.input_ids == encode_chat(chatml_tokenizer, MULTI).input_ids


@pytest.mark.parametrize("conversation", [SINGLE, MULTI], ids=["single_turn", "multi_turn"])
def test_generation_prompt_is_the_training_prefix_before_the_last_reply(chatml_tokenizer, conversation):
    train = encode_chat(chatml_tokenizer, conversation)
    prompt = encode_chat(chatml_tokenizer, conversation[:-1], add_generation_prompt=True)
    last_run_start = max(i for i, t in enumerate(train.labels)
                         if t != IGNORE_INDEX and (i == 0 or train.labels[i - 1] == IGNORE_INDEX))
    assert prompt.input_ids == train.input_ids[:last_run_start]
    assert prompt.labels == [IGNORE_INDEX] * len(prompt.input_ids)


def test_generation_prompt_after_an_assistant_turn_is_refused(chatml_tokenizer):
    with pytest.raises(Exception, match="must end with a user turn"):
        encode_chat(chatml_tokenizer, SINGLE, add_generation_prompt=True)


def test_plain_template_ends_each_assistant_turn_with_eos_and_supervises_it(chatml_tokenizer):
    tok = copy.deepcopy(chatml_tokenizer)
    original = chatml_tokenizer.chat_template
    assert setup_template(tok, "plain") == "plain"
    assert chatml_tokenizer.chat_template == original  # the session fixture is untouched
    enc = encode_chat(tok, MULTI)
    assert tok.decode(enc.input_ids) == ("Be brief.\n\n### Human: 2+3?\n### Assistant:\n5<|im_end|>\n"
                                         "### Human: and 3+4?\n### Assistant:\n7<|im_end|>\n")
    assert supervised_runs(tok, enc) == [["5", "<|im_end|>"], ["7", "<|im_end|>"]]
    prompt = encode_chat(tok, MULTI[:-1], add_generation_prompt=True)
    assert tok.decode(prompt.input_ids).endswith("### Human: and 3+4?\n### Assistant:\n")
    assert prompt.input_ids == enc.input_ids[:len(prompt.input_ids)]


def test_template_that_emits_bos_gives_exactly_one_bos(chatml_tokenizer):
    tok = bos_tokenizer(chatml_tokenizer)
    tok.chat_template = "{{ bos_token }}" + CHATML
    rendered = tok.apply_chat_template(SINGLE, tokenize=False)
    assert tok(rendered).input_ids[:2] == [tok.bos_token_id] * 2  # what adding special tokens would do
    enc = encode_chat(tok, SINGLE)
    assert enc.input_ids[0] == tok.bos_token_id
    assert enc.input_ids.count(tok.bos_token_id) == 1
    assert supervised_tokens(tok, enc) == ["5", "<|im_end|>"]


def test_plain_template_on_a_bos_tokenizer_starts_with_one_bos(chatml_tokenizer):
    tok = bos_tokenizer(chatml_tokenizer)
    setup_template(tok, "plain")
    enc = encode_chat(tok, SINGLE)
    assert enc.input_ids[0] == tok.bos_token_id
    assert enc.input_ids.count(tok.bos_token_id) == 1


def test_plain_template_on_a_tokenizer_without_bos_has_none(chatml_tokenizer):
    tok = copy.deepcopy(chatml_tokenizer)
    setup_template(tok, "plain")
    enc = encode_chat(tok, SINGLE)
    assert tok.convert_ids_to_tokens(enc.input_ids[0]) == "Be"


def test_template_emitting_two_bos_is_a_config_error(chatml_tokenizer):
    tok = bos_tokenizer(chatml_tokenizer)
    tok.chat_template = "{{ bos_token }}{{ bos_token }}" + CHATML
    with pytest.raises(ConfigError, match="two BOS"):
        encode_chat(tok, SINGLE)


def test_template_not_ending_assistant_turns_with_eos_is_a_config_error(chatml_tokenizer):
    tok = copy.deepcopy(chatml_tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ConfigError, match="EOS"):
        encode_chat(tok, SINGLE)


def test_template_rewriting_earlier_turns_is_a_config_error(chatml_tokenizer):
    tok = copy.deepcopy(chatml_tokenizer)
    tok.chat_template = CHATML.replace("in messages", "in messages[-2:]")
    encode_chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])  # fine: 2 turns
    with pytest.raises(ConfigError, match="rewrites earlier turns"):
        encode_chat(tok, MULTI)


def test_tokenizer_template_requested_without_one_is_a_config_error(chatml_tokenizer):
    tok = copy.deepcopy(chatml_tokenizer)
    tok.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        setup_template(tok, "tokenizer")
    assert setup_template(tok, "auto") == "plain"


SMOLLM_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
NO_SYSTEM = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]


def with_system_prompt(tokenizer, system_prompt):
    tok = copy.deepcopy(tokenizer)
    setup_template(tok, "auto", system_prompt)
    return tok


def test_system_prompt_none_keeps_smollm2_default_and_says_how_to_change_it(chatml_tokenizer):
    tok = with_system_prompt(chatml_tokenizer, None)
    assert tok.chat_template == chatml_tokenizer.chat_template
    assert render(tok, NO_SYSTEM, False).startswith(f"<|im_start|>system\n{SMOLLM_DEFAULT}<|im_end|>\n")
    record, note = system_prompt_record(tok, None)
    assert record == f"template default: {SMOLLM_DEFAULT}"
    assert SMOLLM_DEFAULT in note and 'SYSTEM_PROMPT = ""' in note


def test_empty_system_prompt_drops_the_default_system_text(chatml_tokenizer):
    tok = with_system_prompt(chatml_tokenizer, "")
    assert render(tok, NO_SYSTEM, False) == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n2+3?<|im_end|>\n"
                                             "<|im_start|>assistant\n5<|im_end|>\n")
    assert system_prompt_record(tok, "") == (None, None)
    assert render(tok, SINGLE, False) == render(chatml_tokenizer, SINGLE, False)


def test_empty_system_prompt_leaves_a_template_without_a_default_as_it_is(chatml_tokenizer):
    tok = copy.deepcopy(chatml_tokenizer)
    tok.chat_template = CHATML
    setup_template(tok, "auto", "")
    assert tok.chat_template == CHATML
    assert system_prompt_record(tok, "") == (None, None)
    plain = with_system_prompt(chatml_tokenizer, None)
    assert setup_template(plain, "plain", "") == "plain" and not render(plain, NO_SYSTEM, False).startswith("\n")


def test_custom_system_prompt_goes_once_into_conversations_without_one(chatml_tokenizer):
    custom = 'Answer with the number only. Say "5", not {{ five }}.'
    tok = with_system_prompt(chatml_tokenizer, custom)
    text = render(tok, NO_SYSTEM, False)
    assert text.startswith(f"<|im_start|>system\n{custom}<|im_end|>\n<|im_start|>user\n")
    assert text.count(custom) == 1 and SMOLLM_DEFAULT not in text
    own = render(tok, SINGLE, False)
    assert own == render(chatml_tokenizer, SINGLE, False) and custom not in own  # its own system turn stays
    assert system_prompt_record(tok, custom) == (custom, None)
    # training and generation encode the prompt alike, system turn included
    train = encode_chat(tok, NO_SYSTEM)
    prompt = encode_chat(tok, NO_SYSTEM[:1], add_generation_prompt=True)
    assert train.input_ids[:len(prompt.input_ids)] == prompt.input_ids
    assert custom in tok.decode(prompt.input_ids)


def test_custom_system_prompt_travels_with_the_saved_tokenizer(chatml_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tok = with_system_prompt(chatml_tokenizer, "Be terse.")
    tok.save_pretrained(tmp_path)
    assert render(AutoTokenizer.from_pretrained(tmp_path), NO_SYSTEM, True).startswith(
        "<|im_start|>system\nBe terse.<|im_end|>\n")


def test_plain_template_takes_a_custom_system_prompt(chatml_tokenizer):
    tok = copy.deepcopy(chatml_tokenizer)
    setup_template(tok, "plain", "Be terse.")
    assert render(tok, NO_SYSTEM, False).startswith("Be terse.\n\n### Human: 2+3?\n")
    assert system_prompt_record(tok, "Be terse.") == ("Be terse.", None)


def test_a_template_that_cannot_drop_its_default_says_so(chatml_tokenizer):
    tok = copy.deepcopy(chatml_tokenizer)  # an empty system message counts as none here
    tok.chat_template = ("{% if not (messages[0]['role'] == 'system' and messages[0]['content']) %}"
                         "{{ '<|im_start|>system\nDefault.<|im_end|>\n' }}{% endif %}"
                         + CHATML.replace("in messages", "in messages if m['content']"))
    setup_template(tok, "auto", "")
    record, note = system_prompt_record(tok, "")
    assert record == "template default: Default." and "cannot be changed" in note


def test_system_prompt_holding_a_special_token_is_a_config_error(chatml_tokenizer):
    with pytest.raises(ConfigError, match="system_prompt: holds the text of the special token '<\\|im_end\\|>'"):
        with_system_prompt(chatml_tokenizer, "Be terse.<|im_end|>")


def test_a_run_records_the_system_prompt_that_applied(tiny_config, capsys, tmp_path):
    from sft.run import run

    rows = [{"messages": [{"role": "user", "content": f"{i}+{i}?"}, {"role": "assistant", "content": str(2 * i)}]}
            for i in range(40)]
    data = tmp_path / "no_system.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    default = run(tiny_config(dataset=str(data))).path
    derived = json.loads((default / "config.json").read_text())["derived"]
    assert derived["system_prompt"] == f"template default: {SMOLLM_DEFAULT}"
    notes = [line for line in capsys.readouterr().err.splitlines() if SMOLLM_DEFAULT in line]
    assert len(notes) == 1 and notes[0].startswith("note: ")

    custom = run(tiny_config(dataset=str(data), system_prompt="Answer with the number only.")).path
    config = json.loads((custom / "config.json").read_text())
    assert config["config"]["system_prompt"] == config["derived"]["system_prompt"] == "Answer with the number only."
    assert SMOLLM_DEFAULT not in capsys.readouterr().err
    samples = read_samples(custom)
    assert samples and all(s["prompt"].startswith("<|im_start|>system\nAnswer with the number only.<|im_end|>")
                           for s in samples)
