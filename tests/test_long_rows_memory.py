"""Long packed rows cost memory linear in their length. One optimizer step of the trainer (`sft.setup.build` and
`train_step`: collation, the selected loss in chunks, the backward pass, AdamW) on a tiny Llama, at rows of 1024,
2048 and 4096 tokens, each packed with several examples whose positions restart, on the path the trainer takes
for packed rows on a GPU: sft.attention's varlen function, here with a per-segment CPU kernel in place of the
flash kernel. No tensor of the step has more than a fixed number of elements per token (a [T, T] one would have
T), and the step's peak memory grows linearly with T. sdpa, which the trainer uses on the CPU, builds a dense
[T, T] mask for packed rows: the same check finds it there."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.synthetic import SyntheticExample, benchmark_tokenizer
from sft import attention
from sft.config import TrainConfig
from sft.data import PreparedData

LENGTHS = (1024, 2048, 4096)
MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=max(LENGTHS), pad_token_id=0, eos_token_id=1,
             bos_token_id=1)
PER_TOKEN = 256  # elements per token that no tensor of the step exceeds: the MLP's 128 is the widest


def segment_kernel(query, key, value, cu_seqlens, max_seqlen, scale):
    """Causal attention inside each segment, the flash kernel's interface (q [N, Hq, D], k/v [N, Hkv, D]) and,
    like it, no score tensor: sdpa without a mask runs torch's CPU flash kernel."""
    groups = query.shape[1] // key.shape[1]
    bounds = cu_seqlens.tolist()
    out = []
    for a, b in zip(bounds, bounds[1:]):
        q = query[a:b].transpose(0, 1)[None]  # [1, H, L, D]
        k, v = (t[a:b].transpose(0, 1).repeat_interleave(groups, dim=0)[None] for t in (key, value))
        out.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[0].transpose(0, 1))
    return torch.cat(out)


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operator makes, and that operator."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


def packed_examples(length: int) -> list:
    """Two rows' worth of examples of length/2, /4, /4, /8 x 4, a third of each a prompt: best-fit decreasing packs
    them into two full rows of several examples each."""
    rng = torch.Generator().manual_seed(length)
    sizes = [length // 2, length // 2, length // 4, length // 4] + [length // 8] * 4
    return [SyntheticExample(torch.randint(10, MODEL["vocab_size"], (n,), generator=rng).tolist(), n // 3).to_example()
            for n in sizes]


def one_step(tmp_path, length: int, attn_implementation: str | None = None) -> tuple[int, LargestTensor, str]:
    """(peak bytes allocated during the second optimizer step, beyond what was allocated before it; its largest
    tensor; the attention implementation the trainer chose). The first step creates AdamW's states."""
    from transformers import LlamaConfig

    from sft.loop import train_step
    from sft.setup import build

    folder = tmp_path / f"model{length}"
    LlamaConfig(**MODEL).save_pretrained(folder)
    benchmark_tokenizer().save_pretrained(folder)
    cfg = TrainConfig(experiment="long_rows", model=f"random-init:{folder}", template="plain", max_length=length,
                      micro_batch_size=1, grad_accum_steps=1, max_steps=2, precision="fp32", lr=1e-3,
                      lr_schedule="constant", warmup_ratio=0.0, loss_chunk_tokens=256, task_metric=None,
                      num_samples=0, save_model=False, report_to=(), runs_root=str(tmp_path / "runs"))
    setup = build(cfg, PreparedData(train=packed_examples(length), eval=[], eval_conversations=[], stats={}),
                  attn_implementation=attn_implementation)
    first, second = setup.batches()
    assert len(second[0]["input_ids"][0]) == length and setup.data.stats["packing_efficiency"] == 1.0
    assert (second[0]["position_ids"][0] == 0).sum() >= 3  # several examples in the row
    train_step(setup, first)
    largest = LargestTensor()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, largest:
        train_step(setup, second)
    allocations = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                         key=lambda e: e.start_ns())
    live = peak = 0
    for event in allocations:  # frees are negative
        live += event.nbytes()
        peak = max(peak, live)
    return peak, largest, setup.derived["attn_implementation"]



@pytest.fixture
def varlen_path():
    """The trainer's GPU path for packed rows, with the CPU kernel in the flash kernel's place: the attention
    implementation to build with."""
    with attention.varlen_kernel(segment_kernel):
        yield attention.register()


def test_packed_rows_cost_memory_linear_in_their_length_and_no_tensor_is_t_by_t(tmp_path, varlen_path):
    peaks, largest = {}, {}
    for length in LENGTHS:
        peaks[length], largest[length], attn = one_step(tmp_path, length, varlen_path)
        assert attn == attention.IMPLEMENTATION
        assert largest[length].numel <= PER_TOKEN * length, (length, largest[length].op)
    small, middle, large = (peaks[t] for t in LENGTHS)
    # twice the tokens add twice the memory (a [T, T] tensor would add four times, then eight)
    assert large - middle == pytest.approx(2 * (middle - small), rel=0.25), peaks
    assert large < 4.5 * small, peaks
    assert largest[LENGTHS[-1]].numel <= 4.5 * largest[LENGTHS[0]].numel


def test_the_check_finds_the_t_by_t_mask_of_sdpa_with_packed_rows(tmp_path):
    """sdpa (the trainer's CPU default) gets a dense block-diagonal mask from transformers for packed rows."""
    length = LENGTHS[0]
    _, largest, attn = one_step(tmp_path, length)
    assert attn == "sdpa" and largest.numel >= length * length, largest.op
