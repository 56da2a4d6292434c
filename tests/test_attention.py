"""The padding-free attention path: segment index math, layouts, the torch-version adapter, and the
whole transformers integration on the CPU with a plain-torch kernel in place of flash attention."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sft import attention
from sft.errors import ConfigError
from sft.templates import IGNORE_INDEX


def reference_varlen(query, key, value, cu_seqlens, max_seqlen, scale):
    """Causal attention inside each segment, in plain torch: the kernel's interface and semantics
    (q [N, Hq, D], k/v [N, Hkv, D], query head h reads key/value head h // groups)."""
    groups = query.shape[1] // key.shape[1]
    bounds = cu_seqlens.tolist()
    assert max_seqlen >= max(b - a for a, b in zip(bounds, bounds[1:]))  # an upper bound, as the kernel takes
    out = torch.empty_like(query)
    for a, b in zip(bounds, bounds[1:]):
        q = query[a:b].transpose(0, 1)
        k, v = (t[a:b].transpose(0, 1).repeat_interleave(groups, dim=0) for t in (key, value))
        scores = (q @ k.transpose(-1, -2)) * scale
        causal = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        out[a:b] = (scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v).transpose(0, 1)
    return out


def positions_for(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor([[p for n in row for p in range(n)] for row in rows])


def block_diagonal_causal_mask(rows: list[list[int]]) -> torch.Tensor:
    """[B, 1, T, T] bool, built from the example lengths alone (independent of the code under test)."""
    length = sum(rows[0])
    masks = []
    for row in rows:
        ids = torch.cat([torch.full((n,), i) for i, n in enumerate(row)])
        same = ids[:, None] == ids[None, :]
        masks.append(same & torch.ones(length, length, dtype=torch.bool).tril())
    return torch.stack(masks)[:, None]


def test_cu_seqlens_start_a_segment_where_positions_restart():
    positions = positions_for([[3, 2, 5], [4, 2, 4]])
    cu, longest = attention.cu_seqlens_from_position_ids(positions)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 10, 14, 16, 20]
    assert longest == 5


def test_cu_seqlens_split_rows_even_when_positions_continue():
    positions = torch.arange(10).view(2, 5)  # row 1 continues row 0's positions: still its own sequence
    assert attention.cu_seqlens_from_position_ids(positions)[0].tolist() == [0, 5, 10]


def test_cu_seqlens_split_padding_from_tokens():
    positions = torch.arange(6).expand(3, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    cu, longest = attention.cu_seqlens_from_position_ids(positions, mask)
    assert cu.tolist() == [0, 2, 6, 9, 12, 18]
    assert longest == 6


def test_flatten_and_unflatten_keep_each_token_in_place():
    x = torch.randn(2, 3, 5, 4)  # [B, H, T, D]
    flat = attention.flatten_batch(x)
    assert flat.shape == (10, 3, 4)
    assert torch.equal(flat[1 * 5 + 3], x[1, :, 3])
    assert torch.equal(attention.unflatten_batch(flat, 2), x.transpose(1, 2))


def test_per_segment_reference_equals_sdpa_with_block_diagonal_mask():
    torch.manual_seed(0)
    rows = [[7, 3, 9, 5], [12, 1, 11]]
    q, k, v = torch.randn(2, 4, 24, 8), torch.randn(2, 2, 24, 8), torch.randn(2, 2, 24, 8)
    cu, longest = attention.cu_seqlens_from_position_ids(positions_for(rows))
    flat = reference_varlen(*(attention.flatten_batch(t) for t in (q, k, v)), cu, longest, 8 ** -0.5)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=block_diagonal_causal_mask(rows), enable_gqa=True)
    torch.testing.assert_close(attention.unflatten_batch(flat, 2), expected.transpose(1, 2))


def _fake_210(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert is_causal and query.shape[1] == key.shape[1]
    return reference_varlen(query, key, value, cu_seq_q, max_q, query.shape[-1] ** -0.5)


def _fake_211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
              window_size=(-1, -1)):
    assert window_size == (-1, 0) and query.shape[1] == key.shape[1]
    return reference_varlen(query, key, value, cu_seq_q, max_q, scale)


def _fake_213(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
              window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert window_size == (-1, 0) and enable_gqa
    return reference_varlen(query, key, value, cu_seq_q, max_q, scale)


@pytest.mark.parametrize("fake", [_fake_210, _fake_211, _fake_213], ids=["torch2.10", "torch2.11", "torch2.13"])
def test_varlen_call_adapts_to_each_torch_signature(fake):
    torch.manual_seed(0)
    q, k, v = torch.randn(20, 4, 8).bfloat16(), torch.randn(20, 2, 8).bfloat16(), torch.randn(20, 2, 8).bfloat16()
    cu = torch.tensor([0, 6, 20], dtype=torch.int32)
    out = attention.make_varlen_call(fake)(q, k, v, cu, 14, 0.5)  # a scale other than 1/sqrt(head_dim)
    # torch 2.10 takes no scale: the query is rescaled and rounded to bf16 once more
    torch.testing.assert_close(out, reference_varlen(q, k, v, cu, 14, 0.5), atol=2e-2, rtol=0)


def _grouped_211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1)):
    """torch 2.11's signature over a kernel that reads grouped key/value heads itself (flash attention)."""
    return reference_varlen(query, key, value, cu_seq_q, max_q, scale)


def _wrong_groups_211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1)):
    """Takes grouped heads without complaint but pairs query head h with key/value head h % groups."""
    groups = query.shape[1] // key.shape[1]
    order = torch.arange(query.shape[1]) % key.shape[1]
    key, value = (t[:, order].repeat_interleave(1, dim=1) for t in (key, value))
    assert groups >= 1
    return reference_varlen(query, key, value, cu_seq_q, max_q, scale)


@pytest.mark.parametrize("fake,expected", [(_grouped_211, True), (_fake_211, False), (_wrong_groups_211, False),
                                           (_fake_213, False)], ids=["reads-groups", "refuses", "wrong", "has-flag"])
def test_grouped_heads_go_to_the_kernel_only_where_it_computes_them_right(fake, expected):
    assert attention.kernel_reads_grouped_heads(fake, torch.device("cpu")) is expected
    if expected:
        torch.manual_seed(0)
        q, k, v = torch.randn(20, 4, 8).bfloat16(), torch.randn(20, 2, 8).bfloat16(), torch.randn(20, 2, 8).bfloat16()
        cu = torch.tensor([0, 6, 20], dtype=torch.int32)
        out = attention.make_varlen_call(fake, kernel_gqa=True)(q, k, v, cu, 14, 0.5)
        torch.testing.assert_close(out, reference_varlen(q, k, v, cu, 14, 0.5))


def test_varlen_call_refuses_fp32():
    q = torch.randn(4, 2, 8)
    with pytest.raises(ConfigError, match="bf16 or fp16"):
        attention.make_varlen_call(_fake_213)(q, q, q, torch.tensor([0, 4], dtype=torch.int32), 4, 0.1)


def test_cpu_is_refused_with_a_clear_message():
    assert not attention.varlen_available("cpu")
    with pytest.raises(ConfigError, match="CUDA GPU"):
        attention.register_varlen_attention(torch.device("cpu"))


def test_attention_it_cannot_compute_exactly_is_refused():
    q, module, positions = torch.randn(1, 2, 4, 8), torch.nn.Module(), torch.arange(4)[None]
    with pytest.raises(ConfigError, match="sliding_window"):
        attention.varlen_attention_forward(module, q, q, q, None, sliding_window=2, position_ids=positions)
    with pytest.raises(ConfigError, match="attention dropout"):
        attention.varlen_attention_forward(module, q, q, q, None, dropout=0.1, position_ids=positions)
    with pytest.raises(ConfigError, match="position ids"):
        attention.varlen_attention_forward(module, q, q, q, None)


@pytest.fixture
def model_pair(monkeypatch):
    """The same tiny grouped-query Llama twice: with sdpa, and with the varlen implementation running
    the plain-torch kernel; plus a counter of segment computations."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    calls = []
    real = attention.cu_seqlens_from_position_ids
    monkeypatch.setattr(attention, "cu_seqlens_from_position_ids", lambda *a: calls.append(1) or real(*a))
    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    sdpa = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    varlen = AutoModelForCausalLM.from_config(config, attn_implementation=attention.register())
    varlen.load_state_dict(sdpa.state_dict())
    with attention.varlen_kernel(reference_varlen):
        yield sdpa, varlen, calls


def test_packed_forward_and_backward_match_sdpa_and_unpacked_examples(model_pair):
    sdpa, varlen, calls = model_pair
    rows = [[5, 4, 3], [7, 5]]
    positions = positions_for(rows)
    ids = torch.randint(2, 101, positions.shape, generator=torch.Generator().manual_seed(1))
    out = varlen(input_ids=ids, position_ids=positions).logits
    assert len(calls) == 1  # once per forward pass, not once per layer
    torch.testing.assert_close(out, sdpa(input_ids=ids, position_ids=positions).logits)
    alone = sdpa(input_ids=ids[1:, 7:], position_ids=positions[1:, 7:]).logits
    torch.testing.assert_close(out[1:, 7:], alone)

    for model in (sdpa, varlen):
        model(input_ids=ids, position_ids=positions).logits.square().mean().backward()
    grad = [m.model.layers[0].self_attn.k_proj.weight.grad for m in (sdpa, varlen)]
    torch.testing.assert_close(grad[1], grad[0])


def test_padded_batches_and_generation_match_sdpa(model_pair):
    sdpa, varlen, _ = model_pair
    ids = torch.randint(2, 101, (2, 9), generator=torch.Generator().manual_seed(2))
    right = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    keep = right.bool()
    torch.testing.assert_close(varlen(input_ids=ids, attention_mask=right).logits[keep],
                               sdpa(input_ids=ids, attention_mask=right).logits[keep])
    left = right.flip(1)
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(varlen.generate(input_ids=ids, attention_mask=left, **greedy),
                       sdpa.generate(input_ids=ids, attention_mask=left, **greedy))


@pytest.mark.skipif(not attention.varlen_available("cuda"), reason="varlen attention needs a CUDA GPU (sm80+)")
@pytest.mark.parametrize("precision", ["bf16_pure", "bf16_autocast"])
def test_flash_varlen_on_gpu_matches_sdpa(precision):
    from transformers import AutoModelForCausalLM, LlamaConfig

    name = attention.register_varlen_attention("cuda")
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    dtype = torch.bfloat16 if precision == "bf16_pure" else torch.float32
    torch.manual_seed(0)
    with torch.device("cuda"):
        sdpa = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
        varlen = AutoModelForCausalLM.from_config(config, attn_implementation=name, dtype=dtype)
    varlen.load_state_dict(sdpa.state_dict())
    rows = [[300, 100, 112], [512], [1, 200, 311]]
    positions = positions_for(rows).cuda()
    ids = torch.randint(0, 512, positions.shape, device="cuda")
    grads = []
    for model in (sdpa, varlen):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16_autocast"):
            logits = model(input_ids=ids, position_ids=positions).logits.float()
        logits.square().mean().backward()
        grads.append((logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.float()))
    (expected, expected_grad), (out, grad) = grads
    torch.testing.assert_close(out, expected, atol=3e-2, rtol=3e-2)
    assert (grad - expected_grad).norm() / expected_grad.norm() < 0.05


def gpu_varlen_loss_model():
    """A small bf16 Llama on the GPU with the flash varlen attention, wrapped in the training loss."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sft.loss import LossModel

    name = attention.register_varlen_attention("cuda")
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return LossModel(AutoModelForCausalLM.from_config(config, attn_implementation=name, dtype=torch.bfloat16))


@pytest.mark.skipif(not attention.varlen_available("cuda"), reason="varlen attention needs a CUDA GPU (sm80+)")
def test_compiled_layers_with_flash_varlen_on_gpu_match_eager_and_compile_once():
    import copy

    from torch._dynamo.utils import counters

    from sft.modeling import compile_layers

    torch._dynamo.reset()
    counters.clear()
    eager = gpu_varlen_loss_model()
    compiled = copy.deepcopy(eager)
    compile_layers(compiled.model)
    for seed, rows in enumerate(([[300, 100, 112], [512]], [[1, 200, 311], [256, 256]])):
        positions = positions_for(rows).cuda()
        gen = torch.Generator("cuda").manual_seed(seed)
        ids = torch.randint(0, 512, positions.shape, device="cuda", generator=gen)
        targets = torch.randint(0, 512, positions.shape, device="cuda", generator=gen)
        results = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, targets=targets, position_ids=positions)
            loss.backward()
            results.append((loss.detach().float(), model.model.model.layers[0].mlp.up_proj.weight.grad.float()))
        (expected, expected_grad), (loss, grad) = results
        torch.testing.assert_close(loss, expected, rtol=2e-2, atol=0)
        assert (grad - expected_grad).norm() / expected_grad.norm() < 0.05
    # one graph for the layers and one for the loss's softmax gradient: no recompile, no graph break
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.skipif(not attention.varlen_available("cuda"), reason="varlen attention needs a CUDA GPU (sm80+)")
def test_training_forward_on_gpu_never_waits_for_the_device():
    """With the index tensors made on the host (host_indices), the forward pass of a compiled varlen model,
    the fused loss included, holds no host sync: the host keeps queueing work while the GPU computes."""
    from sft.loss import host_indices
    from sft.modeling import compile_layers

    model = gpu_varlen_loss_model()
    compile_layers(model.model)
    for seed, rows in enumerate(([[300, 100, 112], [512]], [[1, 200, 311], [256, 256]])):
        positions = positions_for(rows)
        gen = torch.Generator().manual_seed(seed)
        targets = torch.randint(0, 512, positions.shape, generator=gen)
        targets[torch.rand(positions.shape, generator=gen) < 0.4] = IGNORE_INDEX
        batch = dict(input_ids=torch.randint(0, 512, positions.shape, generator=gen), position_ids=positions,
                     targets=targets)
        batch = {k: v.cuda() for k, v in dict(batch, **host_indices(batch)).items()}
        expected = model(**{k: v for k, v in batch.items() if k not in ("cu_seqlens", "supervised_positions")})
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = model(**batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(loss, expected)  # the same segments and positions as found on the device
        loss.backward()
