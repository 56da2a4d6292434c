"""What every benchmark measures the same way: peak memory (of the device, or of this process's resident set)
and the provenance lines at the head of a results file. bench/ uses them too: they live here because this
package ships with the toolkit and bench/ does not.

Nothing here imports torch or the toolkit at import time: a benchmark's child process counts its imports
in its time and memory.
"""
from __future__ import annotations

from pathlib import Path

GIB = 2**30


def proc_status_bytes(key: str) -> int | None:
    """A size field of /proc/self/status (VmRSS, VmHWM, RssAnon, ...) in bytes; None without it (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """The process's peak resident set over its lifetime."""
    from sft.perf import max_rss_bytes

    return max_rss_bytes()


def rss_bytes() -> int:
    """The process's resident set now (its lifetime peak where /proc does not say)."""
    rss = proc_status_bytes("VmRSS")
    return rss if rss is not None else peak_rss_bytes()


def anon_bytes() -> int:
    """Anonymous resident memory of this process (Linux): heap and the like, not memory-mapped files."""
    return proc_status_bytes("RssAnon") or 0


def reset_peak_memory(device) -> bool:
    """Starts a fresh peak. On a GPU the allocator's; on Linux, writing 5 to clear_refs resets the process's
    peak resident set (VmHWM) to its current size. False where the CPU peak cannot be reset: it stays the
    process's lifetime high-water mark."""
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return proc_status_bytes("VmHWM") is not None
    except OSError:
        return False


def peak_memory_gib(device, rss_before: int | None = None, reset: bool = True) -> tuple[float, str]:
    """(GiB, what was measured). On a GPU the allocator's peak (weights included); on the CPU how far the
    process's resident set rose above `rss_before` (weights loaded before it excluded), since the last
    `reset_peak_memory` where it returned True (`reset`), else over the process's lifetime."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / GIB, "cuda_max_memory_allocated"
    peak = proc_status_bytes("VmHWM") if reset else peak_rss_bytes()
    kind = "process_peak_rss_growth" if reset else "process_lifetime_peak_rss_growth"
    return max(peak - rss_before, 0) / GIB, kind


def provenance_header(lines: list[str]) -> str:
    """Provenance lines (sft.run_folder.provenance's, and any others) as the `# ` lines that open a results CSV:
    sft.tables.csv_table shows them above its table."""
    return "".join(f"# {line}\n" for line in lines)


def header_value(path: Path, key: str) -> str | None:
    """The value of the `# key: value` line at the head of a results file; None when its head has none."""
    with open(path) as f:
        for line in f:
            if line.startswith(f"# {key}: "):
                return line.removeprefix(f"# {key}: ").strip()
            if not line.startswith("#"):
                break
    return None
