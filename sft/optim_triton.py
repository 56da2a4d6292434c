"""BF16AdamW's step with stochastic rounding as one Triton kernel per parameter (`optimizer_kernel="triton"`).

Each program takes a tile of ROWS blocks of INT8_BLOCK values and makes one pass over its bytes: it reads
the bf16 weight and gradient and the moments (8-bit codes and block scales, bf16 or fp32), updates the
moments and the weight in fp32, and writes the weight (rounded stochastically to bf16) and the moments back
in place. 8-bit moments are requantized with their block's new largest magnitude, each value's code
computed from its decade and its position in it instead of searched for in the map.

It computes what `sft.optim`'s torch step computes, bit for bit: the same fp32 operations in the same
order (correctly rounded division and square root, no fused multiply-adds), the same rounding noise (a
hash of the parameter's noise key and each value's position, `sft.optim.rounding_noise`), the same code
for every value (ties included). The tests check this under Triton's interpreter (TRITON_INTERPRET=1,
where the kernel runs on CPU tensors) and on a GPU.
"""
import contextlib

import torch
import triton
import triton.language as tl

from .optim import INT8_BLOCK, _int8_midpoints

FP32, BF16, INT8 = 0, 1, 2  # how the moments are stored: the kernel's STATES
ROWS = 8  # blocks per program: 2048 values
MAX_NUMEL = 2**31 - ROWS * INT8_BLOCK  # positions are int32; larger tensors take the torch step


@triton.jit
def _pcg(x):
    """sft.optim.pcg_hash on uint32 lanes: the same arithmetic, modulo 2^32 by the type."""
    state = x * 747796405 + 2891336453
    word = ((state >> ((state >> 28) + 4)) ^ state) * 277803737
    return (word >> 22) ^ word


# whether this process runs Triton's interpreter (TRITON_INTERPRET=1 when triton.jit ran), on CPU tensors
INTERPRETED = not isinstance(_pcg, triton.runtime.JITFunction)


@triton.jit
def _round_to_bf16(x, hashed, key):
    """sft.optim._round_with_noise with the noise of `key` (sft.optim.rounding_noise)."""
    noise = (_pcg(hashed + key) >> 16).to(tl.int32)
    bits = (x.to(tl.int32, bitcast=True) + noise) & -65536
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _quantize(x, midpoints_ptr, SIGNED: tl.constexpr):
    """Each row's largest magnitude, and each value's code: the index of the nearest entry of the dynamic map
    (sft.optim.dynamic_map) to the value divided by it, as sft.optim._quantize_ finds it by search.

    The estimate reads the decade 10^(k-7) <= |r| < 10^(k-6) from a logarithm and the cell within it
    linearly; it lands on the searched code or next to it (approximate logarithms, fp32 rounding, decade
    edges, which lie between the cells' midpoints, not on them). Comparing the value with the two
    midpoints around the estimate then gives the searched code exactly, with its rule for ties: a value
    on a midpoint takes the lower entry."""
    absmax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-30)
    r = tl.div_rn(x, absmax[:, None])
    a = tl.abs(r)
    log10 = tl.log2(tl.maximum(a, 1e-7)) * 0.30102999566398120
    k = tl.minimum(tl.maximum(tl.floor(log10).to(tl.int32) + 7, 0), 6)  # |r| = 1: the top of decade 6
    within = tl.exp2((log10 + 6 - k.to(tl.float32)) * 3.3219280948873623)  # |r| * 10^(6-k), in [0.1, 1]
    if SIGNED:  # 2^k cells per decade on either side of 0 (at 127); 1.0 is entry 255
        cells = 1 << k
        estimate = 127 + cells + tl.floor((within - 0.1) / 0.9 * cells.to(tl.float32)).to(tl.int32)
        estimate = tl.where(r < 0, 254 - estimate, estimate)
        estimate = tl.where(a < 1e-7, 127, estimate)
    else:  # 2^(k+1) cells per decade above 0 (entry 0); 1.0 is entry 255
        cells = 2 << k
        estimate = cells - 1 + tl.floor((within - 0.1) / 0.9 * cells.to(tl.float32)).to(tl.int32)
        estimate = tl.where(a < 1e-7, 0, estimate)
    estimate = tl.minimum(tl.maximum(estimate, 0), 255)
    up = (estimate < 255) & (r > tl.load(midpoints_ptr + tl.minimum(estimate, 254)))
    down = (estimate > 0) & (r <= tl.load(midpoints_ptr + tl.maximum(estimate - 1, 0)))
    return (estimate + up.to(tl.int32) - down.to(tl.int32)).to(tl.uint8), absmax


@triton.jit(do_not_specialize=["key"])
def _adamw_kernel(p_ptr, grad_ptr, m_ptr, v_ptr, m_scale_ptr, v_scale_ptr, signed_map_ptr, unsigned_map_ptr,
                  signed_midpoints_ptr, unsigned_midpoints_ptr, hyper_ptr, n, key,
                  STATES: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """sft.optim._adamw_ and the moments' storing of _fused_update_ (STATES FP32 or BF16) or
    _int8_update_ (INT8), on one tile."""
    key = key.to(tl.uint32)  # key + 1 and + 2 wrap around as in rounding_noise
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offsets = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    inside = offsets < n
    one_minus_beta1, beta2 = tl.load(hyper_ptr + 1), tl.load(hyper_ptr + 2)
    one_minus_beta2, eps, lr_wd = tl.load(hyper_ptr + 3), tl.load(hyper_ptr + 4), tl.load(hyper_ptr + 5)
    step_size, bc2_sqrt = tl.load(hyper_ptr + 6), tl.load(hyper_ptr + 7)

    p = tl.load(p_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    if STATES == INT8:
        block_inside = rows < n // BLOCK
        m_codes = tl.load(m_ptr + offsets, mask=inside, other=0).to(tl.int32)
        v_codes = tl.load(v_ptr + offsets, mask=inside, other=0).to(tl.int32)
        m = tl.load(signed_map_ptr + m_codes) * tl.load(m_scale_ptr + rows, mask=block_inside, other=0.0)[:, None]
        v = tl.load(unsigned_map_ptr + v_codes) * tl.load(v_scale_ptr + rows, mask=block_inside, other=0.0)[:, None]
    else:
        m = tl.load(m_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=inside, other=0.0).to(tl.float32)

    m = m + (g - m) * one_minus_beta1
    v = v * beta2 + g * g * one_minus_beta2
    new = p - tl.div_rn(step_size * m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps) - lr_wd * p
    hashed = _pcg(offsets.to(tl.uint32))
    tl.store(p_ptr + offsets, _round_to_bf16(new, hashed, key), mask=inside)

    if STATES == INT8:
        m_codes, m_scale = _quantize(m, signed_midpoints_ptr, True)
        v_codes, v_scale = _quantize(v, unsigned_midpoints_ptr, False)
        tl.store(m_ptr + offsets, m_codes, mask=inside)
        tl.store(v_ptr + offsets, v_codes, mask=inside)
        tl.store(m_scale_ptr + rows, m_scale, mask=block_inside)
        tl.store(v_scale_ptr + rows, v_scale, mask=block_inside)
    elif STATES == BF16:
        tl.store(m_ptr + offsets, _round_to_bf16(m, hashed, key + 1), mask=inside)
        tl.store(v_ptr + offsets, _round_to_bf16(v, hashed, key + 2), mask=inside)
    else:
        tl.store(m_ptr + offsets, m, mask=inside)
        tl.store(v_ptr + offsets, v, mask=inside)


def covers(p: torch.Tensor) -> bool:
    """Whether the kernel can step `p`: on a GPU (or on the CPU under the interpreter), below MAX_NUMEL values."""
    return (p.is_cuda or (INTERPRETED and p.device.type == "cpu")) and p.numel() <= MAX_NUMEL


def _launch(p, grad, m, v, m_scale, v_scale, tables: tuple[torch.Tensor, ...], hyper, key: int, states: int) -> None:
    if not p.numel():
        return
    grid = (triton.cdiv(p.numel(), ROWS * INT8_BLOCK),)
    with torch.cuda.device(p.device) if p.is_cuda else contextlib.nullcontext():
        _adamw_kernel[grid](p, grad, m, v, m_scale, v_scale, *tables, hyper, p.numel(), key,
                            STATES=states, BLOCK=INT8_BLOCK, ROWS=ROWS, num_warps=8, enable_fp_fusion=False)


def fused_update_(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  hyper: torch.Tensor, key: int) -> None:
    """sft.optim._fused_update_ (fp32 or bf16 moments) as the kernel; `hyper` stands in for the unused tables."""
    states = BF16 if exp_avg.dtype == torch.bfloat16 else FP32
    _launch(p, grad, exp_avg, exp_avg_sq, hyper, hyper, (hyper,) * 4, hyper, key, states)


def int8_update_(p: torch.Tensor, grad: torch.Tensor, m_codes: torch.Tensor, m_scale: torch.Tensor,
                 v_codes: torch.Tensor, v_scale: torch.Tensor, signed_map: torch.Tensor, unsigned_map: torch.Tensor,
                 hyper: torch.Tensor, key: int) -> None:
    """sft.optim._int8_update_ as the kernel."""
    tables = (signed_map, unsigned_map, *_int8_midpoints(p.device))
    _launch(p, grad, m_codes, v_codes, m_scale, v_scale, tables, hyper, key, INT8)
