"""What the benchmarks train on: random-init Llama and MPT shapes and synthetic instruction-length examples.

The length distribution is the anchor's (TRL 1.16 on one H100, bench/README.md): lognormal, median 300
tokens, clipped to 24..2048, the first 20-60% of each example a prompt without loss. Reasoning-length data
(`LENGTHS["long"]`) has the same shape around a median of 4096 tokens, clipped to 256..16384. Token ids are uniform
random, which is all a throughput or precision measurement needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sft.packing import Example, shift_labels
from sft.templates import IGNORE_INDEX

ARCH = {
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
    # Llama-3.1-8B's shape, with positions for rows of 16k tokens
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                     max_position_embeddings=16384),
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    # mosaicml/mpt-7b's dimensions (ALiBi attention, no position embeddings, 2048-token context)
    "mpt-7b": dict(family="mpt", vocab_size=50432, d_model=4096, n_heads=32, n_layers=32, expansion_ratio=4,
                   max_seq_len=2048),
    "tiny-mpt": dict(family="mpt", vocab_size=1000, d_model=64, n_heads=4, n_layers=2, expansion_ratio=2,
                     max_seq_len=512),
}
MAX_POSITION_EMBEDDINGS = 4096
LENGTH_MEDIAN = 300
LENGTH_SIGMA = 0.8
LENGTH_RANGE = (24, 2048)
# the example lengths of each kind of data: (median, shortest, longest)
LENGTHS = {"instruction": (LENGTH_MEDIAN, *LENGTH_RANGE), "long": (4096, 256, 16384)}
PROMPT_FRACTION = (0.2, 0.6)
FIRST_TOKEN_ID = 10  # ids below are the special tokens of the benchmark tokenizer


@dataclass(frozen=True)
class SyntheticExample:
    input_ids: list[int]
    prompt_length: int

    def to_example(self) -> Example:
        """The trainer's form: targets shifted inside the example, the prompt without loss."""
        p = self.prompt_length
        return shift_labels(self.input_ids, [IGNORE_INDEX] * p + self.input_ids[p:])

    def completion_mask(self) -> list[int]:
        """TRL's form of the same supervision."""
        return [0] * self.prompt_length + [1] * (len(self.input_ids) - self.prompt_length)


def synthetic_examples(tokens: int, vocab_size: int, seed: int = 0, max_length: int | None = None,
                       lengths: str = "instruction") -> list[SyntheticExample]:
    """Examples until their lengths add up to at least `tokens`, with the lengths of `lengths` (a key of
    LENGTHS), clipped to `max_length` if it is shorter than their longest."""
    median, shortest, longest = LENGTHS[lengths]
    longest = longest if max_length is None else min(longest, max_length)
    rng = np.random.default_rng(seed)
    examples, total = [], 0
    while total < tokens:
        length = int(np.clip(rng.lognormal(math.log(median), LENGTH_SIGMA), min(shortest, longest), longest))
        prompt = max(1, int(length * rng.uniform(*PROMPT_FRACTION)))
        examples.append(SyntheticExample(rng.integers(FIRST_TOKEN_ID, vocab_size, length).tolist(), prompt))
        total += length
    return examples


def benchmark_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def model_config(arch: str):
    from transformers import LlamaConfig, MptConfig

    settings = dict(ARCH[arch])
    if settings.pop("family", "llama") == "mpt":
        return MptConfig(pad_token_id=0, eos_token_id=1, bos_token_id=1, **settings)
    settings.setdefault("max_position_embeddings", MAX_POSITION_EMBEDDINGS)
    return LlamaConfig(pad_token_id=0, eos_token_id=1, bos_token_id=1, **settings)


def model_folder(arch: str, path: Path) -> Path:
    """A folder with config.json and a tokenizer and no weights: the trainer's `random-init:<folder>`."""
    path.mkdir(parents=True, exist_ok=True)
    model_config(arch).save_pretrained(path)
    benchmark_tokenizer().save_pretrained(path)
    return path
