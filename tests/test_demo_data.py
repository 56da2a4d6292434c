"""The embedded demo sets: the tasks set is as it was, every row of each set is well formed and correct,
reasoning agrees with the answer, tool results are what the tools return, and seeds and `n` behave."""
from __future__ import annotations

import doctest
import hashlib
import json
import re

import pytest

import sft.demo_data
from sft.demo_data import (CAPITALS, EMBEDDED_DATASETS, OPPOSITES, REASONING_SYSTEM, TOOLS, TOOLS_SYSTEM, calculator,
                           demo_rows, lookup, reasoning_rows, tool_rows)

SETS = [demo_rows, reasoning_rows, tool_rows]
ARITHMETIC = re.compile(r"What is (\d+) ([+*-]) (\d+)\?")


def user_prompts(rows: list[dict]) -> list[str]:
    return [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in rows]


def test_demo_rows_are_unchanged():
    rows = demo_rows()
    assert len(rows) == 620
    assert rows[0] == {"messages": [{"role": "system", "content": "Reply with the answer only."},
                                    {"role": "user", "content": "What is 32 - 3?"},
                                    {"role": "assistant", "content": "29"}]}
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    assert digest == "94436d4e0801c559763387b453cf7376bc6b780b7f21637bebed7f9e0c59cd2f"
    digest = hashlib.sha256(json.dumps(demo_rows(seed=1), sort_keys=True).encode()).hexdigest()
    assert digest == "fcf045069771174f156ecac6a3e78840cc700ba77e78e1f20d8a938c041780fc"


def test_registry_names_each_set_and_calls_it_with_a_row_count():
    assert EMBEDDED_DATASETS == {"embedded:demo-tasks": demo_rows, "embedded:demo-reasoning": reasoning_rows,
                                 "embedded:demo-tools": tool_rows}
    for rows_of in EMBEDDED_DATASETS.values():
        assert rows_of(7) == rows_of()[:7]


@pytest.mark.parametrize("rows_of", SETS, ids=lambda f: f.__name__)
def test_prompts_are_unique_and_the_set_is_a_few_hundred_rows(rows_of):
    prompts = user_prompts(rows_of())
    assert 600 <= len(prompts) <= 900 and len(set(prompts)) == len(prompts)


@pytest.mark.parametrize("rows_of", SETS, ids=lambda f: f.__name__)
def test_a_seed_shuffles_deterministically_and_n_truncates(rows_of):
    assert rows_of(seed=3) == rows_of(seed=3)
    assert user_prompts(rows_of(seed=3)) != user_prompts(rows_of(seed=4))
    assert rows_of(25, seed=3) == rows_of(seed=3)[:25] and len(rows_of(25, seed=3)) == 25


@pytest.mark.parametrize("rows_of", SETS, ids=lambda f: f.__name__)
def test_rows_survive_a_json_round_trip(rows_of):
    rows = rows_of()
    assert json.loads(json.dumps(rows)) == rows


def test_the_module_docstring_examples_are_true():
    result = doctest.testmod(sft.demo_data)
    assert result.attempted >= 5 and result.failed == 0


# reasoning

def test_reasoning_rows_are_system_user_assistant_with_reasoning_and_a_bare_answer():
    for row in reasoning_rows():
        assert list(row) == ["messages"]
        system, user, assistant = row["messages"]
        assert system == {"role": "system", "content": REASONING_SYSTEM} and user["role"] == "user"
        assert set(assistant) == {"role", "reasoning_content", "content"} and assistant["role"] == "assistant"
        assert assistant["content"] and assistant["content"] == assistant["content"].strip()


def test_reasoning_is_one_or_two_short_sentences_containing_the_answer():
    for row in reasoning_rows():
        reasoning, answer = row["messages"][2]["reasoning_content"], row["messages"][2]["content"]
        assert len(reasoning) <= 80 and reasoning.endswith(".") and reasoning.count(". ") <= 1
        assert answer in reasoning


def test_reasoning_covers_arithmetic_and_every_task_family():
    prompts = user_prompts(reasoning_rows())
    starts = ["What is", "Which is larger", "What is the capital of", "What is the opposite of",
              "Which day comes after", "Which month comes after", "Write in capital letters",
              "What is the first letter of", "How many letters are in"]
    for start in starts:
        assert sum(p.startswith(start) for p in prompts) >= 7, start
    for op in "+-":
        assert sum(bool(m) and m[2] == op for m in map(ARITHMETIC.fullmatch, prompts)) >= 100


def test_arithmetic_reasoning_steps_are_each_correct_and_end_at_the_answer():
    equation = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)")
    for row in reasoning_rows():
        prompt = row["messages"][1]["content"]
        reasoning, answer = row["messages"][2]["reasoning_content"], row["messages"][2]["content"]
        if not (m := ARITHMETIC.fullmatch(prompt)):
            continue
        a, op, b = int(m[1]), m[2], int(m[3])
        assert answer == str(a + b if op == "+" else a - b)
        steps = equation.findall(reasoning)
        assert steps, reasoning
        for x, o, y, z in steps:
            assert int(z) == (int(x) + int(y) if o == "+" else int(x) - int(y)), reasoning
        if then := re.search(r"= (\d+), (plus|minus) (\d+) is (\d+)\.$", reasoning):
            z, o, u, y = then.groups()
            assert int(y) == (int(z) + int(u) if o == "plus" else int(z) - int(u)) == int(answer), reasoning
        else:
            assert reasoning.endswith(f" {answer}."), reasoning


def test_comparison_reasoning_names_the_tens_and_the_larger_number():
    for row in reasoning_rows():
        prompt, reasoning = row["messages"][1]["content"], row["messages"][2]["reasoning_content"]
        if m := re.fullmatch(r"Which is larger, (\d+) or (\d+)\?", prompt):
            a, b = int(m[1]), int(m[2])
            assert row["messages"][2]["content"] == str(max(a, b))
            assert reasoning.endswith(f", so {max(a, b)} is larger.")
            if a // 10 != b // 10:
                assert reasoning.startswith(f"{max(a, b)} has {max(a, b) // 10} tens and {min(a, b)} has "
                                            f"{min(a, b) // 10},")
            else:
                assert re.match(rf"{a} and {b} both have {a // 10} tens?; {max(a, b) % 10} is more than "
                                rf"{min(a, b) % 10},", reasoning), reasoning


def test_word_reasoning_spells_the_word_and_counts_its_letters():
    seen = 0
    for row in reasoning_rows():
        prompt, reasoning = row["messages"][1]["content"], row["messages"][2]["reasoning_content"]
        answer = row["messages"][2]["content"]
        if m := re.fullmatch(r"How many letters are in (\w+)\?", prompt):
            letters = re.search(r"the letters ([a-z, ]+):", reasoning)[1].split(", ")
            assert "".join(letters) == m[1] and answer == str(len(letters)) == str(len(m[1]))
            seen += 1
        elif m := re.fullmatch(r"What is the first letter of (\w+)\?", prompt):
            assert answer == m[1][0] and f"is spelt {', '.join(m[1])};" in reasoning
            seen += 1
        elif m := re.fullmatch(r"Write in capital letters: (.+)", prompt):
            assert answer == m[1].upper()
        elif m := re.fullmatch(r"What is the capital of (.+)\?", prompt):
            assert answer == CAPITALS[m[1]]
        elif m := re.fullmatch(r"What is the opposite of (.+)\?", prompt):
            assert answer == OPPOSITES[m[1]]
    assert seen >= 100


# tools

def test_tools_offered_are_the_calculator_and_lookup_schemas():
    assert [t["function"]["name"] for t in TOOLS] == ["calculator", "lookup"]
    for tool in TOOLS:
        params = tool["function"]["parameters"]
        assert tool["type"] == "function" and tool["function"]["description"]
        assert params["type"] == "object" and params["required"] == list(params["properties"])
        assert all(p["type"] == "string" for p in params["properties"].values())


def test_every_tool_row_is_a_direct_answer_or_calls_then_results_then_the_answer():
    for row in tool_rows():
        assert row["tools"] == TOOLS and row["tools"] is not TOOLS
        messages = row["messages"]
        assert messages[0] == {"role": "system", "content": TOOLS_SYSTEM} and messages[1]["role"] == "user"
        if len(messages) == 3:
            assert messages[2]["role"] == "assistant" and "tool_calls" not in messages[2] and messages[2]["content"]
            continue
        call_turn, *tool_turns, final = messages[2:]
        calls = call_turn["tool_calls"]
        assert call_turn["role"] == "assistant" and call_turn["content"] == "" and len(calls) in (1, 2)
        assert [t["role"] for t in tool_turns] == ["tool"] * len(calls)
        assert final["role"] == "assistant" and "tool_calls" not in final
        for call, result in zip(calls, tool_turns):
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            assert call["type"] == "function" and result["name"] == name
            if name == "calculator":
                assert list(arguments) == ["expression"]
                assert re.fullmatch(r"\d+ [+*-] \d+", arguments["expression"])
                assert result["content"] == str(eval(arguments["expression"]))
            else:
                assert name == "lookup" and list(arguments) == ["topic"]
                kind, _, key = arguments["topic"].partition(" of ")
                assert result["content"] == {"capital": CAPITALS, "opposite": OPPOSITES}[kind][key]
        assert final["content"] == " and ".join(t["content"] for t in tool_turns)


def test_each_call_asks_for_what_the_question_asks():
    for row in tool_rows():
        question, calls = row["messages"][1]["content"], row["messages"][2].get("tool_calls", [])
        asked = [a for a in re.split(r"What is | and what is |\?", question) if a]
        if calls:
            wanted = [c["function"]["arguments"].get("expression") or "the " + c["function"]["arguments"]["topic"]
                      for c in calls]
            assert asked == wanted, question
        else:
            assert not ARITHMETIC.fullmatch(question) and "capital of" not in question


def test_about_a_fifth_need_no_tool_and_some_need_two_calls():
    rows = tool_rows()
    calls = [len(r["messages"][2].get("tool_calls", [])) for r in rows]
    assert 0.15 <= calls.count(0) / len(rows) <= 0.25
    assert calls.count(2) >= 40
    names = {c["function"]["name"] for r in rows for c in r["messages"][2].get("tool_calls", [])}
    assert names == {"calculator", "lookup"}
    mixed = [r for r in rows if {c["function"]["name"] for c in r["messages"][2].get("tool_calls", [])}
             == {"calculator", "lookup"}]
    assert mixed


def test_calculator_evaluates_arithmetic_and_refuses_anything_else():
    assert calculator("3 + 22") == "25" and calculator("2 + 3 * 4") == "14" and calculator("-5 + 2") == "-3"
    for bad in ["__import__('os')", "2 ** 10", "1 / 2", "1.5 + 1", "3 +", "x + 1"]:
        with pytest.raises(ValueError, match="calculator"):
            calculator(bad)


def test_lookup_answers_capitals_and_opposites_in_any_case_and_nothing_else():
    assert lookup("capital of South Korea") == "Seoul" and lookup(" Capital of south korea ") == "Seoul"
    assert lookup("opposite of heavy") == "light"
    assert lookup("capital of Atlantis") == lookup("weather of Paris") == lookup("") == "unknown topic"
