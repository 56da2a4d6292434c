"""The model card of a run: `model/README.md`, generated from the run folder's files alone.

    python -m sft.card runs/<run>           # (re)writes runs/<run>/model/README.md
    python -m sft.card runs/<run> --stdout  # prints it instead

Written at the end of every run that saves its model. The metadata block is huggingface_hub's
`ModelCardData` (base model, datasets, licence, library and pipeline, and a model-index with the held-out
loss and the task metric), so the hub shows the card as it shows any other. The body holds the training
settings, the data statistics, the loss curve, samples before and after training, the environment and a
usage snippet with the run's own chat template and decoding settings.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .analysis import Run, load_run, samples_side_by_side
from .config import EMBEDDED_MODEL, TrainConfig
from .errors import DataError, SFTError

EMBEDDED_BASE = {EMBEDDED_MODEL: ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
SETTINGS_SHOWN = ("model", "model_revision", "dataset", "datasets", "dataset_revision", "dataset_files", "max_rows",
                  "template", "system_prompt", "max_length", "loss_on", "packing", "epochs", "max_steps",
                  "micro_batch_size", "grad_accum_steps", "lr", "lr_schedule", "warmup_ratio", "min_lr_ratio",
                  "weight_decay", "adam_betas", "max_grad_norm", "seed", "precision", "bf16_update",
                  "optimizer_state_dtype", "gradient_checkpointing", "compile", "finetune")
ADAPTER_SETTINGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_dora", "use_rslora",
                    "modules_to_save", "load_in_4bit", "merge_adapter")


def _hub_id(name: str | None) -> str | None:
    """A hub repository id (owner/name) that is not a local path; None otherwise."""
    if not name or name.startswith("embedded:") or Path(name).expanduser().exists() or name.count("/") != 1:
        return None
    return name


def base_model(config: dict) -> tuple[str | None, str]:
    """(hub id of the base model or None, its licence as the hub spells it; 'other' when unknown). A local
    folder's licence is read from the metadata of its own README.md."""
    model = config["model"]
    if model in EMBEDDED_BASE:
        return EMBEDDED_BASE[model]
    hub = _hub_id(model)
    readme = Path(model.removeprefix("random-init:")).expanduser() / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            licence = ModelCard.load(readme).data.license
        except Exception:  # noqa: BLE001 - a card that does not parse gives no licence
            licence = None
        return hub, licence or "other"
    return hub, "other"


def datasets_of(config: dict) -> list[dict]:
    """Each dataset of the run with its revision and files, as TrainConfig reads them."""
    cfg = TrainConfig.from_record(config, resume=None)
    return [{"name": s.name, "source": s.dataset, "revision": s.revision, "files": s.files, "share": s.share}
            for s in cfg.sources()]


def data_sources(config: dict) -> dict[str, bool]:
    """Every dataset the run read (its training sources, then a separate held-out dataset), and whether it
    came from the hub: a hub dataset is read only at a pinned revision, a path never needs one."""
    found = {d["source"]: bool(d["revision"] and _hub_id(d["source"])) for d in datasets_of(config)}
    held_out = config.get("eval_dataset")
    if held_out:
        revision = config.get("eval_dataset_revision") or (config.get("dataset_revision")
                                                           if held_out == config.get("dataset") else None)
        found.setdefault(held_out, bool(revision and _hub_id(held_out)))
    return found


def adapter_kind(config: dict) -> str | None:
    """What an adapter run trained, as the card names it: "LoRA", "DoRA", "QLoRA" (None: a full finetune)."""
    if config.get("finetune", "full") == "full":
        return None
    return ("Q" if config.get("load_in_4bit") else "") + ("DoRA" if config.get("use_dora") else "LoRA")


def card_data(run: Run, merged: bool = False):
    """The metadata block; `merged`: the card of model_merged/, a plain transformers model."""
    from huggingface_hub import EvalResult, ModelCardData

    base, licence = base_model(run.config)
    hub_datasets = [s for s, hub in data_sources(run.config).items() if hub]  # the others: named in the text
    eval_name = run.config.get("eval_dataset") or run.config["dataset"]
    results = []
    for metric, value in (("loss", run.summary.get("eval_loss_final")),
                          (run.summary.get("task_metric_name"), run.summary.get("task_metric_after"))):
        if metric and isinstance(value, (int, float)):
            results.append(EvalResult(task_type="text-generation", dataset_type=_hub_id(eval_name) or "local",
                                      dataset_name=f"{Path(eval_name).name} (held out)", metric_type=metric,
                                      metric_name=f"held-out {metric}", metric_value=round(float(value), 4)))
    kind = adapter_kind(run.config)
    tags = ["sft", "full-finetune"] if kind is None else ["sft", "peft", kind.lower()] + (["merged"] if merged else [])
    return ModelCardData(base_model=base, datasets=hub_datasets or None, license=licence,
                         library_name="peft" if kind and not merged else "transformers",
                         pipeline_tag="text-generation", tags=tags, model_name=run.name,
                         eval_results=results or None)


def card_text(run_dir, merged: bool = False) -> str:
    """The card of a run folder (its config.json, env.json, data_stats.json, metrics.jsonl, samples.jsonl and
    summary.json); `merged`: of its model_merged/ folder (an adapter run's base with the adapter merged)."""
    run = load_run(run_dir)
    if run.summary.get("status") != "completed":
        raise DataError(f"{run.path}: the run has not completed (status {run.status!r}); a card describes a "
                        f"finished model")
    data = card_data(run, merged)
    base, _ = base_model(run.config)
    names = ", ".join(f"`{d['name']}`" for d in datasets_of(run.config))
    parts = [f"# {run.name}\n",
             f"{_what_trained(run, merged)} `{base or run.config['model']}`"
             + (f" (revision `{run.config['model_revision']}`)" if run.config.get("model_revision") else "")
             + f" on {names}, with loss on "
             f"{'assistant tokens only' if run.config['loss_on'] == 'assistant' else 'all tokens'}.\n",
             _off_hub(run), _results(run), _usage(run), _settings(run), _data(run), _curve(run), _samples(run),
             _environment(run)]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(p for p in parts if p)


def _what_trained(run: Run, merged: bool) -> str:
    """The card's first words: a full finetune, or the adapter with its size, merged into the base or not."""
    kind = adapter_kind(run.config)
    if kind is None:
        return "Full-parameter supervised finetune of"
    adapter, derived = run.derived.get("adapter") or {}, run.derived
    share = derived.get("trainable_parameters", 0) / max(1, derived.get("num_parameters", 1))
    size = (f"rank {adapter.get('r')}, alpha {adapter.get('lora_alpha')}, on "
            f"{', '.join(adapter.get('target_modules') or [])}; {derived.get('trainable_parameters', 0):,} trainable "
            f"parameters, {share:.2%} of {derived.get('num_parameters', 0):,}")
    return (f"{kind} adapter ({size})" + (", merged into its base model" if merged else "")
            + " from supervised finetuning of")


def _off_hub(run: Run) -> str:
    """The datasets that the metadata cannot name, since they are not on the hub."""
    local = [s for s, hub in data_sources(run.config).items() if not hub]
    if not local:
        return ""
    kind = lambda s: "embedded in this toolkit" if s.startswith("embedded:") else "a local file or folder"  # noqa: E731
    return ("Data that is not on the hub (so the metadata's `datasets` does not list it): "
            + ", ".join(f"`{s}` ({kind(s)})" for s in local) + ".\n")


def _results(run: Run) -> str:
    s = run.summary
    rows = [("held-out loss", s.get("eval_loss_first"), s.get("eval_loss_final"))]
    if s.get("task_metric_name"):
        rows.append((s["task_metric_name"], s.get("task_metric_before"), s.get("task_metric_after")))
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["## Results\n", "| metric | before | after |", "|---|---|---|"]
    lines += [f"| {name} | {fmt(before)} | {fmt(after)} |" for name, before, after in rows]
    lines.append(f"\n{s.get('global_step')} optimizer steps, {s.get('train_runtime')} s of training, "
                 f"{s.get('real_tokens_per_second')} real tokens/s.\n")
    return "\n".join(lines)


def _usage(run: Run) -> str:
    cfg = run.config
    sampling = (f"do_sample=True, temperature={cfg['temperature']}, top_p={cfg['top_p']}, top_k=0"
                if cfg["do_sample"] else "do_sample=False")
    return ("## Usage\n\nThe tokenizer carries the chat template the model was trained with"
            + (f" (with the system prompt {cfg['system_prompt']!r})" if cfg.get("system_prompt") else "")
            + "; the decoding settings are those of the run's samples.\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'path = "."  # this folder, or the hub repository it was uploaded to\n'
            "tokenizer = AutoTokenizer.from_pretrained(path)\n"
            "model = AutoModelForCausalLM.from_pretrained(path)\n"
            'messages = [{"role": "user", "content": "Hello!"}]\n'
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",\n"
            "                                       return_dict=True)\n"
            f"out = model.generate(**inputs, max_new_tokens={cfg['max_new_tokens']}, {sampling})\n"
            'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n```\n'
            + _adapter_usage(run)
            + "\nOr, with this toolkit: `python -m sft.chat <this folder>`.\n")


def _adapter_usage(run: Run) -> str:
    """How an adapter folder loads: transformers applies it to the base it names, when peft is installed."""
    if adapter_kind(run.config) is None:
        return ""
    base, _ = base_model(run.config)
    model = run.config["model"]
    where = ("" if _hub_id(model) else f"; the base is `{model}`, which this toolkit loads"
             + (f" (its hub counterpart: `{base}`)" if base else ""))
    return ("\nThis folder holds the adapter (peft's `adapter_config.json` and `adapter_model.safetensors`): with "
            f"peft installed, `from_pretrained` loads its base model and applies it{where}. `model_merged/`, when "
            "the run wrote it, is the base with the adapter merged, for serving without peft.\n")


def _settings(run: Run) -> str:
    lines = ["## Training settings\n", "| setting | value |", "|---|---|"]
    shown = SETTINGS_SHOWN + (ADAPTER_SETTINGS if adapter_kind(run.config) else ())
    lines += [f"| `{k}` | `{json.dumps(run.config[k])}` |" for k in shown
              if k in run.config and run.config[k] is not None]
    for key in ("precision", "bf16_update", "trainable_parameters", "optimizer", "attn_implementation",
                "optimizer_steps", "rows_per_optimizer_step", "num_parameters", "packing_efficiency"):
        if key in run.derived:
            lines.append(f"| `{key}` (derived) | `{json.dumps(run.derived[key])}` |")
    return "\n".join(lines) + "\n"


def _data(run: Run) -> str:
    stats = run.data_stats or {}
    if not stats:
        return ""
    lines = ["## Data\n", "| dataset | rows read | kept | train conversations | held out | train tokens | "
             "supervised tokens |", "|---|---|---|---|---|---|---|"]
    for s in stats.get("sources", []):
        lines.append(f"| `{s['name']}` | {s['rows_read']:,} | {s['rows_kept']:,} | {s['train_conversations']:,} | "
                     f"{s['eval_conversations']:,} | {s['train']['tokens']:,} | {s['train']['supervised_tokens']:,} |")
    train = stats.get("train", {})
    lines.append(f"\nTraining examples: {train.get('examples', 0):,} ({train.get('tokens', 0):,} tokens, "
                 f"{train.get('supervised_fraction', 0):.1%} supervised); packing efficiency "
                 f"{stats.get('packing_efficiency', '-')}.\n")
    return "\n".join(lines)


def _curve(run: Run) -> str:
    return "## Loss curve\n\n![loss curves](loss_curves.png)\n" if (run.path / "loss_curves.png").exists() else ""


def _samples(run: Run) -> str:
    table = samples_side_by_side(run)
    if table.empty:
        return ""
    cell = lambda v: "" if v is None or v != v else str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    lines = ["## Samples (held-out prompts)\n", "| prompt | reference | before | after |", "|---|---|---|---|"]
    for _, r in table.iterrows():
        prompt = r["prompt"]
        lines.append(f"| {cell(prompt)} | {cell(r['reference'])} | {cell(r['response_before'])} | "
                     f"{cell(r['response_after'])} |")
    return "\n".join(lines) + "\n"


def _environment(run: Run) -> str:
    env = run.env
    packages = env.get("packages") or {}
    device = env.get("device") or {}
    git = env.get("git") or {}
    return ("## Environment\n\n"
            f"- device: {device.get('name', device.get('type', '-'))} x {device.get('count', 1)}\n"
            f"- python {env.get('python', '-')}; "
            + ", ".join(f"{k} {v}" for k, v in packages.items() if v and k in ("torch", "transformers", "accelerate",
                                                                                 "datasets")) + "\n"
            f"- code: git {str(git.get('commit'))[:10]}{' (with local changes)' if git.get('dirty') else ''}\n"
            f"- run folder: `{run.name}`, started {env.get('started_at', '-')}\n")


def write_card(run_dir) -> Path:
    """Writes model/README.md (and the loss curve beside it) into a completed run's folder, and the card of
    model_merged/ when an adapter run merged its adapter."""
    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    text = card_text(run_dir)
    if not model_dir.is_dir():
        raise DataError(f"{run_dir}: has no model/ folder (the run was made with save_model=False)")
    for folder, card in ((model_dir, text), (run_dir / "model_merged", None)):
        if not folder.is_dir():
            continue
        if (run_dir / "loss_curves.png").exists():
            shutil.copyfile(run_dir / "loss_curves.png", folder / "loss_curves.png")
        (folder / "README.md").write_text(card or card_text(run_dir, merged=True))
    return model_dir / "README.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft.card", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run folder")
    parser.add_argument("--stdout", action="store_true", help="print the card instead of writing model/README.md")
    args = parser.parse_args(argv)
    try:
        if args.stdout:
            print(card_text(args.run))
        else:
            print(write_card(args.run))
    except SFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
