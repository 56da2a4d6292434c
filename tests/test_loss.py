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


def test_fused_loss_keeps_no_logits_for_the_backward_pass():
    """Only the gradients are stored (hidden-sized and weight-sized), whatever the chunk size; plain
    autograd would store [tokens x vocab] logits."""
    hidden, targets, head = inputs()
    plain = saved_shapes(lambda: F.cross_entropy(head(hidden).float(), targets, reduction="sum"))
    assert (TOKENS, VOCAB) in plain  # the premise
    for chunk_tokens in (7, TOKENS):
        stored = saved_shapes(lambda: selected_cross_entropy(hidden, targets, head, chunk_tokens=chunk_tokens))
        assert sorted(stored) == sorted([(VOCAB, HIDDEN), (TOKENS, HIDDEN)])


def test_fused_loss_under_autocast_and_without_gradients_matches_plain_autograd():
    hidden, targets, head = inputs(seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
        fused = selected_cross_entropy(hidden, targets, head, chunk_tokens=16)
    expected_grads = torch.autograd.grad(expected, [hidden, head.weight])
    grads = torch.autograd.grad(fused, [hidden, head.weight])
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == expected_grad.dtype == torch.float32
        torch.testing.assert_close(grad, expected_grad, rtol=2e-2, atol=2e-2 * expected_grad.abs().max().item())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # evaluation: no gradients computed
        torch.testing.assert_close(selected_cross_entropy(hidden, targets, head, chunk_tokens=16), expected.detach())


def test_fused_loss_with_an_output_bias_and_bf16_weights():
    hidden, targets, head = inputs(seed=2)
    biased = torch.nn.Linear(HIDDEN, VOCAB, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.normal_()
    for module in (biased, biased.to(torch.bfloat16)):
        h = hidden.detach().to(module.weight.dtype).requires_grad_()
        expected = F.cross_entropy(module(h).float(), targets, reduction="sum")
        expected_grads = torch.autograd.grad(expected, [h, module.weight, module.bias])
        fused = selected_cross_entropy(h, targets, module, chunk_tokens=9)
        grads = torch.autograd.grad(fused, [h, module.weight, module.bias])
        tol = 1e-5 if module.weight.dtype == torch.float32 else 2e-2
        torch.testing.assert_close(fused, expected, rtol=tol, atol=0)
        for grad, expected_grad in zip(grads, expected_grads):
            assert grad.dtype == expected_grad.dtype
            torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=tol,
                                       atol=tol * expected_grad.float().abs().max().item())


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


def stub_model(config, head: torch.nn.Module | None = None):
    head = head if head is not None else torch.nn.Linear(4, 8, bias=False)
    return SimpleNamespace(config=config, get_output_embeddings=lambda: head)


def test_auto_picks_full_for_a_softcapped_model_and_selected_otherwise():
    softcapped = stub_model(Gemma2Config())
    assert softcapped.config.final_logit_softcapping
    assert resolve_loss_impl(softcapped, "auto") == "full"
    assert resolve_loss_impl(softcapped, "full") == "full"
    assert resolve_loss_impl(stub_model(LlamaConfig()), "auto") == "selected"


def test_forcing_selected_on_a_softcapped_model_is_a_config_error():
    with pytest.raises(ConfigError, match="final_logit_softcapping"):
        resolve_loss_impl(stub_model(Gemma2Config()), "selected")


class WrappedHead(torch.nn.Module):  # what an adapter library puts in place of lm_head
    def __init__(self):
        super().__init__()
        self.base = torch.nn.Linear(4, 8)

    def forward(self, x):
        return self.base(x) * 2


def test_the_fused_loss_is_used_only_where_it_sees_the_weights_the_head_uses():
    """The fused loss reads lm_head.weight itself: a wrapped or hooked head, or a weight that DeepSpeed
    ZeRO-3 gathers only inside the head's own forward, would be bypassed, so 'auto' picks 'full'."""
    hooked = torch.nn.Linear(4, 8)
    hooked.register_forward_pre_hook(lambda module, args: None)
    for model, partitioned, reason in ((stub_model(LlamaConfig(), WrappedHead()), False, "WrappedHead"),
                                       (stub_model(LlamaConfig(), hooked), False, "forward hooks"),
                                       (stub_model(LlamaConfig()), True, "ZeRO-3")):
        assert resolve_loss_impl(model, "auto", partitioned_weights=partitioned) == "full"
        with pytest.raises(ConfigError, match=reason):
            resolve_loss_impl(model, "selected", partitioned_weights=partitioned)


def test_a_frozen_head_gets_no_gradient_and_costs_no_weight_gradient():
    hidden, targets, head = inputs(seed=3)
    head.weight.requires_grad_(False)
    stored = saved_shapes(lambda: selected_cross_entropy(hidden, targets, head, chunk_tokens=16))
    assert stored == [(TOKENS, HIDDEN)]  # only the hidden-state gradient
    loss = selected_cross_entropy(hidden, targets, head, chunk_tokens=16)
    (grad,) = torch.autograd.grad(loss, [hidden])
    expected = torch.autograd.grad(F.cross_entropy(head(hidden), targets, reduction="sum"), [hidden])[0]
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_compiled_softmax_gradient_matches_autograd_with_one_graph_for_every_chunk_length(device):
    """The per-chunk loss and logit gradient that GPUs run compiled: equal to cross_entropy and its
    autograd gradient, in bf16 as in training, and compiled once for chunks of any length."""
    from torch._dynamo.utils import counters

    from sft.kernels import kernel
    from sft.loss import _loss_and_logit_grad

    torch._dynamo.reset()
    counters.clear()
    compiled = kernel(_loss_and_logit_grad, compiled=True)
    gen = torch.Generator().manual_seed(4)
    for tokens in (37, 64, 5):
        logits = (3 * torch.randn(tokens, 1000, generator=gen)).to(torch.bfloat16).to(device)
        targets = torch.randint(0, 1000, (tokens,), generator=gen).to(device)
        reference = logits.float().requires_grad_()
        expected = F.cross_entropy(reference, targets, reduction="sum")
        expected.backward()
        for fn in (compiled, _loss_and_logit_grad):
            loss, grad = fn(logits, targets)
            assert grad.dtype == torch.bfloat16
            torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(grad.float(), reference.grad, rtol=1e-2, atol=1e-3)  # bf16 rounding
    assert counters["stats"]["unique_graphs"] == 1
