"""What the measurement scripts of bench/ and inf_tests/ share: running a variant in a process of its own, the
provenance header of a results CSV (its lines are sft.run_folder.provenance's), and peak memory.
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch

from sft.perf import max_rss_bytes

ROOT = Path(__file__).resolve().parent.parent  # the repository root: `python -m bench...` runs from here


def run_command(argv: list[str], timeout_s: float, tail: int = 0, echo: bool = True) -> tuple[int | None, list[str]]:
    """Runs `argv` from the repository root in its own process group; returns its exit code (None when it was
    stopped at `timeout_s`) and, with `tail`, its last `tail` lines of output. The whole group is killed on a
    timeout and when this process is stopped (SIGTERM, Ctrl-C), so that no worker it started keeps the device.

    Without `tail` the child writes to this process's streams. With it, the child's stdout and stderr are read
    as one stream and passed through to this process's stdout when `echo`; without `echo` its stdout is
    discarded and only its stderr read (its last lines say why it failed)."""
    streams = {}
    if tail:
        streams = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT) if echo else \
            dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    child = subprocess.Popen(argv, cwd=ROOT, text=True, start_new_session=True, **streams)
    lines: collections.deque[str] = collections.deque(maxlen=tail or None)
    reader = None
    if tail:
        output = child.stdout if echo else child.stderr

        def pump():
            for line in output:
                if echo:
                    sys.stdout.write(line)
                lines.append(line.rstrip())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
    try:
        code = child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    if reader is not None:
        reader.join(timeout=5)
        sys.stdout.flush()
    return code, list(lines)


def write_header(f, lines: list[str]) -> None:
    """Provenance lines (sft.run_folder.provenance's and the like) at the head of a results CSV, as `# ` lines
    that readers skip (pandas' comment="#")."""
    f.writelines(f"# {line}\n" for line in lines)


def read_header(path: Path) -> list[str]:
    """The `# ` lines at the head of a results CSV, without their `# `."""
    lines = []
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            lines.append(line.removeprefix("#").removeprefix(" ").rstrip("\n"))
    return lines


def proc_status_bytes(key: str) -> int | None:
    """A memory figure of this process from /proc/self/status ("VmRSS", "VmHWM", "RssAnon"), None without it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """The process's resident set now (its peak so far where /proc is missing)."""
    rss = proc_status_bytes("VmRSS")
    return rss if rss is not None else max_rss_bytes()


def reset_peak_memory(device: torch.device) -> bool:
    """Starts a fresh peak; False when the peak will be the process's lifetime high-water mark instead. On a GPU
    the allocator's peak; on Linux, writing 5 to clear_refs resets the process's peak resident set (VmHWM) to
    its current size."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return proc_status_bytes("VmHWM") is not None
    except OSError:
        return False


def peak_memory_gib(device: torch.device, rss_before: int | None = None, reset: bool = False) -> tuple[float, str]:
    """(GiB, what was measured). On a GPU the allocator's peak (weights included); on the CPU how far the
    process's resident set rose above `rss_before` (memory resident before then is not counted), from the peak
    since reset_peak_memory when `reset` says it worked, else from the lifetime peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_memory_allocated"
    peak = proc_status_bytes("VmHWM") if reset else max_rss_bytes()
    kind = "process_peak_rss_growth" if reset else "process_lifetime_peak_rss_growth"
    return max(peak - (rss_before or 0), 0) / 2**30, kind
