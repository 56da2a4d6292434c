"""The data benchmark's reasoning set: its rows, how TRL is given them, and a tiny run of it end to end."""
import csv
import io

import numpy as np

from bench import data_bench
from sft import formats
from sft.templates import encode_conversations, render_many, token_ids


def test_reasoning_rows_are_the_same_for_the_same_seed_and_differ_for_another():
    assert data_bench.reasoning_rows(20, seed=3) == data_bench.reasoning_rows(20, seed=3)
    assert data_bench.reasoning_rows(20, seed=3) != data_bench.reasoning_rows(20, seed=4)


def test_reasoning_rows_are_messages_rows_with_reasoning_tool_calls_and_tools():
    rows = data_bench.reasoning_rows(200, seed=0, reasoning_words=20)
    conversations = [formats.row_to_conversation(r, "messages") for r in rows]
    assert all(not c.ignored and 2 <= len(c.tools) <= 4 for c in conversations)
    assistant = [m for c in conversations for m in c.messages if m["role"] == "assistant"]
    assert all(m["reasoning_content"].strip() for m in assistant)
    calls = [call for m in assistant for call in m.get("tool_calls", ())]
    assert calls and all(call["function"]["name"] in data_bench.TOOLS for call in calls)
    offered = [{t["function"]["name"] for t in c.tools} for c in conversations]
    assert all(call["function"]["name"] in names for c, names in zip(conversations, offered)
               for m in c.messages for call in m.get("tool_calls", ()))
    user_turns = {sum(m["role"] == "user" for m in c.messages) for c in conversations}
    assert user_turns == {1, 2, 3}


def test_reasoning_rows_render_to_the_target_median_and_give_examples_per_turn():
    reasoning = data_bench.SETS["reasoning"]
    tok = data_bench.tokenizer(reasoning)
    conversations = [formats.row_to_conversation(r, "messages") for r in data_bench.reasoning_rows(300, seed=1)]
    texts = render_many(tok, [c.messages for c in conversations], False, [c.tools for c in conversations])
    lengths = [len(ids) for ids in token_ids(tok, texts)]
    assert abs(np.median(lengths) / data_bench.REASONING_TOKENS_MEDIAN - 1) < 0.15
    assert max(lengths) < reasoning.max_length
    # Qwen3's template drops the reasoning of turns before the last user message: such rows give more examples
    few = conversations[:40]
    examples = encode_conversations(tok, [c.messages for c in few], [c.tools for c in few], multi_turn="per_turn")
    assert not [e for e in examples if isinstance(e, Exception)]
    users = [sum(m["role"] == "user" for m in c.messages) for c in few]
    assert all(len(e) == 1 for e, n in zip(examples, users) if n == 1)
    assert all(len(e) > 1 for e, n in zip(examples, users) if n > 1)


def test_trl_is_given_each_row_as_it_is_with_no_keys_filled_in():
    conversations = [formats.row_to_conversation(r, "messages")
                     for r in data_bench.reasoning_rows(30, seed=2, reasoning_words=10)]
    dataset = data_bench.trl_dataset(conversations)
    assert [r["messages"] for r in dataset] == [c.messages for c in conversations]
    assert [r["tools"] for r in dataset] == [c.tools for c in conversations]


def test_a_tiny_reasoning_run_reports_the_tokens_and_examples_of_its_store(tmp_path):
    from sft.data import TokenizedExamples

    out, work = tmp_path / "out", tmp_path / "work"
    data_bench.write_results(out, "guanaco", [dict(variant="ours", rows=10, status="ok", tokens=5, tok_s=1.0,
                                                   prepare_s=5.0, processes=1, set="guanaco")],
                             ["device: here"], ["guanaco set, data: a few rows"])
    rows = data_bench.main(["--set", "reasoning", "--rows", "200", "--reasoning-words", "30", "--only", "ours",
                            "--out", str(out), "--work", str(work)])
    assert [(r["variant"], r["status"]) for r in rows] == [("ours", "ok")], rows
    ours = rows[0]
    (store,) = (work / "reasoning_200" / "cache" / "tokenized").iterdir()
    splits = [TokenizedExamples(store / split) for split in ("train", "eval")]
    assert ours["tokens"] == sum(int(s.lengths.sum()) for s in splits)
    assert ours["examples"] == sum(len(s) for s in splits) > 200  # the per-turn examples are counted too
    text = (out / "data_cpu.csv").read_text()
    written = list(csv.DictReader(line for line in io.StringIO(text) if not line.startswith("#")))
    assert [(r["set"], r["rows"]) for r in written] == [("guanaco", "10"), ("reasoning", "200")]
    assert int(written[1]["tokens"]) == ours["tokens"]
    assert "# guanaco set, data: a few rows" in text and "# reasoning set, data: synthetic messages" in text
    goals = (out / "data_cpu_goals.md").read_text()
    assert goals.startswith("- 10 rows: ") and f"- reasoning set, 200 rows ({ours['examples']:,} examples" in goals
    # a run of a set replaces that set's rows and keeps the others
    data_bench.write_results(out, "reasoning", [], ["device: here"], [])
    assert "reasoning" not in (out / "data_cpu.csv").read_text() and "guanaco" in (out / "data_cpu.csv").read_text()
