"""The loss: chunked selected-position cross-entropy equals the full one, and where it cannot be used."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma2Config, LlamaConfig

from sft.errors import ConfigError
from sft.loss import LossModel, resolve_loss_impl, selected_cross_entropy
from sft.modeling import load_model
from sft.templates import IGNORE_INDEX

VOCAB, HIDDEN, TOKENS = 100, 16, 50


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=gen)
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=gen)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=gen))
    return hidden.requires_grad_(), targets, head


@pytest.mark.parametrize("chunk_tokens", [7, 25, 1])
def test_chunked_selected_cross_entropy_equals_full_in_value_and_gradient(chunk_tokens):
    hidden, targets, head = inputs()
    full = F.cross_entropy(head(hidden), targets, reduction="sum")
    full_grads = torch.autograd.grad(full, [hidden, head.weight])
    chunked = selected_cross_entropy(hidden, targets, head, chunk_tokens)
    chunked_grads = torch.autograd.grad(chunked, [hidden, head.weight])
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=0)
    torch.testing.assert_close(chunked_grads[0], full_grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_grads[1], full_grads[1], rtol=1e-5, atol=1e-6)


def saved_shapes(fn) -> list[tuple[int, ...]]:
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_chunked_loss_keeps_no_logits_for_the_backward_pass():
    hidden, targets, head = inputs()
    chunked = saved_shapes(lambda: selected_cross_entropy(hidden, targets, head, chunk_tokens=7))
    unchunked = saved_shapes(lambda: selected_cross_entropy(hidden, targets, head, chunk_tokens=TOKENS))
    assert any(VOCAB in s for s in unchunked)  # the premise: a single chunk stores its logits
    assert not any(VOCAB in s for s in chunked)


def test_loss_model_selected_equals_full_on_a_causal_lm(tiny_model_dir):
    model = load_model(str(tiny_model_dir), attn_implementation="sdpa")
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 1000, (2, 12), generator=gen)
    targets = torch.randint(3, 1000, (2, 12), generator=gen)
    targets[:, :5] = IGNORE_INDEX
    targets[1, 9:] = IGNORE_INDEX
    losses, grads = [], []
    for impl in ("full", "selected"):
        model.zero_grad()
        loss = LossModel(model, impl, chunk_tokens=4)(input_ids, targets)
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.get_output_embeddings().weight.grad.clone())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4 * grads[0].abs().max().item())
    assert losses[0] > 0


def test_auto_picks_full_for_a_softcapped_model_and_selected_otherwise():
    softcapped = SimpleNamespace(config=Gemma2Config())
    assert softcapped.config.final_logit_softcapping
    assert resolve_loss_impl(softcapped, "auto") == "full"
    assert resolve_loss_impl(softcapped, "full") == "full"
    assert resolve_loss_impl(SimpleNamespace(config=LlamaConfig()), "auto") == "selected"


def test_forcing_selected_on_a_softcapped_model_is_a_config_error():
    with pytest.raises(ConfigError, match="final_logit_softcapping"):
        resolve_loss_impl(SimpleNamespace(config=Gemma2Config()), "selected")
