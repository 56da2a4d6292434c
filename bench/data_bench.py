"""Data preparation at scale: this toolkit's tokenized store against TRL's dataset preparation and the
per-conversation path, on synthetic guanaco-format rows (the original study's format) with SmolLM2's chat
template.

    python -m bench.data_bench                       # 10k, 100k and 1M rows
    python -m bench.data_bench --rows 2000 --out DIR # a smoke run (what CI runs)

Every variant runs in its own process (peak memory is per process) and writes one row:
- `ours`: `sft.data.prepare_data` with `num_proc="auto"` into an empty cache (the Arrow store), then, in a
  new process, the cache hit: from process start to the first collated optimizer step, and the anonymous
  resident memory per token while 20 optimizer steps are collated (the memory-mapped store is file-backed
  and not counted).
- `per_conversation`: `encode_chat` conversation by conversation in one process into Python lists, pickled
  to disk: how this toolkit prepared data before the store.
- `trl`: TRL 1.16's `SFTTrainer` preparing the same rows (conversational "messages" form, the same chat
  template, `dataset_num_proc` = the same process count), timed around its dataset preparation.
`trl` and `per_conversation` run up to 100k rows.
Writes <out>/data_<cpu|gpu>.csv and .md with the device and versions.
"""
from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROWS = [10_000, 100_000, 1_000_000]
PER_CONVERSATION_MAX_ROWS = 100_000  # the per-conversation path and TRL are measured up to here (at a million
                                     # rows, each would take about ten times its 100k-row time)
TURN_WORDS_MEDIAN = 60               # words per turn, lognormal: about 250 tokens per row
WORDS = ("the model reads each example once and learns which tokens follow a prompt so that answers end "
         "where they should while loss counts only replies data rows come from many sources with their own "
         "formats tokenizer splits words into pieces numbers like 42 and 1999 appear too question answer why "
         "how when where explain briefly step by step because therefore however").split()
COLUMNS = ["variant", "rows", "status", "prepare_s", "tokens", "tok_s", "peak_rss_gib", "hit_to_first_batch_s",
           "anon_bytes_per_token", "processes"]
STEPS_MEASURED = 20


def guanaco_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows of the original study's guanaco format: '### Human: ...### Assistant: ...', one or two exchanges."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)

    def turn() -> str:
        k = int(np.clip(rng.lognormal(math.log(TURN_WORDS_MEDIAN), 0.8), 3, 700))
        return " ".join(words[rng.integers(0, len(words), k)])

    return [{"text": "".join(f"### Human: {turn()}### Assistant: {turn()}"
                             for _ in range(1 + int(rng.random() < 0.3)))} for _ in range(n)]


def anon_bytes() -> int:
    """Anonymous resident memory of this process (Linux): heap and the like, not memory-mapped files."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def config(source: Path, rows: int, cache: Path):
    from sft.config import TrainConfig

    os.environ["SFT_CACHE"] = str(cache)
    return TrainConfig(experiment="data_bench", dataset=str(source), dataset_format="guanaco", eval_rows=0.01,
                       max_length=4096, too_long="truncate", micro_batch_size=4, num_proc="auto",
                       runs_root=str(cache / "runs"))


def tokenizer():
    from sft.config import EMBEDDED_MODEL
    from sft.modeling import load_tokenizer
    from sft.templates import setup_template

    tok = load_tokenizer(EMBEDDED_MODEL)
    setup_template(tok, "auto")
    return tok


def run_ours_cold(source: Path, rows: int, cache: Path) -> dict:
    import sft.data as data

    cfg, tok = config(source, rows, cache), tokenizer()
    began = time.perf_counter()
    prepared = data.prepare_data(cfg, tok)
    took = time.perf_counter() - began
    tokens = prepared.stats["train"]["tokens"] + prepared.stats["eval"]["tokens"]
    return dict(prepare_s=round(took, 2), tokens=tokens, tok_s=round(tokens / took),
                processes=data.auto_num_proc(cfg.num_proc, rows))


def run_ours_hit(source: Path, rows: int, cache: Path) -> dict:
    import sft.data as data
    from sft.packing import collated_steps, optimizer_steps, plan_epoch

    cfg, tok = config(source, rows, cache), tokenizer()
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
                tokens=tokens)


def run_per_conversation(source: Path, rows: int, cache: Path) -> dict:
    from sft import formats, sources
    from sft.packing import shift_labels
    from sft.templates import encode_chat

    tok = tokenizer()
    began = time.perf_counter()
    conversations, _, _ = formats.convert_rows(sources.load_rows(str(source), revision=None, split="train",
                                                                 max_rows=None, data_files=None), "guanaco")
    examples = []
    for c in conversations:
        enc = encode_chat(tok, c)
        examples.append(shift_labels(enc.input_ids[:4096], enc.labels[:4096]))
    with open(cache / "examples.pkl", "wb") as f:
        pickle.dump(examples, f)
    took = time.perf_counter() - began
    tokens = sum(len(e.input_ids) for e in examples)
    return dict(prepare_s=round(took, 2), tokens=tokens, tok_s=round(tokens / took), processes=1)


def run_trl(source: Path, rows: int, cache: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, LlamaConfig
    from trl import SFTConfig, SFTTrainer

    from sft import formats, sources
    from sft.data import auto_num_proc

    tok = tokenizer()
    conversations, _, _ = formats.convert_rows(sources.load_rows(str(source), revision=None, split="train",
                                                                 max_rows=None, data_files=None), "guanaco")
    dataset = Dataset.from_list([{"messages": c} for c in conversations])
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2))
    procs = auto_num_proc("auto", rows)
    args = SFTConfig(output_dir=str(cache / "trl"), max_length=4096, report_to=[], use_cpu=True,
                     dataset_num_proc=procs if procs > 1 else None, assistant_only_loss=False)
    began = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    took = time.perf_counter() - began
    tokens = int(sum(len(ids) for ids in trainer.train_dataset["input_ids"]))
    return dict(prepare_s=round(took, 2), tokens=tokens, tok_s=round(tokens / took), processes=procs)


RUNNERS = {"ours": run_ours_cold, "ours_cache_hit": run_ours_hit, "per_conversation": run_per_conversation,
           "trl": run_trl}


def child(name: str, source: Path, rows: int, cache: Path, result: Path) -> None:
    row = RUNNERS[name](source, rows, cache)
    result.write_text(json.dumps(dict(row, peak_rss_gib=round(peak_rss_gib(), 2))))


def run_isolated(name: str, source: Path, rows: int, cache: Path, timeout_s: float) -> dict:
    row = dict(variant=name, rows=rows)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.data_bench", "--child", name, "--source", str(source),
                                   "--rows", str(rows), "--cache", str(cache), "--result", str(result)],
                                  cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return dict(row, status=f"timeout: no result in {timeout_s:.0f} s")
        if proc.returncode or not result.exists():
            last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            return dict(row, status=f"error: {last}"[:300])
        return dict(row, status="ok", **json.loads(result.read_text()))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=ROWS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.source, args.rows[0], args.cache, args.result)
        return []
    import torch

    from sft.run_folder import provenance

    rows = []
    for n in args.rows:
        with tempfile.TemporaryDirectory(prefix="data_bench_") as tmp:
            source = Path(tmp) / "guanaco.jsonl"
            with open(source, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in guanaco_rows(n))
            plan = ["ours", "ours_cache_hit"] + (["trl", "per_conversation"] if n <= PER_CONVERSATION_MAX_ROWS else [])
            for name in plan:
                cache = Path(tmp) / ("cache" if name.startswith("ours") else name)
                cache.mkdir(exist_ok=True)
                rows.append(run_isolated(name, source, n, cache, args.timeout_s))
                print(rows[-1], file=sys.stderr, flush=True)
    device = torch.device("cpu")
    lines = provenance(device, ("torch", "transformers", "datasets", "tokenizers", "trl")) + [
        f"data: synthetic guanaco-format rows (one exchange, or two in 30%), lognormal turns of median "
        f"{TURN_WORDS_MEDIAN} words; SmolLM2's tokenizer and chat template; max_length 4096, too_long truncate"]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "data_cpu.csv", "w", newline="") as f:
        f.writelines(f"# {line}\n" for line in lines)
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    from sft.tables import markdown_table
    import pandas as pd

    table = markdown_table(pd.DataFrame(rows, columns=COLUMNS))
    goals = "".join(f"- {line}\n" for line in goal_lines(rows))
    (args.out / "data_cpu_goals.md").write_text(goals)  # the README's goal lines (python -m sft.report)
    (args.out / "data_cpu.md").write_text("# Data preparation\n\n" + "".join(f"- {ln}\n" for ln in lines) + "\n"
                                          + table + "\n\nAgainst the goals:\n\n" + goals + "\n"
                                          + __doc__.split("\n\n", 2)[2])
    print(table + "\n\n" + goals)
    return rows


GOALS = dict(tok_s=400_000, anon_bytes_per_token=8, hit_to_first_batch_s=10)


def goal_lines(rows: list[dict]) -> list[str]:
    """Per row count: our preparation speed, against TRL's and the per-conversation path's in the same run, our
    memory per token and the start from a cache hit, against the goals (GOALS)."""
    lines = []
    for n in sorted({r["rows"] for r in rows}):
        got = {r["variant"]: r for r in rows if r["rows"] == n and r.get("status") == "ok"}
        if "ours" not in got:
            lines.append(f"{n:,} rows: no successful run of ours")
            continue
        ours, parts = got["ours"], []
        parts.append(f"{int(ours['tok_s']):,} tok/s with {int(ours['processes'])} processes (goal {GOALS['tok_s']:,}: "
                     + ("met" if ours["tok_s"] >= GOALS["tok_s"] else "not met") + ")")
        for other in ("trl", "per_conversation"):
            if other in got:
                parts.append(f"{ours['tok_s'] / got[other]['tok_s']:.2f}x {other}")
        if "ours_cache_hit" in got:
            hit = got["ours_cache_hit"]
            parts.append(f"{hit['anon_bytes_per_token']} anonymous bytes per token while training (goal "
                         f"{GOALS['anon_bytes_per_token']}: "
                         + ("met" if hit["anon_bytes_per_token"] <= GOALS["anon_bytes_per_token"] else "not met") + ")")
            parts.append(f"{hit['hit_to_first_batch_s']} s from a cache hit to the first batch (goal "
                         f"{GOALS['hit_to_first_batch_s']} s at 1M rows: "
                         + ("met" if hit["hit_to_first_batch_s"] <= GOALS["hit_to_first_batch_s"] else "not met") + ")")
        lines.append(f"{n:,} rows: " + "; ".join(parts))
    return lines


if __name__ == "__main__":
    main()
