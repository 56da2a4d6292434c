"""Throughput accounting: real (non-padding) tokens, peak memory, and model FLOP utilization."""
from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 tensor-core peak per device, FLOP/s (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "GH200": 989e12,
                   "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12, "RTX 4090": 165e12}


# Memory bandwidth per device, bytes/s: batch-1 decode reads every weight once per token.
MEMORY_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12,
                    "H200": 4.8e12, "GH200": 4.0e12, "A100-SXM4-80GB": 2.0e12, "A100 80GB PCIe": 1.94e12}


def _by_device_name(table: dict[str, float], device: torch.device) -> float | None:
    """The entry whose key is the longest part of the CUDA device's name (None on other devices): "GH200"
    wins over "H200" in "NVIDIA GH200 480GB", "H100 PCIe" over "H100"."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [k for k in table if k in name]
    return table[max(matches, key=len)] if matches else None


def device_peak_flops(device: torch.device) -> float | None:
    return _by_device_name(PEAK_BF16_FLOPS, device)


def memory_bandwidth(device: torch.device) -> float | None:
    return _by_device_name(MEMORY_BANDWIDTH, device)


def mfu(num_params: int, tokens_per_s: float, device: torch.device, trainable: int | None = None) -> float | None:
    """The training matmul FLOPs of the real tokens per second over the device's peak: 6 x parameters per
    token, or with adapters (`trainable` given) 4 x parameters + 2 x trainable (sft.lora.flops_per_token).
    Attention FLOPs, padding and recomputation are not counted."""
    from .lora import flops_per_token

    peak = device_peak_flops(device)
    return None if peak is None else flops_per_token(num_params, trainable) * tokens_per_s / peak


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work, so that a host clock reading includes it (a no-op on CPUs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_rss_bytes() -> int:
    """The process's peak resident set so far."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(GiB, what was measured): the CUDA allocator's peak, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_memory_allocated"
    return max_rss_bytes() / 2**30, "process_max_rss"
