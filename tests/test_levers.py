"""The speed switches beyond the default fast path: float8 matmuls (torchao), the compile mode (CUDA graphs)
and activation offloading. Each has a CPU fallback and must leave the losses and gradients as they were,
to the precision it trades."""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import sft.modeling
from sft.config import TrainConfig
from sft.errors import ConfigError
from sft.loss import LossModel
from sft.modeling import compile_layers, float8_linears
from sft.loop import train_step
from sft.setup import build
from tests.test_fast_path import loss_and_grads, packed_batch, tiny_llama


def test_float8_takes_the_decoder_linears_only():
    model = tiny_llama()
    names = float8_linears(model)
    assert len(names) == 3 * 7  # q, k, v, o, gate, up, down in each of the 3 layers
    assert all(n.startswith("model.layers.") for n in names)
    assert "lm_head" not in names and not any("embed" in n for n in names)


def test_float8_falls_back_to_plain_matmuls_on_the_cpu(tiny_config, capsys):
    setup = build(tiny_config(float8=True, precision="auto"))  # fp32 on the CPU
    assert setup.derived["float8"] is False
    assert "note: float8: cpu has no float8 tensor cores; the matmuls stay in fp32" in capsys.readouterr().err
    assert not any("Float8" in type(m).__name__ for m in setup.model.modules())


def test_float8_without_torchao_stops_before_the_model_loads(tiny_config, monkeypatch):
    monkeypatch.setattr(sft.modeling, "float8_unavailable", lambda device: None)  # as if on a float8 GPU
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else object())
    loaded = []
    monkeypatch.setattr(sft.modeling, "load_model", lambda *a, **k: loaded.append(1))
    with pytest.raises(ConfigError, match="float8 training needs torchao"):
        build(tiny_config(float8=True, precision="bf16_pure"))
    assert not loaded


def test_float8_and_compile_mode_settings_are_checked():
    with pytest.raises(ConfigError, match="float8"):
        TrainConfig(experiment="x", float8=True, precision="fp32")
    with pytest.raises(ConfigError, match="compile_mode"):
        TrainConfig(experiment="x", compile_mode="reduce-overhead")
    with pytest.raises(ConfigError, match="compile_mode"):
        TrainConfig(experiment="x", compile=True, compile_mode="fast")


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_float8_layers_keep_the_bf16_loss_and_gradients_to_float8_precision(device):
    pytest.importorskip("torchao")  # an optional dependency: installed where float8 is used
    batch = {k: v.to(device) for k, v in packed_batch([[10, 20, 34], [64]], 0).items()}
    bf16 = LossModel(tiny_llama("sdpa")).to(device, torch.bfloat16)
    expected, expected_grads = loss_and_grads(bf16, batch)
    model = copy.deepcopy(bf16)
    params = list(model.parameters())
    assert sft.modeling.convert_to_float8(model.model) == 21
    assert list(model.parameters()) == params  # the same Parameter objects: the optimizer sees no change
    assert type(model.model.model.layers[0].mlp.up_proj).__name__ == "Float8Linear"
    loss, grads = loss_and_grads(model, batch)
    assert abs(loss.float() - expected.float()) / expected.float() < 0.01
    for g, e in zip(grads, expected_grads):  # float8 has 3 mantissa bits: a few percent per element
        assert (g.float() - e.float()).norm() / e.float().norm() < 0.15


def test_compile_mode_reaches_every_layer(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append(kw.get("mode")))
    model = tiny_llama()
    assert compile_layers(model, "reduce-overhead") == 3
    assert compile_layers(model) == 3
    assert modes == ["reduce-overhead"] * 3 + [None] * 3


def test_reduce_overhead_compiled_layers_give_the_eager_loss_and_gradients_on_the_cpu():
    batch = packed_batch([[10, 20, 34], [64]], 0)
    eager = LossModel(tiny_llama())
    expected, expected_grads = loss_and_grads(eager, batch)
    compiled = copy.deepcopy(eager)
    compile_layers(compiled.model, "reduce-overhead")
    loss, grads = loss_and_grads(compiled, batch)
    torch.testing.assert_close(loss, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_activation_offload_saves_through_host_memory_and_trains_identically(tiny_config, monkeypatch):
    packed = []
    original = torch.autograd.graph.save_on_cpu

    class Counting(original):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook
            self.pack_hook = lambda tensor: packed.append(1) or pack(tensor)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Counting)
    results = []
    for offload in (False, True):
        setup = build(tiny_config(activation_offload=offload))
        losses = [train_step(setup, batches).loss for batches in setup.batches(0, 2)]
        results.append((losses, [p.detach().clone() for p in setup.model.parameters()]))
        assert bool(packed) == offload  # every saved activation went through the host copy, and only then
    (expected, expected_params), (losses, params) = results
    assert losses == expected  # the same tensors, stored elsewhere: bitwise the same training
    assert all(torch.equal(p, e) for p, e in zip(params, expected_params))
