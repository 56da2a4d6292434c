"""Generation for samples and the task metric, from prompts encoded exactly as in training.

Decoding settings are explicit and recorded: the model's own generation_config (which may carry a
repetition penalty, a temperature or a top_k) is never consulted.
"""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import asdict, dataclass, fields

import torch
from tqdm.auto import tqdm

from .template_traits import Reply, parse_reply
from .templates import encode_chat, stop_tokens


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    @classmethod
    def from_config(cls, cfg) -> "Decoding":
        """The decoding a run's settings give (same-named fields): a TrainConfig, or the `config` record of a
        run folder's config.json."""
        setting = cfg.__getitem__ if isinstance(cfg, dict) else cfg.__getattribute__
        return cls(*(setting(f.name) for f in fields(cls)))

    def record(self) -> dict:
        out = asdict(self)
        if not self.do_sample:  # greedy: temperature and top_p play no part, so none is claimed
            out.pop("temperature")
            out.pop("top_p")
        return out


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and every token the chat template closes a turn with (gpt-oss: `<|return|>` and `<|call|>`)."""
    ids = {tokenizer.eos_token_id, *(tokenizer.convert_tokens_to_ids(t) for t in stop_tokens(tokenizer))}
    return sorted(i for i in ids if i is not None and i >= 0 and i != tokenizer.unk_token_id)


def generation_config(tokenizer, decoding: Decoding, **fixed):
    """The GenerationConfig of `decoding`, stopping at end of turn; `fixed`: further fields (cache, length)."""
    from transformers import GenerationConfig

    sampling = ({"do_sample": True, "temperature": decoding.temperature, "top_p": decoding.top_p,
                 "top_k": 0}  # left None, transformers would sample from the top 50 only
                if decoding.do_sample else {"do_sample": False})
    return GenerationConfig(max_new_tokens=decoding.max_new_tokens, num_beams=1, **sampling,
                            eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, **fixed)


@contextlib.contextmanager
def only_given_settings(model, seed: int):
    """Inside, `model.generate(generation_config=...)` decodes with exactly the given config, and sampling
    draws from `seed` without touching the caller's random stream.

    transformers fills every field the given config leaves None from the model's generation_config.json
    (Qwen2.5-Instruct ships repetition_penalty=1.05): a blank one stands in for it meanwhile. The random
    state is forked so that a generation pass between training steps leaves training's stream as it was.
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    saved = model.generation_config
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.generation_config = GenerationConfig()
        try:
            yield
        finally:
            model.generation_config = saved


def generate(model, tokenizer, prompts: list[list[dict]], decoding: Decoding, batch_size: int = 16,
             synced: bool = False, progress: str | None = None, tools: list | None = None) -> list[str]:
    """The answer of each reply of `generate_replies` (its content, without reasoning or tool calls)."""
    return [r.content for r in generate_replies(model, tokenizer, prompts, decoding, batch_size, synced, progress,
                                                tools)]


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list[list[dict]], decoding: Decoding, batch_size: int = 16,
                     synced: bool = False, progress: str | None = None, tools: list | None = None) -> list[Reply]:
    """Replies to each prompt (a conversation ending with a user or tool turn), stopping at end of turn, split
    into reasoning, answer and tool calls in the chat template's format. `tools`: each prompt's function
    schemas, given to the template as at training. `synced`: the model is sharded (FSDP), so every process
    keeps stepping until all have finished. `progress`: a label for a progress bar over the batches."""
    config = generation_config(tokenizer, decoding)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tools = tools or [None] * len(prompts)
    encoded = [encode_chat(tokenizer, p, add_generation_prompt=True, tools=t).input_ids for p, t in zip(prompts, tools)]
    replies: list[Reply] = [Reply("")] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    bar = tqdm(total=-(-len(order) // batch_size), desc=progress, disable=progress is None, leave=False, unit="batch",
               dynamic_ncols=True)
    with only_given_settings(model, decoding.seed), bar:  # the bar closes on an error too, before it is printed
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            longest = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), longest), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), longest), dtype=torch.long)
            for row, i in enumerate(idx):  # left padding: every prompt ends where generation starts
                ids[row, longest - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, longest - len(encoded[i]):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                 synced_gpus=synced)
            for row, i in enumerate(idx):
                replies[i] = parse_reply(tokenizer, tokenizer.decode(_until_stop(out[row, longest:].tolist(), config),
                                                                     skip_special_tokens=False))
            bar.update(1)
    model.train(was_training)
    return replies


def _until_stop(ids: list[int], config) -> list[int]:
    """The generated ids up to and including the first stop token (padding after it dropped)."""
    stops = set(config.eos_token_id)
    for k, i in enumerate(ids):
        if i in stops:
            return ids[:k + 1]
    return ids


def normalize_answer(text: str) -> str:
    """Whitespace collapsed, surrounding space and a final period removed; case is kept."""
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip()


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return float("nan")
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / len(references)


def tool_call_match(predictions: list[Reply], references: list[str]) -> float:
    """The share of replies whose tool calls are the reference's (JSON text of `[{"name", "arguments"}]`): the
    same names in the same order, arguments equal as JSON values (a call's arguments given as JSON text are
    read first)."""
    if not references:
        return float("nan")

    def calls(items) -> list:
        out = []
        for c in items:
            arguments = c.get("arguments")
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    pass
            out.append((c.get("name"), arguments))
        return out

    hits = sum(calls(p.tool_calls) == calls(json.loads(r)) for p, r in zip(predictions, references))
    return hits / len(references)


TASK_METRICS = {"exact_match": lambda replies, refs: exact_match([r.content for r in replies], refs),
                "tool_call_match": tool_call_match}


def task_metric(name: str, replies: list[Reply], references: list[str]) -> float:
    """The named held-out metric of generated replies against the references (see `prompt_and_reference`)."""
    return TASK_METRICS[name](replies, references)
