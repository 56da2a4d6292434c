"""Generation decodes with exactly the settings it records and leaves training's random stream alone."""
from __future__ import annotations

import pytest
import torch

from sft.generation import Decoding, generate
from sft.modeling import load_model

PROMPTS = [[{"role": "user", "content": "Count from one to ten."}], [{"role": "user", "content": "Say hi."}]]


@pytest.fixture
def model(tiny_model_dir):
    return load_model(f"random-init:{tiny_model_dir}")


@pytest.mark.parametrize("decoding", [Decoding(max_new_tokens=12), Decoding(max_new_tokens=12, do_sample=True, seed=5)])
def test_the_models_own_generation_config_changes_nothing(model, chatml_tokenizer, decoding):
    plain = generate(model, chatml_tokenizer, PROMPTS, decoding)
    shipped = model.generation_config
    shipped.repetition_penalty, shipped.no_repeat_ngram_size, shipped.top_k = 1.5, 2, 3  # as a model repo might
    assert generate(model, chatml_tokenizer, PROMPTS, decoding) == plain
    assert model.generation_config is shipped  # put back as it was


def test_the_settings_do_reach_generate(model, chatml_tokenizer):
    """The counterpart of the test above: the same penalty, asked for, does change this model's replies."""
    from transformers import GenerationConfig

    from sft.generation import generation_config, only_given_settings

    ids = torch.tensor([chatml_tokenizer("Count from one to ten.").input_ids])
    greedy = generation_config(chatml_tokenizer, Decoding(max_new_tokens=12))
    penalized = GenerationConfig(**{**greedy.to_dict(), "repetition_penalty": 1.5, "no_repeat_ngram_size": 2})
    with only_given_settings(model, seed=0):
        assert not torch.equal(model.generate(input_ids=ids, generation_config=greedy),
                               model.generate(input_ids=ids, generation_config=penalized))


def test_sampling_is_seeded_and_leaves_the_callers_random_state_as_it_was(model, chatml_tokenizer):
    sampled = Decoding(max_new_tokens=12, do_sample=True, seed=5)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = generate(model, chatml_tokenizer, PROMPTS, sampled)
    assert torch.equal(torch.get_rng_state(), before)
    assert generate(model, chatml_tokenizer, PROMPTS, sampled) == first
    assert generate(model, chatml_tokenizer, PROMPTS, Decoding(max_new_tokens=12, do_sample=True, seed=6)) != first
