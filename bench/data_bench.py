"""Data preparation at scale: this toolkit's tokenized store against TRL's dataset preparation and the
per-conversation path, on two synthetic sets:
- `guanaco`: rows of the original study's format with SmolLM2's chat template;
- `reasoning`: multi-turn rows in the `messages` format with reasoning, tool calls, tool results and a `tools`
  list, on Qwen3's chat template (TRL's copy), which drops the reasoning of turns before the last user message,
  so each conversation gives an example per turn that the last rendering does not hold (`multi_turn="per_turn"`).

    python -m bench.data_bench                          # guanaco: 10k, 100k and 1M rows
    python -m bench.data_bench --set reasoning          # reasoning: 20k rows of a median of 4096 tokens
    python -m bench.data_bench --rows 2000 --out DIR    # a smoke run (what CI runs)

Every variant runs in its own process (peak memory is per process) and writes one row:
- `ours`: `sft.data.prepare_data` with `num_proc="auto"` into an empty cache (the Arrow store), then, in a
  new process, the cache hit: from process start to the first collated optimizer step, and the anonymous
  resident memory per token while 20 optimizer steps are collated (the memory-mapped store is file-backed
  and not counted). Its tokens and examples are those of the store, held-out split included.
- `per_conversation`: `encode_chat` conversation by conversation in one process into Python lists, pickled
  to disk: how this toolkit prepared data before the store (guanaco only: it makes one example per
  conversation, which a template that rewrites earlier turns cannot give).
- `trl`: TRL 1.16's `SFTTrainer` preparing the same rows (conversational "messages" form with the row's tools,
  the same chat template and max_length, `dataset_num_proc` = the same process count), timed around its dataset
  preparation. Rows with tools reach it with each message and the tools list as JSON objects (`datasets.Json`),
  so its template is given the rows as ours is. It renders each conversation once and stores one example per row:
  on the reasoning set the assistant turns before the last user message lose their reasoning, which it then
  does not train on, so it stores fewer tokens of the same rows (the goal line compares times as well).
`trl` and `per_conversation` run up to 100k rows.
Writes <out>/data_cpu.csv and .md (the rows of every set; a run replaces the rows of its own set) and
data_cpu_goals.md.
"""
from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import csv  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from inf_tests.measure import GIB, anon_bytes, peak_rss_bytes, provenance_header  # noqa: E402

PER_CONVERSATION_MAX_ROWS = 100_000  # the per-conversation path and TRL are measured up to here (at a million
                                     # rows, each would take about ten times its 100k-row time)
TURN_WORDS_MEDIAN = 60               # guanaco: words per turn, lognormal: about 250 tokens per row
REASONING_TOKENS_MEDIAN = 4096       # reasoning: the median row renders (whole, with its tools) to this many tokens
REASONING_WORDS_MEDIAN = 1550        # ...with reasoning blocks of this many words (lognormal), the rest as below
REASONING_MAX_LENGTH = 16384         # no row reaches it: reasoning blocks are clipped at 4x their median
WORDS = ("the model reads each example once and learns which tokens follow a prompt so that answers end "
         "where they should while loss counts only replies data rows come from many sources with their own "
         "formats tokenizer splits words into pieces numbers like 42 and 1999 appear too question answer why "
         "how when where explain briefly step by step because therefore however").split()
# the functions a reasoning row may offer (2 to 4 of them) and call: each argument's kind
TOOLS = {"search_documents": {"query": "text", "max_results": "int"},
         "get_weather": {"city": "text", "unit": ("celsius", "fahrenheit")},
         "run_calculation": {"expression": "text"},
         "read_file": {"path": "text", "start_line": "int"},
         "send_message": {"recipient": "text", "body": "text"},
         "lookup_order": {"order_id": "int", "include_history": "bool"}}
COLUMNS = ["variant", "rows", "status", "prepare_s", "tokens", "tok_s", "peak_rss_gib", "hit_to_first_batch_s",
           "anon_bytes_per_token", "processes", "examples", "set"]
STEPS_MEASURED = 20


def qwen3_template() -> Path:
    """Qwen3's original chat template, as TRL ships it (found without importing TRL)."""
    return Path(importlib.util.find_spec("trl").origin).parent / "chat_templates" / "qwen3.jinja"


@dataclass(frozen=True)
class DataSet:
    name: str
    rows: tuple[int, ...]   # the row counts measured by default
    fmt: str                # TrainConfig.dataset_format
    max_length: int
    variants: tuple[str, ...]

    def template(self) -> str:  # TrainConfig.template
        return str(qwen3_template()) if self.name == "reasoning" else "auto"


SETS = {"guanaco": DataSet("guanaco", (10_000, 100_000, 1_000_000), "guanaco", 4096,
                           ("ours", "ours_cache_hit", "trl", "per_conversation")),
        "reasoning": DataSet("reasoning", (20_000,), "messages", REASONING_MAX_LENGTH,
                             ("ours", "ours_cache_hit", "trl"))}


def guanaco_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows of the original study's guanaco format: '### Human: ...### Assistant: ...', one or two exchanges."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)

    def turn() -> str:
        k = int(np.clip(rng.lognormal(math.log(TURN_WORDS_MEDIAN), 0.8), 3, 700))
        return " ".join(words[rng.integers(0, len(words), k)])

    return [{"text": "".join(f"### Human: {turn()}### Assistant: {turn()}"
                             for _ in range(1 + int(rng.random() < 0.3)))} for _ in range(n)]


def tool_schema(name: str) -> dict:
    kinds = {"text": "string", "int": "integer", "bool": "boolean"}
    properties = {arg: {"type": "string", "enum": list(kind)} if isinstance(kind, tuple) else {"type": kinds[kind]}
                  for arg, kind in TOOLS[name].items()}
    for arg in properties:
        properties[arg]["description"] = f"the {arg.replace('_', ' ')}"
    return {"type": "function", "function": {"name": name, "description": f"{name.replace('_', ' ')} for the user",
                                             "parameters": {"type": "object", "properties": properties,
                                                            "required": list(properties)[:1]}}}


def reasoning_rows(n: int, seed: int = 0, reasoning_words: int = REASONING_WORDS_MEDIAN) -> list[dict]:
    """Rows of the `messages` format with a `tools` list (2 to 4 functions): 1 to 3 user turns (40%, 35%, 25%),
    each answered after 0, 1 or 2 rounds of tool calls (40%, 40%, 20%; a round: an assistant turn with reasoning
    and 1 or 2 calls, then one tool turn per call) by an assistant turn with reasoning and an answer. Reasoning
    blocks are lognormal around `reasoning_words` words (clipped to 10..4x), user turns around 40, answers
    around 80, tool results around 30; the text is drawn from WORDS."""
    rng = np.random.default_rng(seed)
    words, names = np.array(WORDS), list(TOOLS)

    def text(median: int, low: int, high: int) -> str:
        k = int(np.clip(rng.lognormal(math.log(median), 0.6), low, high))
        return " ".join(words[rng.integers(0, len(words), k)])

    def value(kind):
        if isinstance(kind, tuple):
            return kind[int(rng.integers(len(kind)))]
        return {"int": lambda: int(rng.integers(1, 1000)), "bool": lambda: bool(rng.random() < 0.5),
                "text": lambda: text(4, 1, 12)}[kind]()

    def reasoning() -> str:
        return text(reasoning_words, 10, 4 * reasoning_words)

    rows = []
    for _ in range(n):
        offered = [names[i] for i in sorted(rng.choice(len(names), int(rng.integers(2, 5)), replace=False))]
        messages = []
        for _ in range(int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))):
            messages.append({"role": "user", "content": text(40, 3, 300)})
            for _ in range(int(rng.choice([0, 1, 2], p=[0.4, 0.4, 0.2]))):
                called = rng.choice(offered, int(rng.integers(1, 3)), replace=False)
                calls = [{"type": "function", "function": {
                    "name": str(name), "arguments": {arg: value(kind) for arg, kind in TOOLS[name].items()}}}
                    for name in called]
                messages.append({"role": "assistant", "content": "", "reasoning_content": reasoning(),
                                 "tool_calls": calls})
                messages += [{"role": "tool", "content": json.dumps({"result": text(30, 2, 200)})} for _ in calls]
            messages.append({"role": "assistant", "content": text(80, 5, 600), "reasoning_content": reasoning()})
        rows.append({"messages": messages, "tools": [tool_schema(name) for name in offered]})
    return rows


def write_source(data_set: DataSet, n: int, path: Path, reasoning_words: int) -> None:
    rows = reasoning_rows(n, reasoning_words=reasoning_words) if data_set.name == "reasoning" else guanaco_rows(n)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def config(data_set: DataSet, source: Path, cache: Path):
    from sft.config import TrainConfig

    os.environ["SFT_CACHE"] = str(cache)
    return TrainConfig(experiment="data_bench", dataset=str(source), dataset_format=data_set.fmt, eval_rows=0.01,
                       max_length=data_set.max_length, too_long="truncate", micro_batch_size=4, num_proc="auto",
                       template=data_set.template(), runs_root=str(cache / "runs"))


def tokenizer(data_set: DataSet):
    from sft.config import EMBEDDED_MODEL
    from sft.modeling import load_tokenizer
    from sft.templates import setup_template

    tok = load_tokenizer(EMBEDDED_MODEL)
    setup_template(tok, data_set.template())
    return tok


def run_ours_cold(data_set: DataSet, source: Path, rows: int, cache: Path) -> dict:
    import sft.data as data

    cfg, tok = config(data_set, source, cache), tokenizer(data_set)
    began = time.perf_counter()
    prepared = data.prepare_data(cfg, tok)
    took = time.perf_counter() - began
    tokens = prepared.stats["train"]["tokens"] + prepared.stats["eval"]["tokens"]
    return dict(prepare_s=round(took, 2), tokens=tokens, tok_s=round(tokens / took),
                processes=data.auto_num_proc(cfg.num_proc, rows),
                examples=prepared.stats["train"]["examples"] + prepared.stats["eval"]["examples"])


def run_ours_hit(data_set: DataSet, source: Path, rows: int, cache: Path) -> dict:
    import sft.data as data
    from sft.packing import collated_steps, optimizer_steps, plan_epoch

    cfg, tok = config(data_set, source, cache), tokenizer(data_set)
    before = anon_bytes()
    prepared = data.prepare_data(cfg, tok)
    assert prepared.cache_hit, "the cold run did not leave a store"
    lengths = data.example_lengths(prepared.train)
    steps = optimizer_steps(plan_epoch(lengths, packing=True, rows_per_batch=cfg.micro_batch_size,
                                       row_length=cfg.max_length, seed=0), 1)
    batches = collated_steps(steps[:STEPS_MEASURED], prepared.train, tok.pad_token_id)
    next(batches)
    first = time.perf_counter() - PROCESS_START
    peak = anon_bytes()
    for _ in batches:
        peak = max(peak, anon_bytes())
    tokens = int(sum(lengths))
    return dict(hit_to_first_batch_s=round(first, 2), anon_bytes_per_token=round((peak - before) / tokens, 2),
                tokens=tokens, examples=len(lengths))


def run_per_conversation(data_set: DataSet, source: Path, rows: int, cache: Path) -> dict:
    from sft import formats, sources
    from sft.packing import shift_labels
    from sft.templates import encode_chat

    tok = tokenizer(data_set)
    began = time.perf_counter()
    conversations = []
    for text in sources.row_texts(source):
        try:
            conversations.append(formats.row_to_messages(sources.parse_row(*text), data_set.fmt))
        except formats.MalformedRow:  # set aside, as training sets it aside
            pass
    examples = []
    for c in conversations:
        enc = encode_chat(tok, c)
        examples.append(shift_labels(enc.input_ids[:data_set.max_length], enc.labels[:data_set.max_length]))
    with open(cache / "examples.pkl", "wb") as f:
        pickle.dump(examples, f)
    took = time.perf_counter() - began
    tokens = sum(len(e.input_ids) for e in examples)
    return dict(prepare_s=round(took, 2), tokens=tokens, tok_s=round(tokens / took), processes=1,
                examples=len(examples))


def trl_dataset(conversations: list):
    """The converted rows as TRL's conversational dataset. Rows with tools keep each message and the tools as
    JSON objects (`datasets.Json`): an Arrow struct column would give every message every key any message has,
    and every call every argument any call has, as None, which the template would then render."""
    from datasets import Dataset, Features, Json, List

    if not any(c.tools for c in conversations):
        return Dataset.from_list([{"messages": c.messages} for c in conversations])
    return Dataset.from_list([{"messages": c.messages, "tools": c.tools} for c in conversations],
                             features=Features({"messages": List(Json()), "tools": Json()}))


def run_trl(data_set: DataSet, source: Path, rows: int, cache: Path) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig
    from trl import SFTConfig, SFTTrainer

    from sft import formats, sources
    from sft.store import auto_num_proc

    tok = tokenizer(data_set)
    dataset = trl_dataset([formats.row_to_conversation(sources.parse_row(*text), data_set.fmt)
                           for text in sources.row_texts(source)])
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2))
    procs = auto_num_proc("auto", rows)
    args = SFTConfig(output_dir=str(cache / "trl"), max_length=data_set.max_length, report_to=[], use_cpu=True,
                     dataset_num_proc=procs if procs > 1 else None, assistant_only_loss=False)
    began = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    took = time.perf_counter() - began
    tokens = int(sum(len(ids) for ids in trainer.train_dataset["input_ids"]))
    return dict(prepare_s=round(took, 2), tokens=tokens, tok_s=round(tokens / took), processes=procs,
                examples=len(trainer.train_dataset))


RUNNERS = {"ours": run_ours_cold, "ours_cache_hit": run_ours_hit, "per_conversation": run_per_conversation,
           "trl": run_trl}


def child(name: str, data_set: DataSet, source: Path, rows: int, cache: Path, result: Path) -> None:
    row = RUNNERS[name](data_set, source, rows, cache)
    result.write_text(json.dumps(dict(row, peak_rss_gib=round(peak_rss_bytes() / GIB, 2))))


def run_isolated(name: str, data_set: DataSet, source: Path, rows: int, cache: Path, timeout_s: float) -> dict:
    """One variant in its own process (bench.common.run_isolated): its row, or its status where it failed."""
    row = dict(variant=name, rows=rows, set=data_set.name)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        done = common.run_isolated([sys.executable, "-m", "bench.data_bench", "--child", name, "--set",
                                    data_set.name, "--source", str(source), "--rows", str(rows), "--cache",
                                    str(cache), "--result", str(result)], timeout_s, output="quiet")
        if done.code is None:
            return dict(row, status=f"timeout: no result in {timeout_s:.0f} s")
        if done.code or not result.exists():
            return dict(row, status=f"error: {done.last_line() or f'exit {done.code}'}"[:300])
        return dict(row, status="ok", **json.loads(result.read_text()))


def data_line(data_set: DataSet, reasoning_words: int) -> str:
    if data_set.name == "guanaco":
        return (f"synthetic guanaco-format rows (one exchange, or two in 30%), lognormal turns of median "
                f"{TURN_WORDS_MEDIAN} words; SmolLM2's tokenizer and chat template; max_length 4096, too_long truncate")
    return (f"synthetic messages-format rows (`reasoning_rows`: 1-3 user turns, each answered after 0-2 rounds of "
            f"tool calls, every assistant turn with reasoning of a lognormal median of {reasoning_words} words, "
            f"2-4 tools per row); SmolLM2's tokenizer with Qwen3's chat template (TRL's copy), multi_turn "
            f"per_turn; max_length {data_set.max_length}, too_long truncate")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=SETS, default="guanaco", help="the synthetic set to measure")
    parser.add_argument("--rows", type=int, nargs="+", help="row counts (default: the set's)")
    parser.add_argument("--reasoning-words", type=int, default=REASONING_WORDS_MEDIAN,
                        help="reasoning set: the median words of a reasoning block (smaller for a smoke run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--only", help="comma-separated variants to run (default: every variant of the set)")
    parser.add_argument("--work", type=Path, help="keep the rows and the stores here (default: a temporary folder)")
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    data_set = SETS[args.set]
    only = args.only.split(",") if args.only else list(data_set.variants)
    if set(only) - set(data_set.variants):
        parser.error(f"--only: the {data_set.name} set's variants are {', '.join(data_set.variants)}")
    if args.child:
        child(args.child, data_set, args.source, args.rows[0], args.cache, args.result)
        return []
    import torch

    from sft.run_folder import provenance

    work = args.work or Path(tempfile.mkdtemp(prefix="data_bench_"))
    rows = []
    try:
        for n in args.rows or data_set.rows:
            folder = work / f"{data_set.name}_{n}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            source = folder / f"{data_set.name}.jsonl"
            write_source(data_set, n, source, args.reasoning_words)
            plan = [v for v in data_set.variants
                    if v in only and (v.startswith("ours") or n <= PER_CONVERSATION_MAX_ROWS)]
            for name in plan:
                cache = folder / ("cache" if name.startswith("ours") else name)
                cache.mkdir(exist_ok=True)
                rows.append(run_isolated(name, data_set, source, n, cache, args.timeout_s))
                print(rows[-1], file=sys.stderr, flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    device, date, packages = provenance(torch.device("cpu"), ("torch", "transformers", "datasets", "tokenizers",
                                                              "trl"))
    lines = [f"{data_set.name} set, {date}", f"{data_set.name} set, data: {data_line(data_set, args.reasoning_words)}"]
    write_results(args.out, data_set.name, rows, [device, packages], lines)
    return rows


def write_results(out: Path, name: str, rows: list[dict], head: list[str], lines: list[str]) -> None:
    """data_cpu.csv with this run's rows of set `name` in place of the ones there were, the other sets' rows and
    lines kept; then data_cpu.md and data_cpu_goals.md over all of them."""
    from sft.tables import csv_table

    path = out / "data_cpu.csv"
    kept_rows, kept_lines = [], []
    if path.exists():
        text = path.read_text()
        kept_lines = [line[2:] for line in text.splitlines() if line.startswith("# ")
                      and line[2:].split(" set, ")[0] in SETS and not line[2:].startswith(f"{name} set, ")]
        kept_rows = [{k: parse(v) for k, v in r.items()} for r in csv.DictReader(
            line for line in io.StringIO(text) if not line.startswith("#")) if r["set"] != name]
    every = sorted(kept_rows + rows, key=lambda r: list(SETS).index(r["set"]))
    provenance = head + sorted(kept_lines + lines, key=lambda line: list(SETS).index(line.split(" set, ")[0]))
    out.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write(provenance_header(provenance))
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(every)
    table = csv_table(path.read_text())
    goals = "".join(f"- {line}\n" for line in goal_lines(every))
    (out / "data_cpu_goals.md").write_text(goals)  # the README's goal lines (python -m sft.report)
    (out / "data_cpu.md").write_text("# Data preparation\n\n" + table + "\n\nAgainst the goals:\n\n" + goals + "\n"
                                     + __doc__.split("\n\n", 2)[2])
    print(table + "\n\n" + goals)


def parse(value: str):
    """A CSV field as written: blank is None, then an int, a float or the text."""
    if value == "":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


GOALS = dict(tok_s=400_000, anon_bytes_per_token=8, hit_to_first_batch_s=10)


def goal_lines(rows: list[dict]) -> list[str]:
    """Per set and row count: our preparation speed (the store's tokens per second), against TRL's and the
    per-conversation path's in the same run, our memory per token and the start from a cache hit, against the
    goals (GOALS). The reasoning set's line also names the examples per row and compares times for the same
    rows, since TRL stores fewer tokens of them."""
    lines = []
    for name in SETS:
        for n in sorted({r["rows"] for r in rows if r["set"] == name}):
            got = {r["variant"]: r for r in rows if r["set"] == name and r["rows"] == n and r.get("status") == "ok"}
            label = f"{n:,} rows" if name == "guanaco" else f"{name} set, {n:,} rows"
            if "ours" not in got:
                lines.append(f"{label}: no successful run of ours")
                continue
            ours, parts = got["ours"], []
            if name != "guanaco":
                label += f" ({int(ours['examples']):,} examples, {ours['examples'] / n:.2f} per row)"
            parts.append(f"{int(ours['tok_s']):,} tok/s with {int(ours['processes'])} processes (goal "
                         f"{GOALS['tok_s']:,}: " + ("met" if ours["tok_s"] >= GOALS["tok_s"] else "not met") + ")")
            for other in ("trl", "per_conversation"):
                if other in got:
                    ratio = f"{ours['tok_s'] / got[other]['tok_s']:.2f}x {other}"
                    if name != "guanaco":
                        ratio += (f" ({int(got[other]['tokens']):,} tokens in {int(got[other]['examples']):,} "
                                  f"examples; {got[other]['prepare_s'] / ours['prepare_s']:.2f}x our time)")
                    parts.append(ratio)
            if "ours_cache_hit" in got:
                hit = got["ours_cache_hit"]
                parts.append(f"{hit['anon_bytes_per_token']} anonymous bytes per token while training (goal "
                             f"{GOALS['anon_bytes_per_token']}: " + ("met" if hit["anon_bytes_per_token"]
                                                                     <= GOALS["anon_bytes_per_token"] else "not met")
                             + ")")
                parts.append(f"{hit['hit_to_first_batch_s']} s from a cache hit to the first batch (goal "
                             f"{GOALS['hit_to_first_batch_s']} s at 1M rows: " + (
                                 "met" if hit["hit_to_first_batch_s"] <= GOALS["hit_to_first_batch_s"]
                                 else "not met") + ")")
            lines.append(f"{label}: " + "; ".join(parts))
    return lines


if __name__ == "__main__":
    main()
