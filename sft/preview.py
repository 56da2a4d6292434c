"""What training will see, before it runs: the first rows rendered by the chat template, supervised spans marked.

`python -m sft.preview sft/experiments/demo_smollm2_tools.py --rows 4` (or a run folder) reads the first rows
of the run's dataset exactly as training does (the same readers, checks, chat template, reasoning tags,
system prompt and `multi_turn`), prints each example with its supervised tokens highlighted, the counts
by role and by example, and writes an HTML page of the same (`--html`, by default `preview.html` in the run
folder, or `preview_<experiment>.html` in the current directory for a script).
"""
from __future__ import annotations

import argparse
import html
import json
import runpy
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from .config import TrainConfig, script_spelling, settings_from
from .errors import ConfigError, SFTError
from .templates import IGNORE_INDEX, encode_conversations

SUPERVISED, RESET = "\033[1;32m", "\033[0m"  # bold green in a terminal


@dataclass
class Previewed:
    row: int  # the row's number in the source, from 1
    examples: list  # (text, supervised) pieces of each example of the row
    roles: Counter  # the row's turns by role


def load_config(path: str) -> TrainConfig:
    """The config of an experiment script (its UPPER_CASE constants) or of a run folder (its config.json)."""
    from .run_folder import read_config

    p = Path(path)
    if p.is_dir():
        record = read_config(p)
        if record is None:
            raise ConfigError(f"{path}: not a run folder (no config.json)")
        return TrainConfig.from_record(record["config"])
    if p.suffix != ".py" or not p.is_file():
        raise ConfigError(f"{path}: give an experiment script (.py) or a run folder")
    settings = settings_from(runpy.run_path(str(p), run_name="sft_preview"))
    return TrainConfig(**{"experiment": p.stem, **settings})


def preview(cfg: TrainConfig, rows: int) -> list[Previewed]:
    """The first `rows` usable rows of the run's (first) dataset, as examples cut into supervised pieces."""
    from .data import read_source
    from .modeling import load_tokenizer
    from .templates import setup_template

    tokenizer = load_tokenizer(cfg.model, cfg.model_revision, cfg.trust_remote_code, cfg.eos_token)
    setup_template(tokenizer, cfg.template, cfg.system_prompt, cfg.reasoning_tags)
    source = cfg.sources()[0]
    source = replace(source, max_rows=min(source.max_rows or rows * 4, rows * 4))  # room for rejected rows
    with tempfile.TemporaryDirectory(prefix="sft_preview_") as tmp:
        got = read_source(source, 1, Path(tmp) / "read")
        column, tools = (got.texts.data.table.column(c) for c in ("conversation", "tools"))
        picked = got.usable[:rows].tolist()
        conversations = [json.loads(column[i].as_py()) for i in picked]
        tool_lists = [json.loads(tools[i].as_py()) if tools[i].as_py() else None for i in picked]
    encoded = encode_conversations(tokenizer, conversations, tool_lists, loss_on=cfg.loss_on,
                                   multi_turn=cfg.multi_turn)
    out = []
    for i, conversation, examples in zip(picked, conversations, encoded):
        if isinstance(examples, Exception):
            raise type(examples)(f"dataset {source.name}: row {i + 1}: {examples}")
        out.append(Previewed(i + 1, [_pieces(tokenizer, e) for e in examples],
                             Counter(m["role"] for m in conversation)))
    return out


def _pieces(tokenizer, example) -> list[tuple[str, bool]]:
    """The example's text in runs of supervised and unsupervised tokens."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(example.input_ids, example.labels):
        supervised = label != IGNORE_INDEX
        if runs and runs[-1][1] == supervised:
            runs[-1][0].append(token)
        else:
            runs.append(([token], supervised))
    return [(tokenizer.decode(ids), supervised) for ids, supervised in runs]


def counts(previewed: list[Previewed]) -> dict:
    """Turns by role, examples per row, tokens and supervised characters, over the previewed rows."""
    roles = sum((p.roles for p in previewed), Counter())
    per_row = Counter(len(p.examples) for p in previewed)
    chars = Counter()
    for p in previewed:
        for example in p.examples:
            for text, supervised in example:
                chars["supervised" if supervised else "context"] += len(text)
    return {"rows": len(previewed), "turns_by_role": dict(roles),
            "examples_per_row": {str(k): v for k, v in sorted(per_row.items())},
            "characters": dict(chars)}


def terminal(previewed: list[Previewed], cfg: TrainConfig, color: bool) -> str:
    mark = (SUPERVISED, RESET) if color else ("[[", "]]")
    lines = []
    for p in previewed:
        for k, example in enumerate(p.examples, 1):
            lines.append(f"--- row {p.row}, example {k} of {len(p.examples)} (multi_turn={cfg.multi_turn})")
            lines.append("".join(f"{mark[0]}{text}{mark[1]}" if sup else text for text, sup in example))
    summary = counts(previewed)
    lines.append(f"--- {summary['rows']} rows; turns by role {summary['turns_by_role']}; examples per row "
                 f"{summary['examples_per_row']}; characters {summary['characters']}; supervised text is "
                 + ("green" if color else "between [[ and ]]"))
    return "\n".join(lines)


def page(previewed: list[Previewed], cfg: TrainConfig) -> str:
    summary = counts(previewed)
    body = [f"<h1>{html.escape(cfg.experiment)}: the first {summary['rows']} rows as training sees them</h1>",
            f"<p>model {html.escape(cfg.model)}, dataset {html.escape(cfg.sources()[0].name)}, template "
            f"{html.escape(cfg.template)}, multi_turn {html.escape(cfg.multi_turn)}, loss on {cfg.loss_on}. "
            f"<mark>Highlighted</mark> text is supervised.</p>",
            "<table><tr><th>turns by role</th><th>examples per row</th><th>characters</th></tr><tr>"
            + "".join(f"<td>{html.escape(json.dumps(summary[k]))}</td>"
                      for k in ("turns_by_role", "examples_per_row", "characters")) + "</tr></table>"]
    for p in previewed:
        for k, example in enumerate(p.examples, 1):
            body.append(f"<h2>row {p.row}, example {k} of {len(p.examples)}</h2><pre>"
                        + "".join(f"<mark>{html.escape(t)}</mark>" if s else html.escape(t) for t, s in example)
                        + "</pre>")
    style = ("body{font-family:sans-serif;max-width:70em;margin:auto}pre{white-space:pre-wrap;background:#f6f6f6;"
             "padding:.5em}mark{background:#b7f0b1}td,th{border:1px solid #ccc;padding:.3em}")
    return f"<!doctype html><meta charset='utf-8'><title>preview</title><style>{style}</style>" + "".join(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft.preview", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="an experiment script or a run folder")
    parser.add_argument("--rows", type=int, default=4, help="how many rows (default 4)")
    parser.add_argument("--html", help="where to write the HTML page")
    args = parser.parse_args(argv)
    try:
        if args.rows < 1:
            raise ConfigError(f"--rows: at least 1, got {args.rows}")
        cfg = load_config(args.path)
        previewed = preview(cfg, args.rows)
        out = Path(args.html) if args.html else (Path(args.path) / "preview.html" if Path(args.path).is_dir()
                                                 else Path(f"preview_{cfg.experiment}.html"))
        out.write_text(page(previewed, cfg))
    except SFTError as e:
        print(f"error: {script_spelling(str(e))}", file=sys.stderr)
        return 2
    print(terminal(previewed, cfg, sys.stdout.isatty()))
    print(f"HTML page: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
