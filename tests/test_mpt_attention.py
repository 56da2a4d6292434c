"""MPT's packed ALiBi attention (sft.mpt_attention) against transformers' eager MPT attention, on a tiny
random-init MPT in fp32: the same losses and gradients unpacked, the same per-token losses and gradients
packed as unpacked, and a control without the document mask that differs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sft.errors import ConfigError
from sft.loss import LossModel
from sft.modeling import check_packing_support
from sft.mpt_attention import alibi_slopes, choose_kind, install
from sft.packing import IGNORE_INDEX, collate_packed, shift_labels

VOCAB = 97


def tiny_mpt(n_heads: int = 4, clip_qkv: float | None = None, softmax_scale: float | None = None):
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(0)
    config = MptConfig(d_model=8 * n_heads, n_heads=n_heads, n_layers=2, expansion_ratio=2, max_seq_len=128,
                       vocab_size=VOCAB, attn_config={"clip_qkv": clip_qkv, "softmax_scale": softmax_scale})
    return MptForCausalLM(config).eval()


def pair(**kwargs):
    """(eager, packed): the same weights, transformers' attention and this toolkit's sdpa path."""
    eager = tiny_mpt(**kwargs)
    packed = copy.deepcopy(eager)
    install(packed, "sdpa")
    return eager, packed


def examples(lengths=(9, 14, 5), seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [shift_labels(ids, ids) for ids in (torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in lengths)]


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def token_losses(model, input_ids, targets, **kwargs) -> torch.Tensor:
    logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")


@pytest.mark.parametrize("kwargs", [{}, {"n_heads": 6, "clip_qkv": 0.3, "softmax_scale": 0.2}])
def test_unpacked_batches_give_the_eager_losses_and_gradients(kwargs):
    eager, packed = pair(**kwargs)
    batch = torch.randint(1, VOCAB, (3, 20), generator=torch.Generator().manual_seed(0))
    targets = torch.cat([batch[:, 1:], torch.full((3, 1), IGNORE_INDEX)], 1)
    losses = []
    for model in (eager, packed):
        for impl in ("full", "selected"):
            model.zero_grad()
            loss = LossModel(model, impl)(batch, targets)
            loss.backward()
            losses.append((loss.detach(), grads(model)))
    for loss, grad in losses[1:]:
        torch.testing.assert_close(loss, losses[0][0], rtol=1e-5, atol=1e-5)
        for name, g in losses[0][1].items():
            torch.testing.assert_close(grad[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_padded_batches_give_the_eager_losses_of_their_real_tokens():
    eager, packed = pair()
    batch = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(batch)
    mask[0, 10:] = 0
    targets = torch.cat([batch[:, 1:], torch.full((2, 1), IGNORE_INDEX)], 1).masked_fill(mask == 0, IGNORE_INDEX)
    expected = token_losses(eager, batch, targets, attention_mask=mask)
    got = token_losses(packed, batch, targets, attention_mask=mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_packed_rows_give_each_example_its_unpacked_losses_and_gradients():
    eager, packed = pair()
    exs = examples()
    alone_losses = []
    eager.zero_grad()
    for e in exs:  # each example by itself through transformers' eager attention
        ids, tgt = torch.tensor([e.input_ids]), torch.tensor([e.targets])
        losses = token_losses(eager, ids, tgt)
        losses.sum().backward()
        alone_losses.append(losses[tgt.flatten() != IGNORE_INDEX])
    expected = torch.cat(alone_losses)
    expected_grads = grads(eager)

    row = collate_packed([exs], row_length=32, pad_id=0)
    packed.zero_grad()
    losses = token_losses(packed, row["input_ids"], row["targets"], position_ids=row["position_ids"])
    losses.sum().backward()
    real = row["targets"].flatten() != IGNORE_INDEX
    torch.testing.assert_close(losses[real], expected, rtol=1e-5, atol=1e-5)
    for name, g in expected_grads.items():
        torch.testing.assert_close(grads(packed)[name], g, rtol=1e-4, atol=1e-6, msg=name)

    # the same through the training loss, which calls the base model
    packed.zero_grad()
    total = LossModel(packed, "selected")(row["input_ids"], row["targets"], position_ids=row["position_ids"])
    torch.testing.assert_close(total, expected.sum(), rtol=1e-5, atol=1e-4)

    # control: without the position ids that mark the documents, later examples see the earlier ones
    control = token_losses(packed, row["input_ids"], row["targets"])
    first = len(exs[0].input_ids) - 1  # the first example's targets do not change
    assert torch.allclose(control[real][:first], expected[:first], atol=1e-5)
    assert (control[real][first:] - expected[first:]).abs().max() > 1e-3


def test_generation_with_a_kv_cache_gives_the_eager_tokens():
    eager, packed = pair()
    prompt = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # left padding, as generation pads
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(packed.generate(prompt, **kwargs), eager.generate(prompt, **kwargs))


def test_slopes_are_transformers_alibi_for_any_head_count():
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    for heads in (4, 6, 32):
        bias = build_mpt_alibi_tensor(heads, 5)  # [H, 1, 5]: slope * (key - last key)
        expected = alibi_slopes(heads)[:, None] * torch.arange(-4, 1).float()
        torch.testing.assert_close(bias[:, 0, :], expected)


def test_choice_of_path_and_packing_support():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert choose_kind("auto", cpu) == "sdpa" and choose_kind("auto", gpu) == "flex_attention"
    assert choose_kind("eager", cpu) is None and choose_kind("sdpa", gpu) == "sdpa"
    with pytest.raises(ConfigError, match="'varlen' has no ALiBi"):
        choose_kind("varlen", gpu)
    eager, packed = pair()
    check_packing_support(packed)
    with pytest.raises(ConfigError, match="takes no position ids.*'eager' keeps transformers' MPT attention"):
        check_packing_support(eager)


def test_flex_attention_path_gives_the_sdpa_paths_losses():
    """The GPU path (ALiBi as flex attention's score modification, the documents as its block mask), forward
    only: torch runs flex attention's backward on GPUs alone (see the CUDA test below)."""
    eager, sdpa = pair()
    flex = copy.deepcopy(eager)
    install(flex, "flex_attention")
    row = collate_packed([examples()], row_length=32, pad_id=0)
    with torch.no_grad():
        expected = token_losses(sdpa, row["input_ids"], row["targets"], position_ids=row["position_ids"])
        got = token_losses(flex, row["input_ids"], row["targets"], position_ids=row["position_ids"])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        mixed = token_losses(flex, row["input_ids"], row["targets"])  # control: one document per row
        assert (mixed - expected).abs().max() > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention's backward runs on GPUs")
def test_cuda_flex_attention_gradients_match_the_eager_ones_unpacked_and_packed():
    eager, _ = pair()
    eager = eager.cuda()
    flex = copy.deepcopy(eager)
    install(flex, "flex_attention")
    exs = examples((70, 130, 41, 250))
    alone = []
    eager.zero_grad()
    for e in exs:
        ids, tgt = torch.tensor([e.input_ids], device="cuda"), torch.tensor([e.targets], device="cuda")
        losses = token_losses(eager, ids, tgt)
        losses.sum().backward()
        alone.append(losses[tgt.flatten() != IGNORE_INDEX])
    row = {k: v.cuda() if isinstance(v, torch.Tensor) else v
           for k, v in collate_packed([exs], row_length=512, pad_id=0).items()}
    flex.zero_grad()
    losses = token_losses(flex, row["input_ids"], row["targets"], position_ids=row["position_ids"])
    losses.sum().backward()
    torch.testing.assert_close(losses[row["targets"].flatten() != IGNORE_INDEX], torch.cat(alone), rtol=1e-4, atol=1e-4)
    for name, g in grads(eager).items():
        torch.testing.assert_close(grads(flex)[name], g, rtol=1e-3, atol=1e-5, msg=name)
