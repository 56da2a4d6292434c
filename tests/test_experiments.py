"""Every experiment script's settings are valid, and the hub experiments' code paths run end to end on
local files of the same schema with tiny random-init models of the same architecture family."""
from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

import pytest
import torch

import sft.experiments
from sft.analysis import read_samples
from sft.config import TrainConfig, settings_from
from sft.errors import ConfigError
from sft.run import run
from conftest import write_jsonl

SCRIPTS = [m.name for m in pkgutil.iter_modules(sft.experiments.__path__)]


def script_settings(name: str) -> dict:
    return settings_from(vars(importlib.import_module(f"sft.experiments.{name}")))


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_experiment_script_builds_a_valid_config(name):
    cfg = TrainConfig(**script_settings(name))
    assert cfg.experiment == name


def test_a_misspelt_constant_is_an_error_not_a_silent_default():
    with pytest.raises(ConfigError, match="LEARNING_RATE: not a setting"):
        settings_from({"EXPERIMENT": "x", "LEARNING_RATE": 1e-4})


def bpe_tokenizer(path: Path, *, bos: str | None, eos: str, add_bos: bool):
    """A small byte-level BPE tokenizer in the style of GPT-NeoX (MPT) or Llama 3 base: no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in (bos, eos) if t]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["### Human: What is the capital of France? ### Assistant: Paris is the capital.",
            "You are a helpful assistant. Answer the question with care and detail."] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=None)
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="module")
def tiny_mpt(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, MptConfig

    path = tmp_path_factory.mktemp("tiny-mpt")
    tok = bpe_tokenizer(path, bos="<|endoftext|>", eos="<|endoftext|>", add_bos=False)
    torch.manual_seed(0)
    config = MptConfig(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=512,
                       vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama3_base(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("tiny-llama3-base")
    tok = bpe_tokenizer(path, bos="<|begin_of_text|>", eos="<|end_of_text|>", add_bos=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, rope_theta=500000.0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def dolphin_rows(n: int) -> list[dict]:
    return [{"instruction": "You are an AI assistant. Answer briefly." if i % 2 else "",
             "input": f"What is {i} plus {i}?", "output": f"{i} plus {i} is {2 * i}."} for i in range(n)]


def guanaco_rows(n: int) -> list[dict]:
    return [{"text": f"### Human: Tell me about the number {i}.### Assistant: {i} is a number."
                     f" ### Human: And {i + 1}?### Assistant: {i + 1} comes after {i}."} for i in range(n)]



def local_version(name: str, model: Path, tmp_path: Path, **data) -> TrainConfig:
    """The script's own settings, with the hub model and data swapped for local stand-ins and a short run."""
    settings = script_settings(name)
    settings.update(model=str(model), model_revision=None, dataset_revision=None, dataset_files=None,
                    max_rows=None, max_length=256, micro_batch_size=2, grad_accum_steps=2, max_steps=2,
                    eval_every=1, num_samples=2, max_new_tokens=8, runs_root=str(tmp_path / "runs"),
                    save_model=False, **data)
    return TrainConfig(**settings)


def test_mpt7b_dolphin_path_runs_on_a_tiny_mpt(tiny_mpt, tmp_path):
    cfg = local_version("mpt7b_dolphin", tiny_mpt, tmp_path,
                        dataset=write_jsonl(tmp_path / "dolphin.jsonl", dolphin_rows(40)), eval_rows=6)
    folder = run(cfg)
    config = json.loads((folder.path / "config.json").read_text())
    assert config["derived"]["template"] == "plain"
    assert config["derived"]["bf16_update"] == "stochastic_rounding"
    stats = json.loads((folder.path / "data_stats.json").read_text())
    assert stats["format"] == "dolphin" and stats["rows_kept"] == 40
    summary = json.loads((folder.path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 2


def test_mpt_packs_with_its_own_attention_and_refuses_packing_on_transformers_eager_one(tiny_mpt, tmp_path):
    data = dict(dataset=write_jsonl(tmp_path / "g.jsonl", guanaco_rows(20)),
                eval_dataset=write_jsonl(tmp_path / "g_test.jsonl", guanaco_rows(4)))
    assert script_settings("mpt7b_guanaco")["packing"] and script_settings("mpt7b_dolphin")["packing"]
    folder = run(local_version("mpt7b_guanaco", tiny_mpt, tmp_path, **data))
    config = json.loads((folder.path / "config.json").read_text())
    assert config["derived"]["attn_implementation"] == "packed ALiBi (sdpa)"  # flex attention on GPUs
    assert config["derived"]["packing_efficiency"] > 0.5
    with pytest.raises(ConfigError, match="takes no position ids"):
        run(local_version("mpt7b_guanaco", tiny_mpt, tmp_path, attn_implementation="eager", **data))


@pytest.mark.parametrize("name", ["mpt7b_guanaco", "llama31_8b_guanaco"])
def test_guanaco_experiments_run_on_tiny_models_of_their_family(name, tiny_mpt, tiny_llama3_base, tmp_path):
    model = tiny_mpt if name.startswith("mpt") else tiny_llama3_base
    cfg = local_version(name, model, tmp_path, dataset=write_jsonl(tmp_path / "g.jsonl", guanaco_rows(30)),
                        eval_dataset=write_jsonl(tmp_path / "g_test.jsonl", guanaco_rows(4)))
    folder = run(cfg)
    stats = json.loads((folder.path / "data_stats.json").read_text())
    assert stats["format"] == "guanaco" and stats["eval_source"]["rows_read"] == 4
    samples = read_samples(folder.path)
    assert samples[0]["prompt"].endswith("### Assistant:\n")
    if name.startswith("llama"):  # the base tokenizer adds BOS, so the plain template starts with exactly one
        assert samples[0]["prompt"].startswith("<|begin_of_text|>### Human:")
        assert not samples[0]["prompt"].startswith("<|begin_of_text|><|begin_of_text|>")
    assert json.loads((folder.path / "summary.json").read_text())["status"] == "completed"
