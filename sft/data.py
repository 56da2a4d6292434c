"""From a dataset source to tokenized train and held-out examples, with the statistics of every step.

rows (sft.sources) -> conversations (sft.formats) -> held-out split -> token ids and labels
(sft.templates.encode_chat) -> special-token text, length and supervision checks -> `Example`s (sft.packing).

Tokenization runs in `num_proc` processes and is cached on disk under a key made of everything that
determines its output (the conversations, the tokenizer files, the chat template with the system
prompt written into it, max_length, too_long, loss_on): a rerun with the same inputs loads the cache;
any change misses it.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from . import formats, sources
from .config import EMBEDDED_DATASET, TrainConfig
from .demo_data import demo_rows
from .errors import ConfigError, DataError
from .modeling import cache_root
from .packing import Example, shift_labels
from .templates import IGNORE_INDEX, encode_chat

CACHE_VERSION = 2
DEFAULT_EVAL_FRACTION = 0.05


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    eval_conversations: list[list[dict]]  # held-out conversations, for generation and the task metric
    stats: dict = field(default_factory=dict)
    cache_hit: bool = False


def read_conversations(source: str, cfg: TrainConfig, max_rows: int | None, split: str, *,
                       revision: str | None, data_files: str | None) -> tuple[list[tuple[int, list[dict]]], dict]:
    """(row number, conversation) for each usable row, numbered from 1 in the order read, and the counts."""
    if source == EMBEDDED_DATASET:
        rows = demo_rows(max_rows)
    elif source.startswith("embedded:"):
        raise DataError(f"dataset: unknown embedded dataset {source!r}; the embedded one is {EMBEDDED_DATASET!r}")
    else:
        rows = sources.load_rows(source, revision=revision, split=split, max_rows=max_rows, data_files=data_files)
    columns = sorted({k for row in rows[:100] for k in row})
    try:
        fmt = formats.detect_format(columns) if cfg.dataset_format == "auto" else cfg.dataset_format
    except DataError as e:
        raise DataError(f"dataset {source}: {e}") from None
    if cfg.dataset_format != "auto" and not set(formats.FORMATS[fmt]) <= set(columns):
        raise DataError(f"dataset {source}: format {fmt!r} needs the columns {list(formats.FORMATS[fmt])}, "
                        f"found {columns}")
    conversations, rejected, numbers = formats.convert_rows(rows, fmt)
    if not conversations:
        raise DataError(f"dataset {source}: none of its {len(rows)} rows is a usable {fmt} conversation "
                        f"(rejected by reason: {dict(rejected)})")
    return list(zip(numbers, conversations)), {"source": source, "format": fmt, "rows_read": len(rows),
                                               "rows_kept": len(conversations), "rows_rejected": dict(rejected)}


def prepare_data(cfg: TrainConfig, tokenizer) -> PreparedData:
    numbered, read_stats = read_conversations(cfg.dataset, cfg, cfg.max_rows, cfg.dataset_split,
                                              revision=cfg.dataset_revision, data_files=cfg.dataset_files)
    if cfg.eval_dataset is not None:
        train_numbered = sources.shuffle_rows(numbered, cfg.seed)
        same_repo = cfg.eval_dataset == cfg.dataset
        eval_numbered, eval_read = read_conversations(
            cfg.eval_dataset, cfg, cfg.eval_rows, cfg.eval_dataset_split,
            revision=cfg.eval_dataset_revision or (cfg.dataset_revision if same_repo else None),
            data_files=cfg.eval_dataset_files)
        read_stats["eval_source"] = eval_read
    else:
        eval_rows = cfg.eval_rows if cfg.eval_rows is not None else DEFAULT_EVAL_FRACTION
        try:
            train_numbered, eval_numbered = sources.split_heldout(numbered, eval_rows=eval_rows, seed=cfg.seed)
        except ConfigError as e:
            raise ConfigError(f"{e} ({read_stats['rows_kept']} of {read_stats['rows_read']} rows of {cfg.dataset} "
                              f"are usable; rejected by reason: {read_stats['rows_rejected']})") from None
    train_convs, eval_convs = [c for _, c in train_numbered], [c for _, c in eval_numbered]
    key = _cache_key(tokenizer, cfg, train_convs, eval_convs)
    path = cache_root() / "tokenized" / f"{key}.pkl"
    if path.exists():
        with open(path, "rb") as f:
            train, evals, tok_stats = pickle.load(f)
        hit = True
    else:
        train, train_stats = tokenize_conversations(train_convs, tokenizer, cfg, f"dataset {cfg.dataset}: train",
                                                    [n for n, _ in train_numbered])
        evals, eval_stats = tokenize_conversations(eval_convs, tokenizer, cfg,
                                                   f"dataset {cfg.eval_dataset or cfg.dataset}: held-out",
                                                   [n for n, _ in eval_numbered])
        tok_stats = {"train": train_stats, "eval": eval_stats}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump((train, evals, tok_stats), f)
        os.replace(tmp, path)
        hit = False
    if not train:
        raise DataError(f"dataset {cfg.dataset}: no training example is left after the checks "
                        f"({tok_stats['train']['dropped']})")
    if not evals:
        raise DataError(f"dataset {cfg.eval_dataset or cfg.dataset}: no held-out example is left after the "
                        f"checks ({tok_stats['eval']['dropped']}); the held-out loss would be undefined")
    kept_eval = [c for c, keep in zip(eval_convs, tok_stats["eval"]["kept_mask"]) if keep]
    stats = {**read_stats, "train_conversations": len(train_convs), "eval_conversations": len(eval_convs),
             **{k: {kk: vv for kk, vv in v.items() if kk != "kept_mask"} for k, v in tok_stats.items()},
             "tokenization_cache": {"key": key, "hit": hit}}
    return PreparedData(train, evals, kept_eval, stats, hit)


def set_aside(stats: dict) -> list[str]:
    """One line per step that set data aside (rejected rows, dropped or truncated examples), for the
    console: counted in data_stats.json either way, but a run should not lose rows unannounced."""
    lines = []
    for read in (stats, stats.get("eval_source")):
        if read and read["rows_rejected"]:
            lines.append(f"dataset {read['source']}: {sum(read['rows_rejected'].values())} of {read['rows_read']} "
                         f"rows are not usable {read['format']} conversations and were left out "
                         f"({read['rows_rejected']})")
    for split in ("train", "eval"):
        if stats[split]["dropped"]:
            lines.append(f"{split}: {sum(stats[split]['dropped'].values())} examples dropped "
                         f"({stats[split]['dropped']})")
        if stats[split]["truncated"]:
            lines.append(f"{split}: {stats[split]['truncated']} examples truncated to max_length")
    return lines


def tokenize_conversations(conversations: list[list[dict]], tokenizer, cfg: TrainConfig, split: str,
                           row_numbers: list[int]) -> tuple[list[Example], dict]:
    """Encodes each conversation and applies the length and supervision rules, counting every drop.
    An error names the conversation by the number of the row it came from (`row_numbers`)."""
    if cfg.num_proc > 1 and len(conversations) >= 256:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        with ProcessPoolExecutor(cfg.num_proc, initializer=_init_worker, initargs=(tokenizer, cfg.loss_on)) as pool:
            chunk = max(1, len(conversations) // (8 * cfg.num_proc))
            encoded = list(tqdm(pool.map(_encode, conversations, chunksize=chunk), total=len(conversations),
                                **_progress(split)))
    else:
        _init_worker(tokenizer, cfg.loss_on)
        encoded = [_encode(c) for c in tqdm(conversations, **_progress(split))]
    examples: list[Example] = []
    kept_mask: list[bool] = []
    dropped: Counter = Counter()
    truncated = 0
    for i, enc in enumerate(encoded):
        if enc is None:
            dropped["special_token_text"] += 1
            kept_mask.append(False)
            continue
        ids, labels = enc
        n_sup = sum(l != IGNORE_INDEX for l in labels)
        if n_sup == 0:
            raise DataError(f"{split} row {row_numbers[i]} has no supervised tokens: {_preview(conversations[i])}")
        if cfg.loss_on == "assistant" and n_sup == len(labels):
            raise DataError(f"{split} row {row_numbers[i]}: every token is supervised although loss_on='assistant'; "
                            f"the chat template marks no prompt: {_preview(conversations[i])}")
        if len(ids) > cfg.max_length:
            if cfg.too_long == "error":
                raise DataError(f"{split} row {row_numbers[i]} has {len(ids)} tokens, more than max_length="
                                f"{cfg.max_length}; raise max_length or set too_long='truncate' or 'drop': "
                                f"{_preview(conversations[i])}")
            if cfg.too_long == "drop":
                dropped["too_long"] += 1
                kept_mask.append(False)
                continue
            ids, labels = ids[:cfg.max_length], labels[:cfg.max_length]
        example = shift_labels(ids, labels)
        if example.num_targets == 0:
            dropped["no_supervised_tokens_after_truncation"] += 1
            kept_mask.append(False)
            continue
        truncated += len(ids) < len(enc[0])
        examples.append(example)
        kept_mask.append(True)
    return examples, {"examples": len(examples), "dropped": dict(dropped), "truncated": truncated,
                      **length_stats(examples), "kept_mask": kept_mask}


_WORKER: dict = {}


def _progress(split: str) -> dict:
    """A progress bar that appears only once tokenizing has taken a couple of seconds."""
    return dict(desc=f"tokenizing ({split})", unit="conversation", delay=2, leave=False, dynamic_ncols=True)


def _init_worker(tokenizer, loss_on: str) -> None:
    """Each tokenization process receives the tokenizer once, not once per conversation."""
    _WORKER.update(tokenizer=tokenizer, loss_on=loss_on, special=special_token_pattern(tokenizer))


def special_token_pattern(tokenizer) -> re.Pattern | None:
    """Matches the text of the tokenizer's special tokens. The tokenizer turns such text inside a message
    into the control token itself: an assistant reply holding "<|im_end|>" would teach the model to stop
    mid-reply, and a user turn holding "<|im_start|>assistant" would fake a turn."""
    texts = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content})
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def _encode(conversation: list[dict]) -> tuple[list[int], list[int]] | None:
    """Token ids and labels, or None for a conversation whose text holds a special token's text."""
    special = _WORKER["special"]
    if special is not None and any(special.search(m["content"]) for m in conversation):
        return None
    enc = encode_chat(_WORKER["tokenizer"], conversation, loss_on=_WORKER["loss_on"])
    return enc.input_ids, enc.labels


def length_stats(examples: list[Example]) -> dict:
    if not examples:
        return {"tokens": 0}
    lengths = np.array([len(e.input_ids) for e in examples])
    supervised = sum(e.num_targets for e in examples)
    return {"tokens": int(lengths.sum()), "supervised_tokens": supervised,
            "supervised_fraction": round(supervised / int(lengths.sum()), 4),
            "length_percentiles": {f"p{q}": int(np.percentile(lengths, q)) for q in (0, 10, 50, 90, 99, 100)}}


def _preview(conversation: list[dict], width: int = 80) -> str:
    text = json.dumps(conversation, ensure_ascii=False)
    return text if len(text) <= width else text[:width] + "..."


def _cache_key(tokenizer, cfg: TrainConfig, *parts) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, cfg.max_length, cfg.too_long, cfg.loss_on, tokenizer.chat_template,
                         tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token, tokenizer.bos_token,
                         parts], sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:24]
