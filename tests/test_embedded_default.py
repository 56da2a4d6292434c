"""Integration tests on the embedded default model, SmolLM2-135M-Instruct (converted once, then cached)."""
from __future__ import annotations

import json

import pytest
import torch

from sft.config import EMBEDDED_MODEL
from sft.generation import Decoding, generate, generation_config, only_given_settings
from sft.modeling import count_parameters, load_model, load_tokenizer
from sft.templates import encode_chat
from sft.run import run


@pytest.fixture(scope="module")
def smollm2():
    return load_model(EMBEDDED_MODEL), load_tokenizer(EMBEDDED_MODEL)


def test_embedded_default_is_smollm2_135m_instruct(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert count_parameters(model) == 134_515_008
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert "<|im_start|>" in tokenizer.chat_template


def test_embedded_default_answers_and_stops_at_end_of_turn(smollm2):
    model, tokenizer = smollm2
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    decoding = Decoding(max_new_tokens=40)
    (reply,) = generate(model, tokenizer, [prompt], decoding)
    assert "Paris" in reply
    # decoding skips special tokens, so the text cannot show the stop: the generated ids do
    ids = torch.tensor([encode_chat(tokenizer, prompt, add_generation_prompt=True).input_ids])
    with only_given_settings(model, decoding.seed):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=generation_config(tokenizer, decoding))
    new = out[0, ids.shape[1]:].tolist()
    assert len(new) < decoding.max_new_tokens and new[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(new, skip_special_tokens=True).strip() == reply


def test_short_run_on_the_embedded_default(tmp_path):
    folder = run_short(tmp_path)
    summary = json.loads((folder.path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["num_parameters"] == 134_515_008
    assert summary["eval_loss_final"] < summary["eval_loss_first"]


def run_short(tmp_path):
    from sft.config import TrainConfig

    return run(TrainConfig(experiment="embedded_smoke", eval_rows=8, max_rows=80, max_length=128,
                           micro_batch_size=2, grad_accum_steps=1, lr=1e-4, max_steps=3, warmup_ratio=0.0,
                           task_metric_rows=4, num_samples=2, max_new_tokens=8, save_model=False,
                           runs_root=str(tmp_path / "runs")))
