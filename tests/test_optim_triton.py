"""The Triton step of BF16AdamW (sft.optim_triton) computes what the torch step computes, bit for bit: the
same weights, moments, 8-bit codes and block scales, for every kind of moment storage.

On the CPU the kernel runs under Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before
the kernel is defined: this file runs itself in a child process for that (`python test_optim_triton.py
OUT`), and the tests compare what the child wrote with the torch step run here. The reference is the torch
step's code run op by op (`sft.optim.kernel` made the identity), so fp32 rounding is exactly that of its
operations. The CUDA cases run the kernel compiled, against the same reference on the GPU.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

import sft.optim  # noqa: E402
from sft import optim_triton  # noqa: E402
from sft.optim import (INT8_BLOCK, BF16AdamW, _int8_maps, _int8_midpoints, _quantize_,  # noqa: E402
                       describe_optimizer)

# (shape, moments): the int8 cases at or above INT8_MIN_NUMEL with a multiple of INT8_BLOCK values take 8-bit
# states; an odd size and one below the threshold keep fp32 states, as the torch step does
CASES = {"int8_19_blocks": ((19, INT8_BLOCK), torch.int8), "int8_odd_size": ((4099,), torch.int8),
         "int8_below_threshold": ((30, 10), torch.int8), "bf16_odd_size": ((3001,), torch.bfloat16),
         "bf16_19_blocks": ((19 * INT8_BLOCK,), torch.bfloat16), "fp32_odd_size": ((2999,), torch.float32)}
STEPS = 3


def trajectory(shape: tuple[int, ...], state_dtype: torch.dtype, kernel: str, device: str = "cpu") -> list:
    """The weights and the optimizer state after each of STEPS steps with gradients whose magnitudes span four
    decades (so the codes cover much of the map), the first block of values with zero gradients."""
    gen = torch.Generator().manual_seed(sum(shape))
    n = torch.Size(shape).numel()
    w = torch.nn.Parameter(torch.randn(shape, generator=gen).to(torch.bfloat16).to(device))
    opt = BF16AdamW([w], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, state_dtype=state_dtype, seed=3,
                    kernel=kernel, fused=True)
    assert opt.kernel == kernel
    out = []
    for _ in range(STEPS):
        grad = torch.randn(n, generator=gen) * 10 ** (-4 * torch.rand(n, generator=gen))
        grad[:INT8_BLOCK] = 0.0
        w.grad = grad.to(torch.bfloat16).view(shape).to(device)
        opt.step()
        out.append({"weight": w.detach().cpu().clone(),
                    **{k: v.cpu().clone() for k, v in opt.state[w].items() if k != "step"}})
    return out


def quantizer_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Values on every midpoint of each map and one fp32 step either side of it, zeros, and values at and
    around the decade edges, in blocks whose largest magnitude is 1 (so the block scale divides nothing).
    The first moment's values are signed, the second's are not; the last block of each is all zeros."""
    edges = torch.tensor([10.0**-k for k in range(8)])
    special = torch.cat([edges, torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1),
                         torch.tensor([0.0, 1e-30, 3e-8, 1.5e-7, 2.75e-7])])
    blocks = []
    for mids, signed in zip(_int8_midpoints(torch.device("cpu")), (True, False)):
        values = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), special]
                           + ([-special] if signed else []))
        rows = -(-len(values) // (INT8_BLOCK - 1))
        padded = torch.cat([values, torch.zeros(rows * (INT8_BLOCK - 1) - len(values))]).view(rows, -1)
        block = torch.cat([torch.ones(rows, 1), padded], dim=1)
        blocks.append(torch.cat([block, torch.zeros(1, INT8_BLOCK)]).view(-1))
    return blocks[0], blocks[1]


@triton.jit
def quantize_kernel(x_ptr, codes_ptr, scale_ptr, midpoints_ptr, SIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """The step's quantizer alone, one block per program."""
    rows = tl.program_id(0) + tl.arange(0, 1)
    offsets = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    codes, scale = optim_triton._quantize(tl.load(x_ptr + offsets), midpoints_ptr, SIGNED)
    tl.store(codes_ptr + offsets, codes)
    tl.store(scale_ptr + rows, scale)


def run_kernels(out: Path) -> None:
    """In the child process, under the interpreter: the kernel's trajectories, and the quantizer's codes
    for quantizer_inputs()."""
    assert optim_triton.INTERPRETED
    quantized = []
    for x, signed, mids in zip(quantizer_inputs(), (True, False), _int8_midpoints(torch.device("cpu"))):
        codes, scale = torch.empty(x.shape, dtype=torch.uint8), torch.empty(len(x) // INT8_BLOCK)
        quantize_kernel[(len(scale),)](x, codes, scale, mids, SIGNED=signed, BLOCK=INT8_BLOCK)
        quantized.append((codes, scale))
    trajectories = {name: trajectory(shape, moments, "triton") for name, (shape, moments) in CASES.items()}
    w = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    description = describe_optimizer(BF16AdamW([w], state_dtype=torch.int8, kernel="triton"))
    torch.save({"quantized": quantized, "trajectories": trajectories, "description": description}, out)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("triton") / "kernel.pt"
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, __file__, str(out)], env=env, check=True, timeout=600)
    return torch.load(out)


@pytest.fixture
def torch_step_op_by_op(monkeypatch):
    monkeypatch.setattr(sft.optim, "kernel", lambda fn, compiled: fn)


def assert_same_trajectory(got: list, expected: list) -> None:
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), \
                f"step {step + 1}, {key}: {(a[key] != b[key]).sum().item()} of {a[key].numel()} values differ"


@pytest.mark.parametrize("name", CASES)
def test_triton_step_equals_the_torch_step_bitwise(name, interpreted, torch_step_op_by_op):
    shape, moments = CASES[name]
    expected = trajectory(shape, moments, "torch")
    assert ("exp_avg_codes" in expected[0]) == (name == "int8_19_blocks")  # the others keep fp32 or bf16 moments
    assert_same_trajectory(interpreted["trajectories"][name], expected)


def test_computed_codes_equal_the_searched_ones_on_midpoints_and_decade_edges(interpreted):
    """Exact ties included: a value on a midpoint takes the lower entry in both."""
    for x, qmap, (codes, scale) in zip(quantizer_inputs(), _int8_maps(torch.device("cpu")), interpreted["quantized"]):
        expected_codes, expected_scale = torch.empty_like(codes), torch.empty_like(scale)
        _quantize_(x, expected_codes, expected_scale, qmap)
        assert torch.equal(scale, expected_scale)
        mismatch = codes != expected_codes
        assert not mismatch.any(), f"values {x[mismatch][:8].tolist()}: {codes[mismatch][:8].tolist()} " \
                                   f"instead of {expected_codes[mismatch][:8].tolist()}"
        assert len(expected_codes.unique()) > 200  # nearly every entry of the map is hit


def test_the_run_records_that_the_triton_kernel_steps(interpreted):
    assert interpreted["description"] == "BF16AdamW (stochastic_rounding, 8-bit block-wise states, triton kernel step)"


def test_triton_is_refused_for_cpu_tensors_outside_the_interpreter():
    from sft.errors import ConfigError

    w = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    with pytest.raises(ConfigError, match="kernel='triton' steps CUDA tensors"):
        BF16AdamW([w], kernel="triton")
    with pytest.raises(ConfigError, match="kernel='triton' is implemented for stochastic rounding"):
        BF16AdamW([w], bf16_update="kahan", kernel="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", CASES)
def test_triton_step_on_cuda_equals_the_torch_step_bitwise(name, torch_step_op_by_op):
    shape, moments = CASES[name]
    assert BF16AdamW([torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16, device="cuda"))]).kernel == "triton"
    assert_same_trajectory(trajectory(shape, moments, "triton", "cuda"), trajectory(shape, moments, "torch", "cuda"))


if __name__ == "__main__":
    run_kernels(Path(sys.argv[1]))
