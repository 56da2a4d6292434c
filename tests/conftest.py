"""Shared fixtures: tiny random-init models built from configs, with the embedded model's tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def chatml_tokenizer():
    """SmolLM2's tokenizer: ChatML template, eos = pad = <|im_end|>, no BOS added."""
    from sft.modeling import load_tokenizer

    return load_tokenizer("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, chatml_tokenizer) -> Path:
    """A 2-layer Llama with SmolLM2's vocabulary and tokenizer, saved as a local model folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=len(chatml_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         eos_token_id=chatml_tokenizer.eos_token_id, pad_token_id=chatml_tokenizer.pad_token_id,
                         bos_token_id=chatml_tokenizer.bos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    chatml_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    """The tiny model's tokenizer, loaded from its folder as training loads it."""
    from sft.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A tokenization cache of the test's own, so cache hits and misses are the test's alone."""
    import sft.data

    path = tmp_path / "cache"
    monkeypatch.setattr(sft.data, "cache_root", lambda: path)
    return path


@pytest.fixture
def tiny_config(tiny_model_dir, tmp_path):
    """A TrainConfig for a few fast steps of the tiny model on the demo tasks."""
    from sft.config import TrainConfig

    def make(**overrides):
        settings = dict(experiment="tiny", model=str(tiny_model_dir), eval_rows=8, max_rows=64, max_length=128,
                        micro_batch_size=2, grad_accum_steps=2, lr=1e-3, max_steps=3, task_metric_rows=4,
                        num_samples=2, max_new_tokens=4, runs_root=str(tmp_path / "runs"), save_model=False,
                        precision="fp32")
        settings.update(overrides)
        return TrainConfig(**settings)

    return make


def write_jsonl(path, rows: list[dict]) -> str:
    """A JSONL file of `rows` (UTF-8), as a dataset source names it."""
    import json

    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def trained_runs(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Two run folders the trainer wrote (the tiny model, 4 optimizer steps, a held-out evaluation every 2, two
    samples before and after; the second with a 3x learning rate), shared by the tests that read run folders:
    analysis, figures, comparison, notebook. Copy one before changing it."""
    from sft.config import TrainConfig
    from sft.run import run

    root = tmp_path_factory.mktemp("trained") / "runs"
    common = dict(experiment="demo", model=str(tiny_model_dir), eval_rows=8, max_rows=64, max_length=128,
                  micro_batch_size=2, grad_accum_steps=2, max_steps=4, eval_every=2, log_every=1, task_metric_rows=4,
                  num_samples=2, max_new_tokens=4, runs_root=str(root), save_model=False, precision="fp32",
                  report_to=())
    return tuple(run(TrainConfig(lr=lr, **common)).path for lr in (1e-3, 3e-3))
