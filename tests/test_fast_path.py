"""The fast path's switches on the CPU: regional compilation gives the eager losses and gradients and
compiles once for every batch of one shape; the training loss hands packed segments to the attention
function once per forward pass; selective activation checkpointing picks every n-th layer on every
transformers version."""
from __future__ import annotations

import contextlib

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig

from sft import attention
from sft.errors import ConfigError
from sft.loss import LossModel
from sft.modeling import compile_layers, decoder_layers, enable_activation_checkpointing
from sft.templates import IGNORE_INDEX
from tests.test_attention import positions_for, reference_varlen

CONFIG = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1)


def packed_batch(rows: list[list[int]], seed: int) -> dict:
    """Packed rows as the trainer feeds them: positions restart per example, prompts carry no target."""
    positions = positions_for(rows)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 101, positions.shape, generator=gen)
    targets = torch.randint(2, 101, positions.shape, generator=gen)
    targets[torch.rand(positions.shape, generator=gen) < 0.4] = IGNORE_INDEX
    return dict(input_ids=ids, targets=targets, position_ids=positions)


def tiny_llama(attn: str = "sdpa"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), attn_implementation=attn)


def loss_and_grads(loss_model: LossModel, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss_model.zero_grad(set_to_none=True)
    loss = loss_model(**batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in loss_model.parameters()]



@pytest.fixture
def use_kernel():
    """Runs varlen attention with the given kernel for the rest of the test (attention.varlen_kernel)."""
    with contextlib.ExitStack() as stack:
        yield lambda call: stack.enter_context(attention.varlen_kernel(call))

def test_compiled_layers_give_the_eager_loss_and_gradients_and_compile_once():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    eager = LossModel(tiny_llama(), "selected")
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled.model) == CONFIG["num_hidden_layers"]
    for rows, seed in (([[5, 4, 3], [7, 5]], 1), ([[12], [2, 2, 8]], 2), ([[1, 11], [6, 6]], 3)):
        batch = packed_batch(rows, seed)
        (loss, grads), (expected, expected_grads) = loss_and_grads(compiled, batch), loss_and_grads(eager, batch)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)
    # one graph for all three layers and all three segmentations: packing keeps the shape, and the
    # per-batch data (segments, supervised positions) never enters the compiled region
    assert counters["stats"]["unique_graphs"] == 1


def test_compile_refuses_a_model_without_repeated_layers():
    model = torch.nn.Linear(2, 2)
    model.config = LlamaConfig(**CONFIG)
    with pytest.raises(ConfigError, match="compile: found no repeated decoder layers"):
        compile_layers(model)


def test_varlen_loss_finds_segments_once_per_forward_and_equals_sdpa(use_kernel, monkeypatch):
    use_kernel(reference_varlen)
    calls = []
    real = attention.cu_seqlens_from_position_ids
    monkeypatch.setattr(attention, "cu_seqlens_from_position_ids", lambda *a: calls.append(1) or real(*a))
    sdpa = LossModel(tiny_llama(), "selected")
    varlen = LossModel(tiny_llama(attention.register()), "selected")
    batch = packed_batch([[5, 4, 3], [7, 5]], seed=4)
    (loss, grads), (expected, expected_grads) = loss_and_grads(varlen, batch), loss_and_grads(sdpa, batch)
    assert len(calls) == 1  # in LossModel, before the layers; the layers read it from their keyword arguments
    torch.testing.assert_close(loss, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_indices_made_on_the_host_replace_the_device_lookups(use_kernel, monkeypatch):
    """The trainer hands LossModel the segments and supervised positions it computed from the CPU batch
    (host_indices): the loss and gradients are those of the device lookups, which are then never called."""
    from sft import loss as loss_module
    from sft.loss import host_indices
    from sft.packing import Example, collate_padded

    use_kernel(reference_varlen)
    model = LossModel(tiny_llama(attention.register()), "selected")
    padded = collate_padded([Example([5, 6, 7, 8], [6, 7, 8, IGNORE_INDEX]),
                             Example([9, 10], [IGNORE_INDEX, 11])], pad_id=0)
    del padded["num_real_tokens"]
    for batch in (packed_batch([[5, 4, 3], [7, 5]], seed=7), padded):
        expected, expected_grads = loss_and_grads(model, batch)
        indices = host_indices(batch)
        with monkeypatch.context() as patch:
            patch.setattr(attention, "host_segments", lambda *a: pytest.fail("segments looked up on the device"))
            patch.setattr(loss_module, "find_supervised_positions",
                          lambda *a: pytest.fail("positions found on the device"))
            loss, grads = loss_and_grads(model, dict(batch, **indices))
        assert loss == expected
        for grad, expected_grad in zip(grads, expected_grads):
            assert torch.equal(grad, expected_grad)
    assert indices["cu_seqlens"].tolist() == [0, 4, 6, 8]  # each row's tokens, then its padding
    assert indices["supervised_positions"].tolist() == [0, 1, 2, 5]


def test_segment_kwargs_bound_the_longest_segment_by_the_row_length():
    batch = packed_batch([[5, 4, 3], [7, 5]], seed=5)
    kwargs = attention.segment_kwargs(batch["position_ids"])
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 5, 9, 12, 19, 24]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 12  # the row length: one shape, one graph


@pytest.mark.parametrize("every", [1, 2, 3])
def test_selective_checkpointing_marks_every_nth_layer(every):
    model = tiny_llama()
    enable_activation_checkpointing(model, every)
    flags = [layer.gradient_checkpointing for layer in decoder_layers(model)]
    assert flags == [k % every == 0 for k in range(CONFIG["num_hidden_layers"])]
    model.train()
    batch = packed_batch([[5, 4, 3], [7, 5]], seed=6)
    loss, grads = loss_and_grads(LossModel(model, "selected"), batch)
    reference = tiny_llama()
    expected, expected_grads = loss_and_grads(LossModel(reference, "selected"), batch)
    torch.testing.assert_close(loss, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


@torch.library.custom_op("sft_test::varlen_reference", mutates_args=())
def _varlen_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
               scale: float) -> torch.Tensor:
    return reference_varlen(query, key, value, cu_seqlens, max_seqlen, scale)


@_varlen_op.register_fake
def _(query, key, value, cu_seqlens, max_seqlen, scale):
    return torch.empty_like(query)


def _kernel_211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)):
    """torch 2.11's varlen_attn signature over a registered custom op, as torch's own is."""
    return _varlen_op(query, key, value, cu_seq_q, max_q, scale)


def test_compiled_varlen_layers_compile_once_whatever_the_number_of_segments(use_kernel):
    """cu_seqlens has one entry per packed example plus one, so its length changes from batch to batch;
    it is marked dynamic, so the compiled layers do not recompile for it."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    use_kernel(attention.make_varlen_call(_kernel_211, kernel_gqa=True))
    eager = LossModel(tiny_llama(attention.register()).to(torch.bfloat16), "selected")
    compiled = copy.deepcopy(eager)
    compile_layers(compiled.model)
    with torch.no_grad():
        for rows, seed in (([[5, 4, 3], [7, 5]], 1), ([[12], [2, 2, 8]], 2), ([[1, 1, 10], [6, 3, 3]], 3)):
            batch = packed_batch(rows, seed)
            torch.testing.assert_close(compiled(**batch), eager(**batch), rtol=2e-2, atol=0)
    assert counters["stats"]["unique_graphs"] == 1


class ReadsBackFromTheDevice(TorchDispatchMode):
    """Fails on every operator that, on a GPU, copies data back to the host and so waits for the device:
    scalar reads (.item(), `if tensor:`) and outputs whose size depends on the data (nonzero, masked
    select, boolean indexing). On the CPU it is the only way to see the syncs a GPU forward pass would hit."""

    READS = {torch.ops.aten._local_scalar_dense, torch.ops.aten.is_nonzero, torch.ops.aten.nonzero,
             torch.ops.aten.masked_select, torch.ops.aten.equal, torch.ops.aten._unique2}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.READS:
            raise AssertionError(f"{func} reads data back from the device")
        return func(*args, **(kwargs or {}))


def test_the_training_forward_pass_reads_nothing_back_from_the_device(use_kernel):
    """With the indices made on the host, the forward pass that training runs (varlen attention, the fused
    loss and its gradients) has no operator that would make the host wait for a GPU."""
    from sft.loss import host_indices

    use_kernel(attention.make_varlen_call(_kernel_211, kernel_gqa=True))
    model = LossModel(tiny_llama(attention.register()).to(torch.bfloat16), "selected")
    batch = packed_batch([[5, 4, 3], [7, 5]], seed=8)
    batch = dict(batch, **host_indices(batch))
    expected = model(**{k: v for k, v in batch.items() if k not in ("cu_seqlens", "supervised_positions")})
    with ReadsBackFromTheDevice():
        loss = model(**batch)
    assert loss == expected
    with pytest.raises(AssertionError, match="reads data back"), ReadsBackFromTheDevice():
        model(**{k: v for k, v in batch.items() if k != "supervised_positions"})  # the check itself works
