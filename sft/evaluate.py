"""Scoring a finished model on any dataset the trainer reads: held-out loss, exact match and samples, and
lm-evaluation-harness tasks.

    python -m sft.evaluate runs/<run> --dataset data/test.jsonl
    python -m sft.evaluate runs/<run> --dataset org/name --revision <sha> --split test --max-rows 500
    python -m sft.evaluate runs/<run> --heldout      # the run's own held-out conversations (heldout.jsonl)
    python -m sft.evaluate runs/<run> --heldout --model embedded:smollm2-135m-instruct  # the base, for comparison
    python -m sft.evaluate runs/<run> --dataset data/test.jsonl --model <hub id> --model-revision <sha>
    python -m sft.evaluate runs/<run> --lm-eval-tasks my_task --lm-eval-include tasks/

Every row of the dataset is scored (up to --max-rows), encoded exactly as the run encoded its training
data (template, system prompt, max_length and too_long, loss_on) and generated with the run's decoding
settings. lm-eval tasks run on the model through lm-eval's Hugging Face model class (`hf`), with the
model's chat template; `--lm-eval-include` adds task definitions of your own (a YAML over a local JSONL
file works offline). Results go to `runs/<run>/eval/<name>.json` (`--name`, else made from the dataset
and the model), written atomically.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from .config import Source, TrainConfig
from .errors import ConfigError, SFTError
from .modeling import is_model_folder
from .run_folder import HELDOUT, HELDOUT_MAX_BYTES, read_config, write_json_atomic


def run_config(run_dir: Path) -> TrainConfig:
    record = read_config(run_dir)
    if record is None:
        raise ConfigError(f"{run_dir}: not a run folder (no config.json)")
    return TrainConfig.from_record(record["config"], resume=None)


def evaluate(run_dir, *, dataset: str | None = None, dataset_format: str = "auto", revision: str | None = None,
             files: str | None = None, split: str = "train", max_rows: int | None = None, heldout: bool = False,
             model: str | None = None, model_revision: str | None = None, lm_eval_tasks: list[str] | None = None,
             lm_eval_include: str | None = None, lm_eval_limit: int | None = None, name: str | None = None,
             device: str | None = None) -> Path:
    """Scores the run's model (or `model`, at `model_revision` when a hub id) and writes eval/<name>.json into the
    run folder; returns its path. `heldout`: the dataset is the run's own held-out conversations."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    model_path = model or str(run_dir / "model")
    if model is None and not is_model_folder(run_dir / "model"):
        raise ConfigError(f"{run_dir}: the run saved no model (model/ is missing); pass --model to score another")
    if heldout:
        if dataset is not None:
            raise ConfigError("evaluate: --heldout and --dataset both name the data; give one")
        dataset, dataset_format = str(run_heldout(run_dir)), "messages"
    if dataset is None and not lm_eval_tasks:
        raise ConfigError("evaluate: nothing to do; give --dataset, --heldout, --lm-eval-tasks or more")
    if model is not None:
        from .modeling import resolve_model_source

        resolve_model_source(model, model_revision)  # a bad path or an unpinned hub id, before the data is read
    name = name or "_".join(Path(p).name.replace(":", "-")
                            for p in ([dataset] if dataset else []) + ([model] if model else ["model"]))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = {"run": run_dir.name, "model": model_path, "base_model": model is not None}
    if dataset is not None:
        source = Source(dataset, None, dataset_format, revision, files, split, max_rows, dataset)
        result.update(score_dataset(cfg, source, model_path, model_revision, own_template=model is None,
                                    device=device))
    if lm_eval_tasks:
        result["lm_eval"] = run_lm_eval(model_path, model_revision, lm_eval_tasks, lm_eval_include, lm_eval_limit,
                                        device)
    out = run_dir / "eval" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    write_json_atomic(out, result)
    return out


def run_heldout(run_dir: Path) -> Path:
    """The run's held-out conversations, as training wrote them (heldout.jsonl)."""
    path = Path(run_dir) / HELDOUT
    if not path.is_file():
        raise ConfigError(f"{run_dir}: has no {HELDOUT} (runs made before this file existed, and held-out sets "
                          f"over {HELDOUT_MAX_BYTES // 2**20} MiB, keep none); score its held-out data with --dataset")
    return path


def score_dataset(cfg: TrainConfig, source: Source, model_path: str, model_revision: str | None, own_template: bool,
                  device: torch.device) -> dict:
    from accelerate import Accelerator

    from .data import PreparedData, Selection, TokenizedExamples, read_source, tokenize_to_store
    from .generation import Decoding, generate_replies, task_metric
    from .loss import LossModel, resolve_loss_impl
    from .modeling import load_model, load_tokenizer
    from .evaluation import held_out_batches, held_out_losses, sample_records
    from .setup import resolve_precision
    from .templates import prompt_and_reference, setup_template

    tokenizer = load_tokenizer(model_path, model_revision, eos_token=cfg.eos_token)
    if not own_template:  # the run's model carries its template; a base model gets the one the run set up
        setup_template(tokenizer, cfg.template, cfg.system_prompt, cfg.reasoning_tags)
    with tempfile.TemporaryDirectory(prefix="sft_eval_") as tmp:
        got = read_source(source, cfg.num_proc, Path(tmp) / "read")
        rows = Selection.every_usable_row(got)
        stats = tokenize_to_store(rows, tokenizer, cfg, "evaluation", [source.name], Path(tmp) / "store")
        examples = TokenizedExamples(Path(tmp) / "store").to_list()
        kept_rows = np.flatnonzero(stats.pop("kept_mask"))
        kept, tools = [rows.conversation(i) for i in kept_rows], [rows.tools(i) for i in kept_rows]
        read = got.read
        del got, rows
    stats.pop("by_source")
    precision = resolve_precision(cfg, device)
    model = load_model(model_path, model_revision, dtype=torch.bfloat16 if precision == "bf16_pure" else torch.float32,
                       device=device).eval()
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16_autocast" else "no",
                              cpu=device.type == "cpu")
    data = PreparedData(train=[], eval=examples, eval_conversations=kept, source_names=[source.name])
    loss_model = LossModel(model, resolve_loss_impl(model, cfg.loss_impl)).to(device)
    autocast = accelerator.autocast() if precision == "bf16_autocast" else contextlib.nullcontext()
    with autocast:
        loss, _ = held_out_losses(accelerator, loss_model, held_out_batches(data, cfg.eval_batch_size,
                                                                               tokenizer.pad_token_id), [source.name])
        n = max(cfg.num_samples, cfg.task_metric_rows)
        metric = cfg.task_metric or "exact_match"
        prompts, references = zip(*(prompt_and_reference(c, metric) for c in kept[:n])) if kept else ((), ())
        decoding = Decoding.from_config(cfg)
        replies = generate_replies(model, tokenizer, list(prompts), decoding, cfg.generation_batch_size,
                                   progress="generating", tools=tools[:n])
    metric_rows = min(cfg.task_metric_rows, len(replies))
    scored = task_metric(metric, replies[:metric_rows], list(references[:metric_rows])) if metric_rows else None
    return {"dataset": {**read, "revision": source.revision, "files": source.files, "split": source.split},
            "examples": stats, "eval_loss": loss, "task_metric_name": metric, metric: scored,
            f"{metric}_rows": metric_rows, "decoding": decoding.record(),
            "samples": sample_records(tokenizer, prompts, tools, replies, references,
                                      min(cfg.num_samples, len(replies)))}


def run_lm_eval(model_path: str, revision: str | None, tasks: list[str], include: str | None, limit: int | None,
                device: torch.device) -> dict:
    """lm-evaluation-harness tasks on the model through its `hf` model class, with the model's chat template.
    Returns lm-eval's per-task results and the versions of the tasks."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("lm-eval tasks need lm-evaluation-harness: pip install lm-eval") from None
    manager = TaskManager(include_path=include) if include else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"lm-eval: unknown task(s) {unknown}" + ("" if include else
                          "; tasks of your own need --lm-eval-include DIR"))
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    from .modeling import resolve_model_source

    adapter = None
    if Path(model_path, "adapter_config.json").is_file():  # lm-eval applies the adapter to its base itself
        from .lora import adapter_base

        adapter, (model_path, revision) = model_path, adapter_base(model_path)
    source, pinned = resolve_model_source(model_path, revision)  # the embedded model's folder; a hub id's revision
    model_args = (f"pretrained={source},dtype={dtype}" + (f",revision={pinned['revision']}" if pinned else "")
                  + (f",peft={adapter}" if adapter else ""))
    out = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks,
                                  task_manager=manager, device=str(device), batch_size=8, limit=limit,
                                  apply_chat_template=True, log_samples=False)
    return {"results": out["results"], "versions": out.get("versions", {}), "limit": limit}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run folder")
    parser.add_argument("--dataset", help="a local file or folder, or a hub dataset id (with --revision)")
    parser.add_argument("--format", default="auto", help="the dataset's format (default: detected)")
    parser.add_argument("--revision", help="the hub dataset's pinned revision")
    parser.add_argument("--files", help="files inside the hub dataset repository")
    parser.add_argument("--split", default="train", help="the hub dataset's split (default train)")
    parser.add_argument("--max-rows", type=int, help="score the first N rows")
    parser.add_argument("--heldout", action="store_true",
                        help=f"score the run's own held-out conversations ({HELDOUT} in the run folder)")
    parser.add_argument("--model", help="score this model instead of the run's (e.g. its base model): a folder, "
                                        "embedded:smollm2-135m-instruct, or a hub id with --model-revision")
    parser.add_argument("--model-revision", help="the hub model's pinned revision (a commit sha or tag)")
    parser.add_argument("--lm-eval-tasks", help="comma-separated lm-evaluation-harness tasks")
    parser.add_argument("--lm-eval-include", help="a folder of task YAML files of your own")
    parser.add_argument("--lm-eval-limit", type=int, help="at most N examples per lm-eval task")
    parser.add_argument("--name", help="the result's name (eval/<name>.json)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    args = parser.parse_args(argv)
    try:
        out = evaluate(args.run, dataset=args.dataset, dataset_format=args.format, revision=args.revision,
                       files=args.files, split=args.split, max_rows=args.max_rows, heldout=args.heldout,
                       model=args.model, model_revision=args.model_revision,
                       lm_eval_tasks=args.lm_eval_tasks.split(",") if args.lm_eval_tasks else None,
                       lm_eval_include=args.lm_eval_include, lm_eval_limit=args.lm_eval_limit, name=args.name,
                       device=args.device)
    except SFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = json.loads(out.read_text())
    lines = [f"{out}"]
    if "eval_loss" in result:
        metric = result["task_metric_name"]
        lines.append(f"held-out loss {result['eval_loss']:.4f}, {metric.replace('_', ' ')} {result[metric]} "
                     f"({result[metric + '_rows']} rows), {result['examples']['examples']} examples")
    for task, metrics in (result.get("lm_eval") or {}).get("results", {}).items():
        lines.append(f"lm-eval {task}: " + ", ".join(f"{k} {v}" for k, v in metrics.items() if k != "alias"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
