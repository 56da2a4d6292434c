"""Throughput accounting: real (non-padding) tokens, peak memory, and model FLOP utilization."""
from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 tensor-core peak per device, FLOP/s (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
                   "A10G": 125e12, "L4": 121e12, "RTX 4090": 165e12}


# Memory bandwidth per device, bytes/s: batch-1 decode reads every weight once per token.
MEMORY_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12,
                    "H200": 4.8e12, "A100-SXM4-80GB": 2.0e12, "A100 80GB PCIe": 1.94e12}


def _by_device_name(table: dict[str, float], device: torch.device) -> float | None:
    """The entry whose key is the longest part of the CUDA device's name (None on other devices)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [k for k in table if k in name]
    return table[max(matches, key=len)] if matches else None


def device_peak_flops(device: torch.device) -> float | None:
    return _by_device_name(PEAK_BF16_FLOPS, device)


def memory_bandwidth(device: torch.device) -> float | None:
    return _by_device_name(MEMORY_BANDWIDTH, device)


def mfu(num_params: int, tokens_per_s: float, device: torch.device) -> float | None:
    """6 x parameters x real tokens/s over the device's peak: the forward and backward matmul FLOPs
    of the tokens that carry information (attention FLOPs and padding are not counted)."""
    peak = device_peak_flops(device)
    return None if peak is None else 6 * num_params * tokens_per_s / peak


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(GiB, what was measured): the CUDA allocator's peak, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return rss_bytes / 2**30, "process_max_rss"
