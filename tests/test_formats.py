import doctest
import json
from collections import Counter

import pytest

from sft import formats
from sft.errors import ConfigError, DataError
from sft.formats import (
    FORMATS,
    REJECT_REASONS,
    Conversation,
    MalformedRow,
    content_chars,
    detect_format,
    row_to_conversation,
    row_to_messages,
    validate_conversation,
    validate_tools,
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
    kept, rejected, numbers = [], Counter(), []
    for number, row in enumerate(rows, 1):
        try:
            kept.append(row_to_messages(row, "guanaco"))
            numbers.append(number)
        except MalformedRow as e:
            rejected[e.reason] += 1
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
        ([{"from": "human", "value": "Hi"}, {"from": "function", "value": "{}"}], "unknown_role"),
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
        row_to_conversation({}, "orca")
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
        "reasoning_twice",
        "bad_tool_call",
        "tool_without_call",
        "call_without_result",
        "bad_tools",
    )


# reasoning and tool use


def R(content, reasoning=None, calls=None):
    """An assistant message in the normalized form."""
    m = A(content)
    if reasoning is not None:
        m["reasoning_content"] = reasoning
    if calls is not None:
        m["tool_calls"] = calls
    return m


def T(content, **keys):
    return {"role": "tool", "content": content, **keys}


def call(name, arguments, **keys):
    return {"type": "function", "function": {"name": name, "arguments": arguments}, **keys}


WEATHER = call("weather", {"city": "Paris"})
WEATHER_TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


def convert(messages, **columns):
    return row_to_conversation({"messages": messages, **columns}, "messages")


def test_docstring_examples_are_true():
    result = doctest.testmod(formats)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning", "thinking"])
def test_reasoning_key_becomes_reasoning_content(key):
    assert row_to_messages({"messages": [U("2+2?"), {**A("4"), key: "2 and 2 make 4."}]}, "messages") == [
        U("2+2?"), R("4", "2 and 2 make 4.")]


def test_inline_think_block_is_split_from_the_answer():
    reply = A("\n<think>\nFirst, 2 and 2.\n\nThen 4.\n</think>\n\n  It is 4.")
    assert validate_conversation([U("2+2?"), reply]) == [U("2+2?"), R("It is 4.", "First, 2 and 2.\n\nThen 4.")]


@pytest.mark.parametrize("block", ["<think>\n\n</think>\n\n", "<think> </think>", "<think></think>"])
def test_empty_think_block_leaves_no_reasoning(block):
    assert validate_conversation([U("2+2?"), A(block + "It is 4.")]) == [U("2+2?"), A("It is 4.")]


@pytest.mark.parametrize("text", ["<think>no end tag", "It is 4. <think>x</think>"])
def test_think_tags_not_opening_a_complete_block_stay_in_the_content(text):
    assert validate_conversation([U("q"), A(text)]) == [U("q"), A(text)]


def test_think_tags_in_a_user_turn_stay_in_the_content():
    conv = [U("<think>mine</think> What now?"), A("Rest.")]
    assert validate_conversation(conv) == conv


@pytest.mark.parametrize("reply", [
    {"role": "assistant", "reasoning_content": "Nothing to add."},
    {"role": "assistant", "content": None, "reasoning": "Nothing to add."},
    {"role": "assistant", "content": "  ", "thinking": "Nothing to add."},
    A("<think>Nothing to add.</think>"),
])
def test_reasoning_only_turn_has_empty_content(reply):
    assert validate_conversation([U("q"), reply]) == [U("q"), R("", "Nothing to add.")]


@pytest.mark.parametrize("blank", [None, "", "  \n"])
def test_blank_reasoning_key_counts_as_absent(blank):
    assert validate_conversation([U("q"), {**A("a"), "reasoning_content": blank}]) == [U("q"), A("a")]


@pytest.mark.parametrize("given", [
    {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}},
    {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
    {"function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
    {"name": "weather", "arguments": {"city": "Paris"}},
    {"name": "weather", "arguments": '{"city": "Paris"}'},
    {"type": None, "function": {"name": "weather", "arguments": {"city": "Paris"}}, "id": None},
])
def test_tool_call_conventions_give_one_form(given):
    messages = [U("Weather in Paris?"), {"role": "assistant", "content": None, "tool_calls": [given]},
                T('{"sky": "clear"}'), A("Clear.")]
    assert validate_conversation(messages) == [U("Weather in Paris?"), R("", calls=[WEATHER]),
                                               T('{"sky": "clear"}'), A("Clear.")]


def test_parallel_tool_calls_with_ids_and_their_results():
    messages = [
        S("Use the tools."),
        U("Weather in Paris and Rome?"),
        {"role": "assistant", "content": "Checking both.", "reasoning_content": "Two cities, two calls.",
         "tool_calls": [
             {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
             {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": {"city": "Rome"}}},
         ]},
        {"role": "tool", "content": "clear", "tool_call_id": "call_1", "name": "weather"},
        {"role": "tool", "content": "rain", "tool_call_id": "call_2"},
        A("Paris is clear; Rome has rain."),
    ]
    assert convert(messages, tools=[WEATHER_TOOL]) == Conversation(
        [S("Use the tools."), U("Weather in Paris and Rome?"),
         R("Checking both.", "Two cities, two calls.", [call("weather", {"city": "Paris"}, id="call_1"),
                                                         call("weather", {"city": "Rome"}, id="call_2")]),
         T("clear", tool_call_id="call_1", name="weather"), T("rain", tool_call_id="call_2"),
         A("Paris is clear; Rome has rain.")],
        [WEATHER_TOOL], ())


def test_conversation_may_end_with_the_tool_call():
    messages = [U("Weather in Paris?"), {"role": "assistant", "tool_calls": [WEATHER]}]
    assert validate_conversation(messages) == [U("Weather in Paris?"), R("", calls=[WEATHER])]


def test_call_after_tool_results_and_an_answer_after_that():
    messages = [U("q"), R("", calls=[WEATHER]), T("clear"), R("", calls=[call("time", {})]), T("noon"), A("Noon.")]
    assert validate_conversation(messages) == messages


def test_unknown_message_keys_are_reported_not_kept():
    messages = [
        {**S("sys"), "name": "setup"},
        {**U("q"), "timestamp": 1700000000, "reasoning": "a user's reasoning is not the model's"},
        {**A("a"), "weight": 0, "loss": None},  # None: a key the dataset library added to every message
        {**U("again"), "tool_calls": [WEATHER]},
        {**A("b"), "name": "bot", "weight": 1},
    ]
    assert convert(messages) == Conversation(
        [S("sys"), U("q"), A("a"), U("again"), A("b")], None,
        ("name", "reasoning", "timestamp", "tool_calls", "weight"))


def test_old_rows_report_nothing_ignored():
    assert convert([S("s"), U("q"), A("a")]) == Conversation([S("s"), U("q"), A("a")], None, ())


@pytest.mark.parametrize("tools", [
    [WEATHER_TOOL],
    json.dumps([WEATHER_TOOL]),
    [WEATHER_TOOL["function"]],  # a bare schema
    json.dumps([WEATHER_TOOL["function"]]),
    [{"function": WEATHER_TOOL["function"]}],
])
def test_tools_as_list_or_json_text(tools):
    assert convert([U("q"), A("a")], tools=tools).tools == [WEATHER_TOOL]


@pytest.mark.parametrize("none", [None, "", "[]", []])
def test_no_tools_is_none(none):
    assert validate_tools(none) is None
    assert convert([U("q"), A("a")], tools=none).tools is None


def test_tool_schema_is_kept_as_given():
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {}, "strict": True}}
    assert validate_tools([tool]) == [tool]


def test_content_chars_counts_content_reasoning_and_call_json():
    conv = [U("Weather?"), R("", "Ask.", [WEATHER]), T("clear"), A("Clear.")]
    call_json = '{"name": "weather", "arguments": {"city": "Paris"}}'
    assert content_chars(conv) == len("Weather?") + len("Ask.") + len(call_json) + len("clear") + len("Clear.")
    assert content_chars([U("q"), A("ab")]) == 3


def test_normalized_form_validates_to_itself():
    conv = [S("s"), U("q"), R("", "r", [call("weather", {"city": "Paris"}, id="c1")]),
            T("clear", name="weather", tool_call_id="c1"), R("Clear.", "done")]
    assert validate_conversation(conv) == conv


BAD_AND_GOOD = {  # reason: (a row that is rejected for it, a close row that passes)
    "reasoning_twice, key and inline": (
        [U("q"), {**A("<think>r</think>a"), "reasoning_content": "r"}], [U("q"), {**A("a"), "reasoning_content": "r"}]),
    "reasoning_twice, two keys": (
        [U("q"), {**A("a"), "reasoning": "r", "thinking": "r"}],
        [U("q"), {**A("a"), "reasoning": "r", "thinking": ""}]),
    "reasoning_twice, two blocks": ([U("q"), A("<think>r</think><think>s</think>a")], [U("q"), A("<think>r</think>a")]),
    "bad_tool_call, no name": (
        [U("q"), R("", calls=[{"arguments": {}}])], [U("q"), R("", calls=[{"name": "f", "arguments": {}}])]),
    "bad_tool_call, blank name": (
        [U("q"), R("", calls=[call(" ", {})])], [U("q"), R("", calls=[call("f", {})])]),
    "bad_tool_call, arguments not JSON": (
        [U("q"), R("", calls=[call("f", "{city: Paris}")])], [U("q"), R("", calls=[call("f", '{"city": "Paris"}')])]),
    "bad_tool_call, arguments a list": (
        [U("q"), R("", calls=[call("f", '["Paris"]')])], [U("q"), R("", calls=[call("f", '{"0": "Paris"}')])]),
    "bad_tool_call, arguments missing": (
        [U("q"), R("", calls=[{"name": "f"}])], [U("q"), R("", calls=[{"name": "f", "arguments": "{}"}])]),
    "bad_tool_call, not an object": ([U("q"), R("", calls=["f()"])], [U("q"), R("", calls=[call("f", {})])]),
    "bad_tool_call, other type": (
        [U("q"), R("", calls=[{**call("f", {}), "type": "retrieval"}])], [U("q"), R("", calls=[call("f", {})])]),
    "tool_without_call, after a reply": (
        [U("q"), A("a"), T("r"), A("b")], [U("q"), R("a", calls=[WEATHER]), T("r"), A("b")]),
    "tool_without_call, after the user": ([U("q"), T("r"), A("b")], [U("q"), R("", calls=[WEATHER]), T("r"), A("b")]),
    "call_without_result, a reply": (
        [U("q"), R("", calls=[WEATHER]), A("b")], [U("q"), R("", calls=[WEATHER]), T("r"), A("b")]),
    "call_without_result, the user": (
        [U("q"), R("", calls=[WEATHER]), U("q2"), A("b")], [U("q"), R("", calls=[WEATHER])]),
    "turns_not_alternating, user after tool": (
        [U("q"), R("", calls=[WEATHER]), T("r"), U("q2"), A("b")],
        [U("q"), R("", calls=[WEATHER]), T("r"), A("b"), U("q2"), A("c")]),
    "no_assistant_turn, ends with a result": (
        [U("q"), R("", calls=[WEATHER]), T("r")], [U("q"), R("", calls=[WEATHER])]),
    "not_starting_with_user, a tool first": ([T("r"), A("b")], [U("r"), A("b")]),
    "empty_content, assistant with nothing": (
        [U("q"), {**A(" "), "tool_calls": [], "reasoning": ""}], [U("q"), {**A(" "), "tool_calls": [WEATHER]}]),
    "missing_field, assistant without content": ([U("q"), {"role": "assistant", "tool_calls": None}], [U("q"), A("a")]),
    "empty_content, blank tool result": ([U("q"), R("", calls=[WEATHER]), T(" "), A("b")],
                                         [U("q"), R("", calls=[WEATHER]), T("{}"), A("b")]),
    "wrong_type, tool_calls not a list": (
        [U("q"), {**A("a"), "tool_calls": "f()"}], [U("q"), {**A("a"), "tool_calls": []}]),
    "wrong_type, reasoning not text": (
        [U("q"), {**A("a"), "reasoning": ["r"]}], [U("q"), {**A("a"), "reasoning": "r"}]),
    "wrong_type, tool_call_id not text": (
        [U("q"), R("", calls=[WEATHER]), T("r", tool_call_id=1), A("b")],
        [U("q"), R("", calls=[WEATHER]), T("r", tool_call_id="1"), A("b")]),
}


@pytest.mark.parametrize("case", list(BAD_AND_GOOD))
def test_rejected_row_and_a_close_row_that_passes(case):
    bad, good = BAD_AND_GOOD[case]
    assert reject_reason({"messages": bad}, "messages") == case.split(",")[0]
    row_to_messages({"messages": good}, "messages")


@pytest.mark.parametrize("tools", ["not JSON", '{"name": "f"}', [1], [{"description": "no name"}],
                                   [{"type": "retrieval", "function": {"name": "f"}}], [{"function": "f"}], 7])
def test_bad_tools(tools):
    assert reject_reason({"messages": [U("q"), A("a")], "tools": tools}, "messages") == "bad_tools"
    assert row_to_messages({"messages": [U("q"), A("a")], "tools": [{"name": "f"}]}, "messages") == [U("q"), A("a")]


# sharegpt with tools (LLaMA-Factory's layout)


def test_sharegpt_llama_factory_tool_example():
    tools = [{"name": "calculate_area", "description": "Calculate the area of a given shape",
              "parameters": {"type": "object", "properties": {"shape": {"type": "string"},
                                                              "dimensions": {"type": "array"}}}}]
    row = {
        "conversations": [
            {"from": "human", "value": "Area of a 5 by 3 rectangle?"},
            {"from": "function_call",
             "value": '{"name": "calculate_area", "arguments": {"shape": "rectangle", "dimensions": [5, 3]}}'},
            {"from": "observation", "value": '{"area": 15}'},
            {"from": "gpt", "value": "The area is 15 square units."},
        ],
        "system": "You can calculate areas.",
        "tools": json.dumps(tools),
    }
    assert row_to_conversation(row, "sharegpt") == Conversation(
        [S("You can calculate areas."), U("Area of a 5 by 3 rectangle?"),
         R("", calls=[call("calculate_area", {"shape": "rectangle", "dimensions": [5, 3]})]),
         T('{"area": 15}'), A("The area is 15 square units.")],
        [{"type": "function", "function": tools[0]}], ())


def test_sharegpt_function_call_after_a_gpt_turn_joins_it_and_may_hold_several_calls():
    row = {"conversations": [
        {"from": "human", "value": "Paris and Rome?"},
        {"from": "gpt", "value": "<think>Two cities.</think>Checking."},
        {"from": "function_call", "value": json.dumps([{"name": "weather", "arguments": {"city": "Paris"}},
                                                        {"name": "weather", "arguments": '{"city": "Rome"}'}])},
        {"from": "tool", "value": "clear"},
        {"from": "observation", "value": "rain"},
        {"from": "gpt", "value": "Clear and rain.", "thinking": "Report both."},
    ]}
    assert row_to_messages(row, "sharegpt") == [
        U("Paris and Rome?"),
        R("Checking.", "Two cities.", [call("weather", {"city": "Paris"}), call("weather", {"city": "Rome"})]),
        T("clear"), T("rain"), R("Clear and rain.", "Report both.")]


def test_sharegpt_reasoning_key_on_the_function_call_turn():
    row = {"conversations": [{"from": "human", "value": "q"},
                             {"from": "function_call", "value": '{"name": "f", "arguments": {}}', "reasoning": "r"}]}
    assert row_to_messages(row, "sharegpt") == [U("q"), R("", "r", [call("f", {})])]


@pytest.mark.parametrize("system", [None, "", "  "])
def test_sharegpt_blank_system_column_adds_nothing(system):
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": system}
    assert row_to_messages(row, "sharegpt") == [U("q"), A("a")]


def test_sharegpt_unknown_turn_keys_are_reported():
    row = {"conversations": [{"from": "human", "value": "q", "weight": 0}, {"from": "gpt", "value": "a", "weight": 1,
                                                                            "reasoning": None}]}
    assert row_to_conversation(row, "sharegpt") == Conversation([U("q"), A("a")], None, ("weight",))


@pytest.mark.parametrize("row, reason", [
    ({"conversations": [{"from": "system", "value": "turn"}, {"from": "human", "value": "q"},
                        {"from": "gpt", "value": "a"}], "system": "column"}, "system_not_first"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": 1}, "wrong_type"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]}, "bad_tool_call"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "[]"}]}, "bad_tool_call"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "f(1)"}]}, "bad_tool_call"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "reasoning": "r"},
                        {"from": "function_call", "value": '{"name": "f", "arguments": {}}', "reasoning": "s"}]},
     "reasoning_twice"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": '{"name": "f", '
                                                          '"arguments": {}}'}, {"from": "gpt", "value": "a"}]},
     "call_without_result"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "r"},
                        {"from": "gpt", "value": "a"}]}, "tool_without_call"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "{"}, "bad_tools"),
])
def test_sharegpt_tool_rejects(row, reason):
    assert reject_reason(row, "sharegpt") == reason


# single-answer formats with reasoning


@pytest.mark.parametrize("key", ["reasoning", "reasoning_content", "thinking"])
@pytest.mark.parametrize("fmt, row, head", [
    ("prompt_completion", {"prompt": "2+2=", "completion": "4"}, [U("2+2=")]),
    ("alpaca", {"instruction": "Add.", "input": "2+2", "output": "4"}, [U("Add.\n\n2+2")]),
    ("dolphin", {"instruction": "Be terse.", "input": "2+2?", "output": "4"}, [S("Be terse."), U("2+2?")]),
])
def test_single_answer_formats_take_a_reasoning_column(fmt, row, head, key):
    assert row_to_messages({**row, key: "Two and two."}, fmt) == head + [R("4", "Two and two.")]
    assert row_to_messages({**row, key: None}, fmt) == head + [A("4")]


@pytest.mark.parametrize("fmt, row", [
    ("prompt_completion", {"prompt": "2+2=", "completion": "<think>Two and two.</think> 4"}),
    ("alpaca", {"instruction": "2+2?", "output": "<think>Two and two.</think>\n4"}),
    ("dolphin", {"instruction": "", "input": "2+2?", "output": "<think>\nTwo and two.\n</think>\n\n4"}),
])
def test_single_answer_formats_read_inline_reasoning(fmt, row):
    assert row_to_messages(row, fmt)[-1] == R("4", "Two and two.")


def test_single_answer_reasoning_column_and_inline_block_is_rejected():
    row = {"prompt": "2+2=", "completion": "<think>Two and two.</think>4", "reasoning": "Two and two."}
    assert reject_reason(row, "prompt_completion") == "reasoning_twice"


@pytest.mark.parametrize("columns, fmt", [
    (["instruction", "input", "output", "reasoning"], "dolphin"),
    (["instruction", "input", "output", "thinking"], "dolphin"),
    (["instruction", "input", "output", "reasoning", "thinking"], "alpaca"),
    (["instruction", "output", "reasoning_content"], "alpaca"),
    (["messages", "tools"], "messages"),
    (["conversations", "system", "tools"], "sharegpt"),
    (["prompt", "completion", "reasoning"], "prompt_completion"),
])
def test_detect_format_with_reasoning_and_tools_columns(columns, fmt):
    assert detect_format(columns) == fmt
