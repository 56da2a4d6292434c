from collections import Counter

import pytest

from sft.errors import ConfigError, DataError
from sft.formats import (
    FORMATS,
    REJECT_REASONS,
    MalformedRow,
    convert_rows,
    detect_format,
    row_to_messages,
    validate_conversation,
)


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


def reject_reason(row, fmt):
    with pytest.raises(MalformedRow) as info:
        row_to_messages(row, fmt)
    return info.value.reason


# guanaco


def test_guanaco_keeps_all_turns_and_tolerates_irregular_whitespace():
    text = (
        "\n  ### Human: What is 2+2?### Assistant: 4.\n\n"
        "###Human:   And 3+3?\n###  Assistant :6, because\n3+3=6.\n"
        "### human: Thanks!   ### Assistant:\n\nYou're welcome.  "
    )
    assert row_to_messages({"text": text}, "guanaco") == [
        U("What is 2+2?"),
        A("4."),
        U("And 3+3?"),
        A("6, because\n3+3=6."),
        U("Thanks!"),
        A("You're welcome."),
    ]


def test_guanaco_markdown_headings_stay_in_the_content():
    text = "### Human: Format it.### Assistant: ### Step 1\nDo it."
    assert row_to_messages({"text": text}, "guanaco") == [U("Format it."), A("### Step 1\nDo it.")]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("### Human: a ### Human: b ### Assistant: c", "turns_not_alternating"),
        ("### Human: a ### Assistant: b ### Assistant: c", "turns_not_alternating"),
        ("### Assistant: a ### Human: b ### Assistant: c", "not_starting_with_user"),
        ("Preamble ### Human: a ### Assistant: b", "not_starting_with_user"),
        ("just prose, no markers", "not_starting_with_user"),
        ("### Human: a ### Assistant: b ### Human: c", "no_assistant_turn"),
        ("### Human: a", "no_assistant_turn"),
        ("### Human: a ### Assistant:   \n", "empty_content"),
        ("### Human: ### Assistant: b", "empty_content"),
        ("   ", "empty_content"),
    ],
)
def test_guanaco_rejects(text, reason):
    assert reject_reason({"text": text}, "guanaco") == reason


def test_guanaco_rejects_are_counted_and_good_rows_kept_in_order():
    rows = [
        {"text": "### Human: one ### Assistant: 1"},
        {"text": "### Human: a ### Human: b ### Assistant: c"},
        {"text": None},
        {"text": "### Human: two ### Assistant: 2"},
        {"text": "### Human: x ### Assistant: y ### Assistant: z"},
    ]
    kept, rejected, numbers = convert_rows(rows, "guanaco")
    assert kept == [[U("one"), A("1")], [U("two"), A("2")]]
    assert numbers == [1, 4]  # the rows they came from
    assert rejected == Counter({"turns_not_alternating": 2, "wrong_type": 1})
    assert list(rejected) == ["turns_not_alternating", "wrong_type"]


# dolphin


def test_dolphin_instruction_is_the_system_prompt():
    row = {"instruction": "You are terse.", "input": "Capital of France?", "output": "Paris."}
    assert row_to_messages(row, "dolphin") == [S("You are terse."), U("Capital of France?"), A("Paris.")]


def test_dolphin_empty_instruction_gives_no_system_message():
    row = {"instruction": "", "input": "Capital of France?", "output": "Paris."}
    assert row_to_messages(row, "dolphin") == [U("Capital of France?"), A("Paris.")]


def test_dolphin_empty_input_makes_the_instruction_the_user_turn():
    row = {"instruction": "Name a prime.", "input": "  ", "output": "7"}
    assert row_to_messages(row, "dolphin") == [U("Name a prime."), A("7")]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"instruction": "", "input": "", "output": "x"}, "empty_content"),
        ({"instruction": "s", "input": "q", "output": " "}, "empty_content"),
        ({"instruction": "s", "output": "x"}, "missing_field"),
        ({"instruction": "s", "input": None, "output": "x"}, "wrong_type"),
        ({"instruction": "s", "input": "q", "output": 3}, "wrong_type"),
    ],
)
def test_dolphin_rejects(row, reason):
    assert reject_reason(row, "dolphin") == reason


# alpaca


def test_alpaca_with_input_joins_instruction_and_input():
    row = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    assert row_to_messages(row, "alpaca") == [U("Translate to French.\n\nGood morning"), A("Bonjour")]


@pytest.mark.parametrize(
    "row",
    [{"instruction": "Say hi.", "input": "", "output": "Hi"}, {"instruction": "Say hi.", "output": "Hi"}],
)
def test_alpaca_without_input_uses_the_instruction_alone(row):
    assert row_to_messages(row, "alpaca") == [U("Say hi."), A("Hi")]


def test_alpaca_input_none_counts_as_absent():
    row = {"instruction": "Say hi.", "input": None, "output": "Hi"}
    assert row_to_messages(row, "alpaca") == [U("Say hi."), A("Hi")]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"instruction": "", "input": "text", "output": "x"}, "empty_content"),
        ({"instruction": "do", "output": ""}, "empty_content"),
        ({"output": "x"}, "missing_field"),
        ({"instruction": "do", "input": ["a"], "output": "x"}, "wrong_type"),
    ],
)
def test_alpaca_rejects(row, reason):
    assert reject_reason(row, "alpaca") == reason


# messages


def test_messages_with_system_message_drops_extra_keys():
    row = {"messages": [{**S("Be kind."), "name": "sys"}, U("Hi"), A("Hello"), U("Bye"), A("Bye!")]}
    assert row_to_messages(row, "messages") == [S("Be kind."), U("Hi"), A("Hello"), U("Bye"), A("Bye!")]


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([{"role": "human", "content": "Hi"}, A("Hello")], "unknown_role"),
        ([U("Hi"), {"role": "gpt", "content": "Hello"}], "unknown_role"),
        ([U("Hi"), S("late"), A("Hello")], "system_not_first"),
        ([S("a"), S("b"), U("Hi"), A("Hello")], "system_not_first"),
        ([A("Hello"), U("Hi"), A("Again")], "not_starting_with_user"),
        ([U("Hi"), U("Hi again"), A("Hello")], "turns_not_alternating"),
        ([U("Hi")], "no_assistant_turn"),
        ([S("sys")], "no_assistant_turn"),
        ([], "no_assistant_turn"),
        ([U("Hi"), A("")], "empty_content"),
        ([U("Hi"), {"role": "assistant"}], "missing_field"),
        ([U("Hi"), {"role": "assistant", "content": None}], "wrong_type"),
        ([U("Hi"), "Hello"], "wrong_type"),
        ("not a list", "wrong_type"),
        (None, "wrong_type"),
    ],
)
def test_messages_rejects(messages, reason):
    assert reject_reason({"messages": messages}, "messages") == reason


def test_validate_conversation_accepts_the_internal_form_unchanged():
    conv = [S("sys"), U("q"), A("a")]
    assert validate_conversation(conv) == conv


# sharegpt


def test_sharegpt_maps_from_value_and_role_aliases():
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "user", "value": "Bye"},
            {"from": "assistant", "value": "Bye!"},
        ]
    }
    assert row_to_messages(row, "sharegpt") == [S("Be brief."), U("Hi"), A("Hello"), U("Bye"), A("Bye!")]


@pytest.mark.parametrize(
    "turns, reason",
    [
        ([{"from": "human", "value": "Hi"}, {"from": "function_call", "value": "{}"}], "unknown_role"),
        ([{"from": "human", "value": "Hi"}, {"from": "gpt"}], "missing_field"),
        ([{"from": "human", "value": "Hi"}, {"from": None, "value": "x"}], "wrong_type"),
        ([{"from": "human", "value": "Hi"}, {"from": "human", "value": "?"}], "turns_not_alternating"),
        ([{"from": "human", "value": "Hi"}], "no_assistant_turn"),
    ],
)
def test_sharegpt_rejects(turns, reason):
    assert reject_reason({"conversations": turns}, "sharegpt") == reason


# prompt_completion


def test_prompt_completion_is_one_exchange():
    row = {"prompt": "2+2=", "completion": " 4"}
    assert row_to_messages(row, "prompt_completion") == [U("2+2="), A(" 4")]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "2+2="}, "missing_field"),
        ({"prompt": "2+2=", "completion": None}, "wrong_type"),
        ({"prompt": "", "completion": "4"}, "empty_content"),
        ("not a row", "wrong_type"),
    ],
)
def test_prompt_completion_rejects(row, reason):
    assert reject_reason(row, "prompt_completion") == reason


# detection and format names


@pytest.mark.parametrize(
    "columns, fmt",
    [
        (["messages"], "messages"),
        (["messages", "id"], "messages"),
        (["conversations", "id"], "sharegpt"),
        (["text"], "guanaco"),
        (["prompt", "completion"], "prompt_completion"),
        (["id", "instruction", "input", "output"], "alpaca"),
        (["instruction", "input", "output"], "dolphin"),
        (["instruction", "output"], "alpaca"),
        (["instruction", "input", "output", "text"], "alpaca"),  # tatsu-lab/alpaca's columns
    ],
)
def test_detect_format(columns, fmt):
    assert detect_format(columns) == fmt


def test_detect_format_failure_lists_columns_found_and_formats_expected():
    with pytest.raises(DataError) as info:
        detect_format(["question", "answer"])
    assert str(info.value) == (
        "cannot detect the dataset format from its columns ['answer', 'question']; expected the columns of "
        "one of: messages (messages); sharegpt (conversations); prompt_completion (prompt, completion); "
        "dolphin (instruction, input, output); alpaca (instruction, output); guanaco (text)"
    )


def test_unknown_format_name_is_a_config_error_listing_known_formats():
    with pytest.raises(ConfigError) as info:
        convert_rows([], "orca")
    assert str(info.value) == (
        "unknown dataset format 'orca'; known formats: "
        "messages, sharegpt, prompt_completion, dolphin, alpaca, guanaco (or 'auto')"
    )
    with pytest.raises(ConfigError, match="unknown dataset format 'orca'"):
        row_to_messages({"text": "x"}, "orca")


def test_format_names_and_reject_reason_keys_are_stable():
    assert list(FORMATS) == ["messages", "sharegpt", "prompt_completion", "dolphin", "alpaca", "guanaco"]
    assert REJECT_REASONS == (
        "missing_field",
        "wrong_type",
        "empty_content",
        "unknown_role",
        "system_not_first",
        "not_starting_with_user",
        "turns_not_alternating",
        "no_assistant_turn",
    )
