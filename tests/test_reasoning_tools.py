"""Reasoning and tool calls through the data path, the run folder and generation: rows in, examples, stats,
the recorded template traits, the metrics."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from sft.data import prepare_data, set_aside
from sft.errors import SFTError
from sft.generation import task_metric
from sft.template_traits import Reply, parse_reply
from sft.templates import IGNORE_INDEX, prompt_and_reference, setup_template
from conftest import write_jsonl

pytestmark = pytest.mark.usefixtures("cache_dir")

QWEN3 = None
try:
    import trl

    QWEN3 = Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja"
except ImportError:
    pass


def reasoning_row(i: int) -> dict:
    return {"messages": [
        {"role": "user", "content": f"What is {i} + {i}?"},
        {"role": "assistant", "content": f"<think>\n{i} and {i} make {2 * i}.\n</think>\n\n{2 * i}"},
        {"role": "user", "content": f"And {i} - 1?"},
        {"role": "assistant", "content": str(i - 1), "reasoning_content": f"One less than {i}.", "weight": 1}]}


def tool_row(i: int) -> dict:
    call = {"type": "function", "function": {"name": "calculator", "arguments": json.dumps({"expression": f"{i} * 3"})}}
    return {"messages": [
        {"role": "user", "content": f"What is {i} * 3?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "calculator", "content": str(i * 3)},
        {"role": "assistant", "content": f"It is {i * 3}."}],
        "tools": [{"type": "function", "function": {"name": "calculator", "parameters": {
            "type": "object", "properties": {"expression": {"type": "string"}}}}}]}


def supervised_texts(tokenizer, example) -> list[str]:
    runs, current = [], []
    for label in example.targets:  # target k is token k + 1, or IGNORE_INDEX
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(r) for r in runs + ([current] if current else [])]


def qwen3_tokenizer(tokenizer):
    if QWEN3 is None:
        pytest.skip("trl's chat templates are not installed")
    tok = copy.deepcopy(tokenizer)
    setup_template(tok, str(QWEN3))
    return tok


@pytest.mark.parametrize("multi_turn, per_row", [("per_turn", {"2": 12}), ("last_turn", {"1": 12})])
def test_qwen3_rows_become_one_example_per_rewritten_turn(tiny_config, tokenizer, tmp_path, multi_turn, per_row):
    tok = qwen3_tokenizer(tokenizer)
    cfg = tiny_config(dataset=write_jsonl(tmp_path / "r.jsonl", [reasoning_row(i) for i in range(3, 19)]),
                      eval_rows=4, template=str(QWEN3), multi_turn=multi_turn, max_length=256)
    data = prepare_data(cfg, tok)
    assert data.stats["train"]["multi_turn"]["examples_per_conversation"] == per_row
    assert data.stats["train"]["multi_turn"]["mode"] == multi_turn
    assert data.stats["train"]["multi_turn"]["turns_by_role"] == {"user": 24, "assistant": 24}
    assert data.stats["rows_kept"] == 16 and data.stats["fields_ignored"] == {"weight": 16}
    assert any("weight" in line for line in set_aside(data.stats))
    spans = [s for e in data.train for s in supervised_texts(tok, e)]
    if multi_turn == "per_turn":
        assert len(spans) == 24 and sum("make" in s for s in spans) == 12  # each first turn with its reasoning
        first = next(s for s in spans if "make" in s)
        assert first.startswith("<think>\n") and first.endswith("</think>\n\n" + first.split("\n\n")[-1])
    else:
        assert len(spans) == 12 and not any("make" in s for s in spans)


def test_a_rewriting_template_with_multi_turn_error_names_the_row_and_the_template(tiny_config, tokenizer, tmp_path):
    tok = qwen3_tokenizer(tokenizer)
    cfg = tiny_config(dataset=write_jsonl(tmp_path / "r.jsonl", [reasoning_row(i) for i in range(3, 19)]),
                      eval_rows=4, template=str(QWEN3), multi_turn="error", max_length=256)
    with pytest.raises(SFTError, match=r"row \d+, with the chat template .*qwen3.jinja.*rewrites earlier turns"):
        prepare_data(cfg, tok)


def test_reasoning_on_a_template_without_a_place_for_it_is_an_error_naming_reasoning_tags(tiny_config, tokenizer,
                                                                                           tmp_path):
    cfg = tiny_config(dataset=write_jsonl(tmp_path / "r.jsonl", [reasoning_row(i) for i in range(3, 19)]),
                      eval_rows=4, max_length=256)
    with pytest.raises(SFTError, match=r"row \d+, with the chat template of .*reasoning_tags"):
        prepare_data(cfg, tokenizer)
    tagged = copy.deepcopy(tokenizer)
    setup_template(tagged, "auto", None, ("<think>", "</think>"))
    data = prepare_data(cfg.replace(reasoning_tags=("<think>", "</think>")), tagged)
    assert data.stats["train"]["multi_turn"]["examples_per_conversation"] == {"1": 12}  # inline: a prefix template
    assert any(s.startswith("<think>\nOne less than") for e in data.train for s in supervised_texts(tagged, e))


def test_tool_rows_supervise_calls_and_answers_but_not_results(tiny_config, tokenizer, tmp_path):
    tok = copy.deepcopy(tokenizer)
    setup_template(tok, "chatml-tools")
    cfg = tiny_config(dataset=write_jsonl(tmp_path / "t.jsonl", [tool_row(i) for i in range(10, 30)]),
                      eval_rows=4, template="chatml-tools", max_length=256)
    data = prepare_data(cfg, tok)
    assert data.stats["train"]["multi_turn"]["examples_per_conversation"] == {"1": 16}
    assert data.eval_tools and all(t[0]["function"]["name"] == "calculator" for t in data.eval_tools)
    for example in data.train:
        call, answer = supervised_texts(tok, example)
        assert call.startswith('<tool_call>{"name": "calculator", "arguments": {"expression": "')
        assert call.endswith("}}</tool_call><|im_end|>") and answer.startswith("It is ")
        assert "calculator" in tok.decode(example.input_ids)  # the tools are in the system turn
    prompt, reference = prompt_and_reference(data.eval_conversations[0], "tool_call_match")
    assert prompt[-1]["role"] == "user" and json.loads(reference)[0]["name"] == "calculator"


def test_a_tool_call_the_template_cannot_render_is_an_error(tiny_config, tokenizer, tmp_path):
    cfg = tiny_config(dataset=write_jsonl(tmp_path / "t.jsonl", [tool_row(i) for i in range(10, 30)]),
                      eval_rows=4, max_length=256)
    with pytest.raises(SFTError, match="does not render tool calls"):
        prepare_data(cfg, tokenizer)  # SmolLM2's own template has no tool calls


def test_generated_replies_split_into_reasoning_answer_and_calls_in_the_templates_format(tokenizer):
    tok = copy.deepcopy(tokenizer)
    setup_template(tok, "chatml-tools")
    reply = parse_reply(tok, '<think>\nadd them\n</think>\n\n<tool_call>{"name": "calculator", "arguments": '
                             '{"expression": "2 + 2"}}</tool_call>\n<tool_call>{"name": "lookup", "arguments": '
                             '{"topic": "capital of Peru"}}</tool_call><|im_end|>')
    assert reply == Reply("", "add them", ({"name": "calculator", "arguments": {"expression": "2 + 2"}},
                                           {"name": "lookup", "arguments": {"topic": "capital of Peru"}}))
    assert parse_reply(tok, "  Lima.<|im_end|>") == Reply("Lima.")


def test_the_task_metrics_compare_the_answer_and_the_calls(tokenizer):
    calls = json.dumps([{"name": "calculator", "arguments": {"expression": "2 + 2"}}])
    right = Reply("", None, ({"name": "calculator", "arguments": '{"expression": "2 + 2"}'},))  # JSON text
    wrong = Reply("", None, ({"name": "calculator", "arguments": {"expression": "2+2"}},))
    assert task_metric("tool_call_match", [right, wrong, Reply("4")], [calls, calls, "[]"]) == pytest.approx(2 / 3)
    assert task_metric("exact_match", [Reply("4", "2 + 2 is 4"), Reply("5")], ["4", "4"]) == 0.5


def test_a_run_records_the_template_traits_and_the_multi_turn_counts(tiny_config, tmp_path):
    from sft.run import run

    cfg = tiny_config(dataset=write_jsonl(tmp_path / "t.jsonl", [tool_row(i) for i in range(10, 40)]),
                      template="chatml-tools", max_length=256, task_metric="tool_call_match", max_steps=2)
    path = run(cfg).path
    derived = json.loads((path / "config.json").read_text())["derived"]
    assert derived["chat_template"] == {"reasoning": "reasoning_content", "tool_calls": True, "tool_results": True,
                                        "end_of_turn": ["<|im_end|>"]}
    assert derived["multi_turn"]["train"]["examples_per_conversation"] == {"1": 22}
    stats = json.loads((path / "data_stats.json").read_text())
    assert stats["train"]["multi_turn"]["mode"] == "per_turn"
    samples = [json.loads(line) for line in (path / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["tools"][0]["function"]["name"] == "calculator" for s in samples)
    assert all(json.loads(s["reference"])[0]["name"] == "calculator" for s in samples)
